#!/usr/bin/env python
"""Step-time benchmark of the training core: ``python benchmarks/perf.py [--device cpu|cuda] [--json FILE]``.

In one process, after warm-up, times (best of interleaved repeats, device synchronised before reading clocks):

- ``reference_ce`` / ``reference_kd``: the plain loop a user would write with timm alone: timm models,
  ``torch.optim.AdamW``, autocast (bf16 on GPU), the teacher forward under ``no_grad``, nothing else;
- ``core_ce`` / ``core_kd``: the suite's ``engine.train_one_epoch`` (method objects, scheduler, hooks, and on GPU
  ``torch.compile`` of student and teacher, fused AdamW, channels_last for CNN teachers);
- ``core_mkd[hypergrad, interval]``: MKD with each hypergradient and a few meta intervals.

Batches are pre-made on the device, so the numbers are the step's compute (data loading is the same for every
variant and would only dilute the ratios).  An epoch is ``steps`` training steps; MKD's cost is amortised over
whole meta intervals.  ``--trajectory`` also trains MKD on the embedded data twice, exact every-step vs the
cheap default, and prints both temperature trajectories.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mkd.config import RunConfig, from_dict  # noqa: E402
from mkd.errors import UserError, cli  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Batches:
    """A fixed set of device batches, cycled: what a perfectly prefetching loader delivers."""

    def __init__(self, n, batch, img, classes, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = [(torch.randn(batch, 3, img, img, generator=g).to(device),
                      torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(n)]
        self.steps = 0

    def take(self, steps):
        for i in range(steps):
            yield self.data[(self.steps + i) % len(self.data)]
        self.steps += steps


def make_models(args, device, classes):
    from mkd.models import create_model

    student = create_model(args.student, classes, args.img).to(device)
    teacher = create_model(args.teacher, classes, args.img).to(device).eval().requires_grad_(False)
    return student, teacher


def reference_step_fn(args, device, classes, kd: bool):
    """The plain timm loop (no suite code): returns step(x, y)."""
    student, teacher = make_models(args, device, classes)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    T = 4.0

    def step(x, y):
        with amp:
            if kd:
                with torch.no_grad():
                    t = teacher(x)
            out = student(x)
            loss = F.cross_entropy(out, y)
            if kd:
                loss = 0.5 * loss + 0.5 * F.kl_div(F.log_softmax(out.float() / T, -1), F.softmax(t.float() / T, -1),
                                                   reduction="batchmean") * T * T
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def random_meta_batches(method, n: int, img: int, classes: int, device):
    """Meta batches of ``n`` random images for a method that reads a meta split (None for the others)."""
    from mkd.data import MetaBatches

    if not method.needs_meta_split:
        return None
    g = torch.Generator().manual_seed(1)
    mx = torch.randn(n, 3, img, img, generator=g)
    my = torch.randint(0, classes, (len(mx),), generator=g)
    return MetaBatches(list(range(len(mx))), (mx, my), method.meta_batch_size, 0, 0, 1, device)


def core_runner(args, device, classes, method: str, cached: bool = False, **mkd):
    """The suite's engine on the same models and batches (the loop built by ``engine.build_loop``, as a run
    builds it): returns run(steps).  ``cached``: the teacher's logits come from the stream cache (read from host
    memory, as a run reads an epoch's cache file) instead of a teacher forward per step."""
    from mkd.augment import build_augment
    from mkd.batch import Batch
    from mkd.engine import build_loop, train_one_epoch
    from mkd.methods import build_method

    d = {"method": method, "student": args.student, "batch_size": args.batch, "augment": "none", "log_every": 10**9,
         "lr": 1e-4, "warmup_epochs": 0, "epochs": 10**6, "compile": args.compile}
    if method != "ce":
        d["teacher"] = args.teacher
    if mkd:
        d["mkd"] = mkd
    cfg = from_dict(d)
    student, teacher = make_models(args, device, classes)
    m = build_method(cfg, classes).to(device)
    aug = build_augment("none", args.img, (0.5,) * 3, (0.25,) * 3, classes)
    meta = random_meta_batches(m, max(args.batch, 256), args.img, classes, device)
    loop = build_loop(cfg, student, teacher if m.needs_teacher else None, m, aug, device, 1, meta)
    batches = Batches(8, args.batch, args.img, classes, device)
    fwd, P = loop.models.teacher_fwd, loop.precision
    stored = {}
    if cached and fwd is not None:
        with torch.no_grad(), P.autocast():
            stored = {id(x): fwd(x).cpu() for x, _ in batches.data}

    def feed(steps):
        for x, y in batches.take(steps):
            t = None
            if fwd is not None:
                if cached:
                    t = stored[id(x)].to(device, non_blocking=True)
                else:
                    with torch.no_grad(), P.autocast():
                        t = fwd(x)
            yield Batch(x, y, y, teacher_logits=t)

    def run(steps):
        train_one_epoch(loop, feed(steps), 1, batches.steps)

    return run


def timed(fn, steps, repeats, device):
    """Median seconds per step over ``repeats`` runs of ``steps`` steps."""
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn(steps)
        sync(device)
        out.append((time.perf_counter() - t) / steps)
    return statistics.median(out)


def trajectory() -> dict:
    """MKD on the embedded data: exact every-step (full meta batch) vs the cheap default; both tau trajectories."""
    import tempfile

    from mkd.config import load_config
    from mkd.train import train

    base = ["method=mkd", "teacher=emb_vit_l", "epochs=6", "lr=4e-3", "augment=weak", "log_every=6"]
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        train(load_config(overrides=["student=emb_vit_l", "epochs=6", "lr=2e-3", "augment=weak"]), teacher, quiet=True)
        runs = {}
        for name, extra in (("exact_every_step", ["mkd.hypergrad=exact", "mkd.meta_interval=1"]),
                            ("exact_every_step_seed1", ["mkd.hypergrad=exact", "mkd.meta_interval=1", "seed=1"]),
                            ("default", [])):
            cfg = load_config(overrides=base + [f"teacher_checkpoint={teacher / 'model.pt'}"] + extra)
            out = Path(tmp) / name
            t = time.perf_counter()
            res = train(cfg, out, quiet=True)
            recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
            runs[name] = {"epochs": [[r["epoch"], r["tau_t"], r["tau_s"]] for r in recs],
                          "top1": res["final_top1"], "seconds": round(time.perf_counter() - t, 1),
                          "hypergrad": cfg.mkd.hypergrad, "meta_interval": cfg.mkd.meta_interval}
    def dev(x, y):
        return round(max(max(abs(math.log(a[1] / b[1])), abs(math.log(a[2] / b[2])))
                         for a, b in zip(runs[x]["epochs"], runs[y]["epochs"])), 4)

    return {"runs": runs, "max_abs_log_tau_difference": dev("exact_every_step", "default"),
            "seed_to_seed_max_abs_log_tau_difference_of_exact": dev("exact_every_step", "exact_every_step_seed1")}


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/perf.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--student", help="default: vit_tiny_patch16_224 on cuda, emb_vit_s on cpu")
    ap.add_argument("--teacher", help="default: vit_base_patch16_224 on cuda, emb_vit_xl on cpu")
    ap.add_argument("--img", type=int, help="default: 224 on cuda, 16 on cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, help="default: 1000 on cuda, 20 on cpu")
    ap.add_argument("--steps", type=int, default=24, help="steps per timed repeat (a multiple of every interval)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--intervals", default="1,8", help="MKD meta intervals to time")
    ap.add_argument("--hypergrads", default="exact,jvp,fd")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--trajectory", action="store_true", help="also compare temperature trajectories (CPU, minutes)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no GPU is visible: use --device cpu")
    gpu = device.type == "cuda"
    args.student = args.student or ("vit_tiny_patch16_224" if gpu else "emb_vit_s")
    args.teacher = args.teacher or ("vit_base_patch16_224" if gpu else "emb_vit_xl")
    args.img = args.img or (224 if gpu else 16)
    classes = args.classes or (1000 if gpu else 20)
    intervals = [int(i) for i in args.intervals.split(",")]
    if any(args.steps % i for i in intervals):
        raise UserError(f"--steps {args.steps} must be a multiple of every interval in {intervals}")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}; student {args.student}, teacher {args.teacher}, {args.img}px, batch {args.batch}, "
          f"{'bf16' if gpu else 'fp32'}, compile {args.compile}; {args.steps} steps x {args.repeats} repeats")

    variants = {}
    for kd in (False, True):
        step = reference_step_fn(args, device, classes, kd)
        batches = Batches(8, args.batch, args.img, classes, device)
        variants[f"reference_{'kd' if kd else 'ce'}"] = lambda n, s=step, b=batches: [s(x, y) for x, y in b.take(n)]
    variants["core_ce"] = core_runner(args, device, classes, "ce")
    variants["core_kd"] = core_runner(args, device, classes, "kd")
    variants["core_kd[teacher cache]"] = core_runner(args, device, classes, "kd", cached=True)
    for hg in args.hypergrads.split(","):
        for iv in intervals:
            variants[f"core_mkd[{hg},interval={iv}]"] = core_runner(args, device, classes, "mkd", hypergrad=hg,
                                                                    meta_interval=iv)
    default = RunConfig().mkd
    variants.setdefault(f"core_mkd[{default.hypergrad},interval={default.meta_interval}]",
                        core_runner(args, device, classes, "mkd"))
    variants[f"core_mkd[{default.hypergrad},interval={default.meta_interval}][teacher cache]"] = \
        core_runner(args, device, classes, "mkd", cached=True)
    times = {}
    for k, fn in variants.items():  # warm-up (compilation, allocator, caches)
        fn(args.steps)
    for r in range(args.repeats):  # interleave the variants so drift hits all alike
        for k, fn in variants.items():
            times.setdefault(k, []).append(timed(fn, args.steps, 1, device))
    ms = {k: 1000 * min(v) for k, v in times.items()}  # best of the repeats: least disturbed by other load
    kd = ms["core_kd"]
    print(f"\n{'variant':<48} {'ms/step':>9} {'img/s':>9} {'x core KD':>10}")
    for k, v in ms.items():
        print(f"{k:<48} {v:>9.2f} {args.batch / v * 1000:>9.0f} {v / kd:>10.3f}")
    dkey = f"core_mkd[{default.hypergrad},interval={default.meta_interval}]"
    ratios = {"mkd_epoch_over_kd_epoch": round(ms[dkey] / kd, 4),
              "core_kd_over_reference_kd": round(kd / ms["reference_kd"], 4),
              "core_ce_over_reference_ce": round(ms["core_ce"] / ms["reference_ce"], 4),
              "kd_speedup_from_teacher_cache": round(kd / ms["core_kd[teacher cache]"], 4),
              "mkd_speedup_from_teacher_cache": round(ms[dkey] / ms[dkey + "[teacher cache]"], 4)}
    print(f"\nMKD (default: {default.hypergrad}, interval {default.meta_interval}) epoch / KD epoch: "
          f"{ratios['mkd_epoch_over_kd_epoch']:.3f}   (target <= 1.10)")
    print(f"teacher cache: KD step {ratios['kd_speedup_from_teacher_cache']:.2f}x faster, MKD step "
          f"{ratios['mkd_speedup_from_teacher_cache']:.2f}x faster (data loading excluded)")
    print(f"core KD step / reference KD step: {ratios['core_kd_over_reference_kd']:.3f}   (lower is faster; "
          f"GPU target <= 1/1.3 = 0.77, CPU target <= 1.00)")
    if gpu:  # the FLOP utilisation of the KD step (mkd/cost.py's throughput model reads a recorded one)
        from mkd.cost import PEAK_TFLOPS, forward_flops

        card = next((c for c in PEAK_TFLOPS if c in name), None)
        flops = args.batch * (3 * forward_flops(args.student, "{}", classes, args.img)
                              + forward_flops(args.teacher, "{}", classes, args.img))
        if card:
            ratios["core_kd_mfu"] = round(flops / (kd / 1000) / (PEAK_TFLOPS[card] * 1e12), 4)
            print(f"core KD step: {flops / (kd / 1000) / 1e12:.0f} TFLOP/s = MFU {ratios['core_kd_mfu']:.3f} of the "
                  f"{card}'s bf16 peak")
    out = {"device": name, "student": args.student, "teacher": args.teacher, "img": args.img, "batch": args.batch,
           "precision": "bf16" if gpu else "fp32", "steps": args.steps, "repeats": args.repeats,
           "ms_per_step": {k: round(v, 3) for k, v in ms.items()},
           "img_per_s": {k: round(args.batch / v * 1000, 1) for k, v in ms.items()}, "ratios": ratios,
           "torch": torch.__version__, "timm": timm.__version__}
    if args.trajectory:
        print("\ntraining MKD twice on the embedded data (exact every step vs default)...")
        out["trajectory"] = trajectory()
        for name_, r in out["trajectory"]["runs"].items():
            print(f"  {name_:<18} ({r['hypergrad']}, interval {r['meta_interval']}, {r['seconds']}s, top1 {r['top1']}): "
                  + " ".join(f"e{e}:{tt:.2f}/{ts:.2f}" for e, tt, ts in r["epochs"]))
        tr = out["trajectory"]
        print(f"  max over epochs of |log tau_exact - log tau_default|: {tr['max_abs_log_tau_difference']} "
              f"(exact vs exact with another seed: {tr['seed_to_seed_max_abs_log_tau_difference_of_exact']})")
    if args.json:
        from mkd import atomic

        atomic.write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
