#!/usr/bin/env python
"""How far the top-k teacher cache is from the full one: ``python benchmarks/topk_cache.py --teacher RUN/model.pt``.

Two measurements, on the embedded data and a trained embedded teacher:

1. On one epoch of a stream (the student's batches as cached by the full run): the KD loss (KL(teacher ||
   student) * T^2, against a fixed student that half agrees with the teacher) from the reconstructed logits vs
   the full ones, at T = 1, 4, 8, and the largest absolute error of the teacher's probabilities at T = 4.
2. KD runs with ``teacher_cache_topk=k`` against the full-logit run: final top-1 (same seed, same stream).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mkd.errors import UserError, cli  # noqa: E402
from mkd.stream_cache import topk_compress, topk_expand  # noqa: E402


def kd_loss(t_logits, s_logits, T):
    return F.kl_div(F.log_softmax(s_logits / T, -1), F.softmax(t_logits / T, -1), reduction="batchmean") * T * T


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/topk_cache.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher model.pt (an emb_vit_* run of this suite)")
    ap.add_argument("--teacher-model", default="emb_vit_l")
    ap.add_argument("--ks", default="1,2,5,10,20", help="k values whose KD loss error is measured")
    ap.add_argument("--train-ks", default="1,5", help="k values (< classes) also trained as KD runs")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--set", nargs="*", default=["batch_size=64", "lr=4e-3", "augment=strong",
                                                 "embedded.val_per_class=250", "eval_every=5"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not Path(args.teacher).is_file():
        raise UserError(f"--teacher {args.teacher} not found: pass a teacher run's model.pt")
    from mkd.config import load_config
    from mkd.train import train

    ks = [int(k) for k in args.ks.split(",")]
    train_ks = {int(k) for k in args.train_ks.split(",") if k}
    base = ["method=kd", f"teacher={args.teacher_model}", f"teacher_checkpoint={args.teacher}",
            f"epochs={args.epochs}", *args.set]
    out = {"ks": ks, "loss": {}, "top1": {}}
    with tempfile.TemporaryDirectory() as tmp:
        full = train(load_config(overrides=base), Path(tmp) / "full", quiet=True)
        out["top1"]["full"] = full["final_top1"]
        # the stream's stored full logits, one epoch, and a student's logits on them (the final student's)
        files = sorted((Path(args.teacher).parent / "teacher_cache").glob("*/epoch0000.rank0.pt"))
        stored = next(d for d in (torch.load(f, weights_only=True) for f in files) if "logits" in d)
        logits = stored["logits"].flatten(0, 1).float()
        g = torch.Generator().manual_seed(0)
        student = logits * 0.5 + torch.randn(logits.shape, generator=g)  # a student that half agrees
        C = logits.shape[-1]
        for k in ks:
            approx = topk_expand(topk_compress(logits, k), C)
            row = {}
            for T in (1.0, 4.0, 8.0):
                a, b = kd_loss(logits, student, T).item(), kd_loss(approx, student, T).item()
                row[f"T={T:g}"] = {"full": round(a, 5), "topk": round(b, 5), "rel_error": round(abs(b - a) / a, 5)}
            row["max_prob_error_T4"] = round(float((F.softmax(approx / 4, -1) - F.softmax(logits / 4, -1)).abs().max()), 5)
            out["loss"][k] = row
            if k < C and k in train_ks:
                res = train(load_config(overrides=base + [f"teacher_cache_topk={k}"]), Path(tmp) / f"k{k}", quiet=True)
                out["top1"][k] = res["final_top1"]
    print(f"teacher {args.teacher_model}, {C} classes; KD loss from top-k logits vs full (relative error), "
          f"max |p_topk - p| at T=4; KD top-1 after {args.epochs} epochs")
    print(f"{'k':>4} {'T=1':>9} {'T=4':>9} {'T=8':>9} {'max dp':>8} {'top-1':>7}")
    for k in ks:
        r = out["loss"][k]
        top1 = out["top1"].get(k, out["top1"]["full"] if k >= C else None)
        top1 = f"{top1:>7.2f}" if top1 is not None else f"{'-':>7}"
        print(f"{k:>4} {r['T=1']['rel_error']:>9.4f} {r['T=4']['rel_error']:>9.4f} {r['T=8']['rel_error']:>9.4f} "
              f"{r['max_prob_error_T4']:>8.4f} {top1}")
    print(f"full logits: top-1 {out['top1']['full']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
