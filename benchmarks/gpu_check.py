#!/usr/bin/env python
"""GPU acceptance check in one command, measuring what the plan's price needs: ``python benchmarks/gpu_check.py``
(``make gpu-check``; ``--record`` keeps the measurements for ``--dry-run``).

On a GPU (a budget of 7.5 minutes on one H100: each step has its own time limit, and a step that would start past
the budget is reported as skipped), in order:

1. the hypergradient self-check on CUDA: fp32 with drop path, a BatchNorm student in fp64, and bf16 meta forwards
   against fp32 at DeiT-Ti size (224 px);
2. the rates of every model family the suites use at their per-GPU batch, bf16 (``rates.py``): training DeiT-Ti
   (compiled, as runs compile, and eager: the compile factor), DeiT-S/B and ViT-L (eager), ResNet-18 (compiled,
   batch 32); inference of the teachers: DeiT III S/B/L/H, ViT-L, RegNetY-16GF (batch 128), ResNet-34/50/101/152
   (batch 32);
3. the suites' real pairs: the cohort the imagenet planner forms (kd, dist, dkd, ctkd) of DeiT-Ti with a DeiT III-L
   teacher, compiled, at batch 128, against the four alone, and MKD alone (MKD trains on its own stream)
   (``cohort.py``: the cohort's saving, the MKD/KD step ratio of the ViT pair,
   peak memory of one run and of the cohort); ResNet-18 with ResNet-34 at batch 32 (the ResNet pair's MKD/KD);
4. peak memory of the largest run and cohort: ViT-L students with the RegNetY teacher at batch 128, alone and as a
   cohort of kd and mkd;
5. the checkpoint of the largest run (ViT-L with its AdamW state) written and timed against the requeue signal's
   delay (``signal_delay_s``, 180 s in slurm/example_gpu_cluster.yaml);
6. the input pipeline at a fixed worker count over 100 batches (``pipeline.py``);
7. a short MKD run with ``compile=on amp=bf16`` and a one-process DDP run through torchrun (NCCL).

On a CPU the same steps run at the embedded scale's size (tiny models, 16-64 px, a few steps), so CI exercises the
check's code on every submission.  Prints one table and writes one JSON (``--json``); ``--record`` on a GPU writes
it to ``benchmarks/measured/<card>.json``, whose rates replace the priors of ``benchmarks/throughput.csv`` in
``--dry-run`` (``mkd/cost.py``).  Exit 1 if a step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["embedded.train_per_class=40", "embedded.val_per_class=10", "batch_size=64", "epochs=2", "lr=4e-3",
        "warmup_epochs=0"]
BUDGET_S = 450.0  # 7.5 minutes on a GPU: the whole check stays under 8
SIGNAL_DELAY_S = 180.0


def step(name: str, cmd: list[str], timeout: int, parse=None, t0: float = 0.0, budget: float = 0.0) -> dict:
    if budget and time.time() - t0 > budget:
        return {"step": name, "ok": True, "skipped": True, "seconds": 0.0,
                "detail": f"skipped: the check's {budget:.0f} s budget was spent"}
    t = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        ok, out = p.returncode == 0, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        ok, out = False, f"timed out after {timeout}s"
    lines = [l for l in out.splitlines() if l.strip() and "warn" not in l.lower()]
    why = next((l for l in reversed(lines) if "FAIL" in l or "rror" in l), lines[-1] if lines else "")
    try:
        detail = parse(out) if ok and parse else ("" if ok else why.strip()[:160])
    except Exception as e:  # a step that ran but whose output did not parse is a failure of the check
        ok, detail = False, f"could not read its output: {type(e).__name__}: {e}"
    return {"step": name, "ok": ok, "seconds": round(time.time() - t, 1), "detail": detail}


def card_of(device_name: str) -> str:
    from mkd.cost import PEAK_TFLOPS

    return next((c for c in PEAK_TFLOPS if c in device_name), device_name.split()[-1] if device_name else "cpu")


def plan(gpu: bool, d: str) -> dict:
    """The steps' arguments: the suites' real sizes on a GPU, the embedded scale's on a CPU."""
    if gpu:
        rates = ["deit_tiny_patch16_224:train+compile:128", "deit_tiny_patch16_224:train:128",
                 "deit_small_patch16_224:train:128", "deit_base_patch16_224:train:128",
                 "vit_large_patch16_224:train:128", "resnet18:train+compile:32",
                 *(f"{m}:infer:128" for m in ("deit3_small_patch16_224", "deit3_base_patch16_224",
                                              "deit3_large_patch16_224", "deit3_huge_patch14_224",
                                              "vit_large_patch16_224", "regnety_160")),
                 *(f"resnet{n}:infer:32" for n in (34, 50, 101, 152))]
        return {"selfcheck_img": "224", "rates": rates, "rates_args": ["--steps", "10", "--repeats", "3"],
                "cohort": ["--teacher", "deit3_large_patch16_224", "--student", "deit_tiny_patch16_224", "--batch",
                           "128", "--steps", "10", "--repeats", "3", "--compile"],
                "resnet_pair": ["--teacher", "resnet34", "--student", "resnet18", "--batch", "32", "--steps", "10",
                                "--repeats", "3", "--no-memory", "--methods", "kd,mkd"],
                "largest": ["--teacher", "regnety_160", "--student", "vit_large_patch16_224", "--batch", "128",
                            "--memory-only", "--methods", "kd,mkd"],
                "checkpoint": ["vit_large_patch16_224", "1000", "224"],
                "pipeline": ["--images", "1000", "--batches", "100", "--batch", "64", "--workers", "8"]}
    return {"selfcheck_img": "32",
            "rates": ["emb_vit_s:train+compile:16", "emb_vit_s:train:16", "emb_resnet:train:16", "emb_vit_xl:infer:32",
                      "emb_resnet_l:infer:32"],
            "rates_args": ["--img", "16", "--classes", "20", "--steps", "2", "--repeats", "1"],
            "cohort": ["--teacher", "vit_small_patch16_224", "--img", "64", "--steps", "2", "--repeats", "1"],
            "resnet_pair": ["--teacher", "resnet34", "--student", "resnet18", "--img", "32", "--batch", "4", "--steps",
                            "2", "--repeats", "1", "--no-memory", "--methods", "kd,mkd"],
            "largest": ["--teacher", "vit_small_patch16_224", "--student", "vit_small_patch16_224", "--img", "64",
                        "--batch", "4", "--memory-only", "--methods", "kd,mkd"],
            "checkpoint": ["emb_vit_xl", "20", "16"],
            "pipeline": ["--images", "120", "--batches", "100", "--batch", "4", "--workers", "1"]}


def checkpoint_seconds(model: str, classes: int, img: int, device: str, where: Path) -> dict:
    """Seconds to write a run's checkpoint (its weights and AdamW state, as ``mkd/checkpoint.py`` saves them)."""
    import torch

    from mkd import atomic
    from mkd.models import create_model

    m = create_model(model, classes, img).to(device)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # the optimizer's state exists, as after a step
    state = {"model": m.state_dict(), "optimizer": opt.state_dict()}
    path = where / "checkpoint.pt"
    t = time.perf_counter()
    atomic.write_dumped(path, lambda f: torch.save(state, f))
    secs = time.perf_counter() - t
    return {"model": model, "seconds": round(secs, 2), "gib": round(path.stat().st_size / 2**30, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when a GPU is visible)")
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--record", action="store_true",
                    help="on a GPU: write the measurements to benchmarks/measured/<card>.json, where --dry-run reads "
                         "the card's measured rates instead of the priors")
    ap.add_argument("--signal-delay", type=float, default=SIGNAL_DELAY_S,
                    help="the seconds between the requeue signal and the time limit (the profile's signal_delay_s)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible: use --device cpu", file=sys.stderr)
        return 2
    gpu = device == "cuda"
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    py, t0 = sys.executable, time.time()
    budget = BUDGET_S if gpu else 0.0
    rows, measured = [], {"device": name, "card": card_of(name) if gpu else "cpu", "torch": torch.__version__,
                          "date": time.strftime("%Y-%m-%d"), "commit": _commit()}
    with tempfile.TemporaryDirectory() as d:
        P = plan(gpu, d)
        for extra in (["--dtype", "float32", "--drop-path", "0.1", "--dropout", "0.1"],
                      ["--dtype", "float64", "--student", "emb_resnet", "--drop-path", "0.1", "--dropout", "0.1"],
                      ["--dtype", "float32", "--amp", "bf16", "--student", "deit_tiny_patch16_224", "--img",
                       P["selfcheck_img"], "--drop-path", "0.1"]):
            rows.append(step(f"selfcheck {' '.join(extra)}", [py, "-m", "mkd.selfcheck", "--device", device, *extra],
                             300, selfcheck_detail, t0, budget))

        def rates_detail(out, f=f"{d}/rates.json"):
            r = json.loads(Path(f).read_text())["rows"]
            measured["rates"] = r
            return ", ".join(f"{x['model']} {x['mode']}{'+c' if x['compiled'] else ''} {x['img_s']:,.0f}" for x in r)

        rows.append(step("rates of the suites' models at their per-GPU batch",
                         [py, "benchmarks/rates.py", "--device", device, "--json", f"{d}/rates.json",
                          *(a for m in P["rates"] for a in ("--model", m)), *P["rates_args"]], 420, rates_detail, t0,
                         budget))

        def cohort_detail(out, f=f"{d}/cohort.json", key="cohort"):
            r = json.loads(Path(f).read_text())
            measured[key] = {k: r.get(k) for k in ("ratio", "mkd_over_kd", "separate", "cohort", "teacher_forward",
                                                   "peak_one_gib", "peak_cohort_gib")}
            parts = []
            if r.get("ratio") is not None:
                parts.append(f"cohort / separate {r['ratio']:.2f}x")
            if r.get("mkd_over_kd") is not None:
                parts.append(f"MKD / KD step {r['mkd_over_kd']:.2f}x")
            if r.get("peak_one_gib") is not None:
                parts.append(f"peak memory one run {r['peak_one_gib']:.1f} GiB, cohort {r['peak_cohort_gib']:.1f} GiB")
            return f"{r['args']['student']} + {r['args']['teacher']}, batch {r['args']['batch']}: " + ", ".join(parts)

        rows.append(step("ViT pair as a cohort of 4, compiled (and MKD/KD)",
                         [py, "benchmarks/cohort.py", "--json", f"{d}/cohort.json", *P["cohort"]], 600,
                         cohort_detail, t0, budget))
        rows.append(step("ResNet pair (MKD/KD)", [py, "benchmarks/cohort.py", "--json", f"{d}/resnet.json",
                                                  *P["resnet_pair"]], 300,
                         lambda out: cohort_detail(out, f"{d}/resnet.json", "resnet_pair"), t0, budget))
        rows.append(step("peak memory of the largest run and cohort", [py, "benchmarks/cohort.py", "--json",
                                                                       f"{d}/largest.json", *P["largest"]], 300,
                         lambda out: cohort_detail(out, f"{d}/largest.json", "largest"), t0, budget))
        model, classes, img = P["checkpoint"]
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                f"import gpu_check as G; from pathlib import Path; "
                f"print(json.dumps(G.checkpoint_seconds({model!r}, {classes}, {img}, {device!r}, Path({d!r}))))")

        def ckpt_detail(out):
            r = json.loads(out.strip().splitlines()[-1])
            r["signal_delay_s"], r["fits"] = args.signal_delay, r["seconds"] < 0.5 * args.signal_delay
            measured["checkpoint"] = r
            return (f"{r['model']} with AdamW state, {r['gib']} GiB in {r['seconds']} s: "
                    f"{'within' if r['fits'] else 'NOT within'} half the {args.signal_delay:.0f} s signal delay")

        rows.append(step("checkpoint of the largest run against the requeue signal", [py, "-c", code], 300,
                         ckpt_detail, t0, budget))

        def pipe_detail(out, f=f"{d}/pipeline.json"):
            r = json.loads(Path(f).read_text())
            measured["loader"] = r
            return ", ".join(f"{x['recipe']} {x['mkd_img_s_per_core']:.0f} img/s/core ({x['ratio']:.2f}x timm)"
                             for x in r["rows"]) + f", {r['workers']} workers"

        rows.append(step("input pipeline, fixed workers, 100 batches",
                         [py, "benchmarks/pipeline.py", "--device", device, "--json", f"{d}/pipeline.json",
                          *P["pipeline"]], 600, pipe_detail, t0, budget))
        teacher = [py, "-m", "mkd.train", "--out", f"{d}/teacher", "student=emb_vit_m", *TINY]
        rows.append(step("teacher for the runs below", teacher, 300))
        run = [py, "-m", "mkd.train", "--out", f"{d}/mkd", "method=mkd", "teacher=emb_vit_m", "compile=on",
               "amp=bf16", "drop_path=0.1", f"teacher_checkpoint={d}/teacher/model.pt", *TINY]

        def top1(out):
            return next((l for l in out.splitlines() if l.startswith("done:")), "").strip()

        rows.append(step("MKD run, compile=on amp=bf16", run, 600, top1))
        ddp = [py, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=0", "-m", "mkd.train",
               "--out", f"{d}/ddp", "method=mkd", "teacher=emb_vit_m", f"teacher_checkpoint={d}/teacher/model.pt",
               *TINY]
        rows.append(step(f"DDP, 1 process ({'nccl' if gpu else 'gloo'})", ddp, 300, top1))
    total = round(time.time() - t0, 1)
    measured.update(rows=rows, seconds=total)
    print(f"GPU acceptance check on {name} ({device}): {total} s")
    print("| step | result | seconds | detail |")
    print("|---|---|---|---|")
    for r in rows:
        res = "skipped" if r.get("skipped") else ("ok" if r["ok"] else "FAIL")
        print(f"| {r['step']} | {res} | {r['seconds']} | {r['detail']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=1))
    if args.record:
        if not gpu:
            print("--record: nothing recorded on a CPU (the tiny scale's CPU rates come from benchmarks/prices.py "
                  "--calibrate-cpu)", file=sys.stderr)
        else:
            from mkd.cost import MEASURED_DIR

            MEASURED_DIR.mkdir(parents=True, exist_ok=True)
            out = MEASURED_DIR / f"{measured['card']}.json"
            out.write_text(json.dumps(measured, indent=1) + "\n")
            print(f"recorded {out}: --dry-run prices {measured['card']} with these rates")
    return 0 if all(r["ok"] for r in rows) else 1


def selfcheck_detail(out: str) -> str:
    errs = [l.split()[0] + " " + l.split()[3] for l in out.splitlines() if "rel. error" in l]
    return ", ".join(errs)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
