#!/usr/bin/env python
"""GPU acceptance check in one command: ``python benchmarks/gpu_check.py`` (``make gpu-check``).

On a GPU (about 6 minutes on one card): the hypergradient self-check on CUDA (fp32, drop path and dropout, a
BatchNorm student; bf16 meta forwards against fp32), ``perf.py`` at batch 128 and 256 (ViT-T student, ViT-B
teacher, 224 px, bf16, compiled; ``--record`` keeps the KD step's MFU for the cost model), the input pipeline
against timm's loader (``pipeline.py``, normalisation on the GPU), a cohort of four runs against the four alone
(``cohort.py``: ViT-L/16 teacher, DeiT-Ti student, 224 px: step-time ratio and peak memory), a
short MKD run with ``compile=on amp=bf16``, and a one-process DDP run through torchrun (NCCL).  On a CPU the same
steps run at the embedded scale (tiny models, ``compile=on``, bf16 autocast, gloo), so CI exercises the GPU path's
code on every submission.  Prints one summary table; exit 1 if any step failed.
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


def step(name: str, cmd: list[str], timeout: int, parse=None) -> dict:
    t = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        ok, out = p.returncode == 0, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        ok, out = False, f"timed out after {timeout}s"
    lines = [l for l in out.splitlines() if l.strip() and "warn" not in l.lower()]
    why = next((l for l in reversed(lines) if "FAIL" in l or "rror" in l), lines[-1] if lines else "")
    detail = parse(out) if ok and parse else ("" if ok else why.strip()[:160])
    return {"step": name, "ok": ok, "seconds": round(time.time() - t, 1), "detail": detail}


def selfcheck_detail(out: str) -> str:
    errs = [l.split()[0] + " " + l.split()[3] for l in out.splitlines() if "rel. error" in l]
    return ", ".join(errs)


def record_mfu(device_name: str, perf_json: str) -> None:
    from mkd.cost import MEASURED, PEAK_TFLOPS

    r = json.loads(Path(perf_json).read_text())
    card = next((c for c in PEAK_TFLOPS if c in device_name), None)
    mfu = (r.get("ratios") or {}).get("core_kd_mfu")
    if card and mfu:
        rec = json.loads(MEASURED.read_text()) if MEASURED.is_file() else {}
        rec[card] = {"mfu": mfu, "source": f"benchmarks/perf.py batch 256, {r['student']} / {r['teacher']} KD step, "
                                           f"{device_name}, torch {r['torch']}, {time.strftime('%Y-%m-%d')}"}
        MEASURED.write_text(json.dumps(rec, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when a GPU is visible)")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--record", action="store_true",
                    help="on a GPU: record the KD step's measured MFU in benchmarks/measured_throughput.json (the "
                         "plan's cost model then uses it for that card)")
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible: use --device cpu", file=sys.stderr)
        return 2
    gpu = device == "cuda"
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    py = sys.executable
    rows = []
    for extra in (["--dtype", "float32", "--drop-path", "0.1", "--dropout", "0.1"],
                  ["--dtype", "float32", "--student", "emb_deit_s_distilled", "--drop-path", "0.1", "--lookahead", "adam"],
                  ["--dtype", "float64", "--student", "emb_resnet", "--drop-path", "0.1", "--dropout", "0.1"],
                  # the meta forwards in bf16 against fp32 (mkd.meta_precision=auto runs ViTs' in the loop's bf16)
                  ["--dtype", "float32", "--amp", "bf16", "--drop-path", "0.1"],
                  ["--dtype", "float32", "--amp", "bf16", "--student", "emb_deit_s_distilled", "--drop-path", "0.1",
                   "--lookahead", "adam"]):
        rows.append(step(f"selfcheck {' '.join(extra)}", [py, "-m", "mkd.selfcheck", "--device", device,
                                                          *extra], 300, selfcheck_detail))
    with tempfile.TemporaryDirectory() as d:
        for batch in (128, 256):
            perf = [py, "benchmarks/perf.py", "--device", device, "--json", f"{d}/perf{batch}.json"]
            perf += ["--batch", str(batch)] if gpu else ["--batch", str(batch // 4), "--steps", "8", "--repeats", "1"]

            def perf_detail(out, f=f"{d}/perf{batch}.json"):
                r = json.loads(Path(f).read_text())
                ratios = r.get("ratios") or {}
                keys = ("mkd_epoch_over_kd_epoch", "core_kd_over_reference_kd", "kd_speedup_from_teacher_cache",
                        "core_kd_mfu")
                return ", ".join(f"{k} {ratios[k]:.3f}" for k in keys if k in ratios) or "ok"

            rows.append(step(f"perf batch {batch if gpu else batch // 4}", perf, 600, perf_detail))
        if gpu and args.record:
            record_mfu(name, f"{d}/perf256.json")
        pipe = [py, "benchmarks/pipeline.py", "--device", device, "--json", f"{d}/pipeline.json"]
        pipe += [] if gpu else ["--images", "300", "--batches", "3", "--batch", "16", "--workers", "1"]

        def pipe_detail(out, f=f"{d}/pipeline.json"):
            r = json.loads(Path(f).read_text())
            return ", ".join(f"{x['recipe']} {x['mkd_img_s_per_core']:.0f} img/s/core ({x['ratio']:.2f}x timm)"
                             for x in r["rows"])

        rows.append(step("input pipeline (JPEG 224 px, uint8 to the device)", pipe, 600, pipe_detail))
        # a cohort of 4 (kd, ctkd, mkd, dkd) against the 4 runs alone: ViT-L/16 teacher, DeiT-Ti student, 224 px
        coh = [py, "benchmarks/cohort.py", "--json", f"{d}/cohort.json"]
        coh += ["--batch", "64", "--steps", "10"] if gpu else \
            ["--teacher", "vit_small_patch16_224", "--img", "64", "--steps", "2", "--repeats", "1"]

        def cohort_detail(out, f=f"{d}/cohort.json"):
            r = json.loads(Path(f).read_text())
            return (f"cohort / separate {r['ratio']:.2f}x with {r['args']['teacher']} at {r['args']['img']} px (the "
                    f"target, <= 0.40x, is for vit_large_patch16_224 at 224 px), peak memory cohort / one run "
                    f"{r['peak_cohort_gib'] / r['peak_one_gib']:.2f}x")

        rows.append(step("cohort of 4 (one teacher forward per step)", coh, 600, cohort_detail))
        run = [py, "-m", "mkd.train", "--out", f"{d}/mkd", "method=mkd", "teacher=emb_vit_m", "compile=on",
               "amp=bf16", "drop_path=0.1", *TINY]
        teacher = [py, "-m", "mkd.train", "--out", f"{d}/teacher", "student=emb_vit_m", *TINY]
        rows.append(step("teacher for the runs below", teacher, 300))
        run.append(f"teacher_checkpoint={d}/teacher/model.pt")

        def top1(out, res=None):
            return next((l for l in out.splitlines() if l.startswith("done:")), "").strip()

        rows.append(step("MKD run, compile=on amp=bf16", run, 600, top1))
        ddp = [py, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=0", "-m", "mkd.train",
               "--out", f"{d}/ddp", "method=mkd", "teacher=emb_vit_m", f"teacher_checkpoint={d}/teacher/model.pt",
               *TINY]
        rows.append(step(f"DDP, 1 process ({'nccl' if gpu else 'gloo'})", ddp, 300, top1))
    print(f"GPU acceptance check on {name} ({device})")
    print("| step | result | seconds | detail |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {'ok' if r['ok'] else 'FAIL'} | {r['seconds']} | {r['detail']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
