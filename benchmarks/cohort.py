#!/usr/bin/env python
"""What a cohort saves (``mkd/cohort.py``): step time of K runs of one teacher stream trained as a cohort (one
teacher forward per step, then each student's step with its own RNG state) against the sum of the K runs'
separate step times, with the imagenet scale's models; and peak memory of the cohort against one run.

    python benchmarks/cohort.py                      # vit_large_patch16_224 teacher, deit_tiny student, 224 px
    python benchmarks/cohort.py --img 64 --steps 2   # a quick look

Prints one table and, with ``--json FILE``, writes its rows.  Runs on a GPU when there is one (bf16), else CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

# the cohort the planner forms at the imagenet scale: the methods that train on the whole training set share a
# stream; MKD (holdout=meta) trains on another set and is its own unit, timed alone for the MKD/KD step ratio
METHODS = ("kd", "dist", "dkd", "ctkd")


def loops(args, device, methods):
    """One engine loop per method (as a run builds it) on one shared, frozen teacher."""
    from mkd.augment import build_augment
    from mkd.engine import build_loop
    from mkd.methods import build_method
    from mkd.models import create_model
    from perf import random_meta_batches

    classes = 1000
    teacher = create_model(args.teacher, classes, args.img).to(device).eval()
    teacher.requires_grad_(False)
    out = []
    for i, m in enumerate(methods):
        cfg = _cfg(m, args)
        torch.manual_seed(i)
        student = create_model(args.student, classes, args.img, drop_path=0.1).to(device)
        method = build_method(cfg, classes).to(device)
        aug = build_augment("none", args.img, (0.5,) * 3, (0.25,) * 3, classes)
        meta = random_meta_batches(method, max(args.batch, 8), args.img, classes, device)
        out.append(build_loop(cfg, student, teacher, method, aug, device, 1, meta))
    return out


def _cfg(method: str, args):
    from mkd.config import from_dict

    return from_dict({"method": method, "student": args.student, "teacher": args.teacher, "batch_size": args.batch,
                      "augment": "none", "log_every": 10**9, "lr": 1e-4, "warmup_epochs": 0, "epochs": 10**6,
                      "drop_path": 0.1, "compile": "on" if args.compile else "off",
                      "mkd": {"meta_batch_size": args.batch}})


def batches(args, device, n: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(args.batch, 3, args.img, args.img, generator=g).to(device),
             torch.randint(0, 1000, (args.batch,), generator=g).to(device)) for _ in range(n)]


def step_times(args, device) -> dict:
    """Median seconds per step: each method alone (teacher forward + its step), and the cohort (one teacher
    forward + every method's step, each with its RNG state swapped in and out)."""
    from mkd.batch import Batch
    from mkd.engine import EpochSteps
    from mkd.environment import rng_state, set_rng_state

    methods = args.methods.split(",")
    extra = [m for m in args.also_alone.split(",") if m and m not in methods]
    everyone = loops(args, device, methods + extra)
    ls = everyone[:len(methods)]  # the cohort; the others are timed alone only
    data = batches(args, device, args.steps)
    fwd, P = ls[0].models.teacher_fwd, ls[0].precision

    def teacher(x):
        with torch.no_grad(), P.autocast():
            return fwd(x)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def alone(loop):
        steps = EpochSteps(loop, 1, 0)
        for x, y in data:
            steps.take(Batch(x, y, y, teacher_logits=teacher(x)))

    def cohort():
        steps = [EpochSteps(loop, 1, 0) for loop in ls]
        rngs = [rng_state() for _ in ls]
        for x, y in data:
            b = Batch(x, y, y, teacher_logits=teacher(x))
            for i, s in enumerate(steps):
                set_rng_state(rngs[i])
                s.take(b)
                rngs[i] = rng_state()

    def timed(fn):
        fn()  # warm-up
        out = []
        for _ in range(args.repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t) / len(data))
        return statistics.median(out)

    sep = {m: timed(lambda loop=loop: alone(loop)) for m, loop in zip(methods + extra, everyone)}
    t_teacher = timed(lambda: [teacher(x) for x, _ in data])
    return {"separate": sep, "separate_sum": sum(sep[m] for m in methods), "cohort": timed(cohort),
            "teacher_forward": t_teacher}


def peak_memory(args, what: str) -> tuple[float, float]:
    """(peak, after the steps) memory in GiB of a fresh process that builds ``what`` (one run, or the cohort) and
    takes two steps: the device's allocation on a GPU, the process's resident set on a CPU."""
    code = (f"import sys; sys.argv = {['x', *sys.argv[1:]]!r}; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import cohort as C; C._memory_child({what!r})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    peak, now = p.stdout.strip().splitlines()[-1].split()
    return float(peak), float(now)


def _memory_child(what: str) -> None:
    args = parse_args(sys.argv[1:])
    device = _device()
    from mkd.batch import Batch
    from mkd.engine import EpochSteps

    methods = args.methods.split(",")
    ls = loops(args, device, methods if what == "cohort" else methods[:1])
    fwd = ls[0].models.teacher_fwd
    steps = [EpochSteps(loop, 1, 0) for loop in ls]
    for x, y in batches(args, device, 2):
        with torch.no_grad(), ls[0].precision.autocast():
            t = fwd(x)
        for s in steps:
            s.take(Batch(x, y, y, teacher_logits=t))
    if device.type == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**30, torch.cuda.memory_allocated() / 2**30)
    else:  # peak and current resident set (KiB on Linux)
        rss = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, rss / 2**20)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python benchmarks/cohort.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="vit_large_patch16_224")
    ap.add_argument("--student", default="deit_tiny_patch16_224")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2, help="per step (CPU: as small as the models allow)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="the cohort's members (default kd,dist,dkd,ctkd: the imagenet planner's cohort)")
    ap.add_argument("--also-alone", default="mkd", help="methods timed alone beside the cohort, not in it (default "
                    "mkd: the MKD/KD step ratio)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each student and the teacher, as runs do "
                                                            "on a GPU")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory rows (no step timings)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory rows")
    ap.add_argument("--json", help="also write the rows to this file")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = _device()
    torch.manual_seed(0)
    methods = args.methods.split(",")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"cohort of {len(methods)} ({', '.join(methods)}), teacher {args.teacher}, student {args.student}, "
          f"{args.img} px, batch {args.batch}, {args.steps} steps x {args.repeats}, compile {args.compile}; {where}; "
          f"torch {torch.__version__}")
    rows = {"device": where, "torch": torch.__version__, "args": vars(args)}
    if not args.memory_only:
        t = step_times(args, device)
        ratio = t["cohort"] / t["separate_sum"]
        print("| what | s / step |\n|---|---|")
        for m, s in t["separate"].items():
            print(f"| {m} alone (teacher forward + step){'' if m in methods else ', not in the cohort'} | {s:.3f} |")
        print(f"| sum of the {len(methods)} separate runs | {t['separate_sum']:.3f} |")
        print(f"| teacher forward alone | {t['teacher_forward']:.3f} |")
        print(f"| cohort (one teacher forward + {len(methods)} steps) | {t['cohort']:.3f} |")
        print(f"| **cohort / separate** | **{ratio:.2f}x** |")
        rows.update(t, ratio=ratio)
        if "kd" in t["separate"] and "mkd" in t["separate"]:
            rows["mkd_over_kd"] = t["separate"]["mkd"] / t["separate"]["kd"]
    if not args.no_memory:
        (one, one_now), (many, many_now) = peak_memory(args, "one"), peak_memory(args, "cohort")
        print(f"| memory, one run: peak / after its steps | {one:.2f} / {one_now:.2f} GiB |\n"
              f"| memory, cohort of {len(methods)}: peak / after its steps | {many:.2f} / {many_now:.2f} GiB "
              f"({many / one:.2f}x / {many_now / one_now:.2f}x) |")
        rows.update(peak_one_gib=one, peak_cohort_gib=many, after_one_gib=one_now, after_cohort_gib=many_now)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
