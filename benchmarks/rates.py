#!/usr/bin/env python
"""Training and inference images/s of models at given batches: ``python benchmarks/rates.py --model NAME:MODE:BATCH``.

What the plan's cost model (``mkd/cost.py``) needs on a card: for each model a suite trains, its training rate
(forward, backward and an AdamW step, bf16 autocast on a GPU, as the loop runs it) and for each teacher its
inference rate (a forward under no_grad), at the suite's per-GPU batch, at 224 px unless ``--img`` says otherwise.
``MODE`` is ``train``, ``infer``, or ``train+compile`` / ``infer+compile`` (torch.compile, as runs compile on a
GPU).  Batches are random tensors made once on the device: the rate of the model, not of the input pipeline
(``pipeline.py`` measures that).  CNNs run channels_last.  Prints one table; ``--json`` writes its rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mkd.errors import UserError, cli  # noqa: E402


def measure(name: str, mode: str, batch: int, img: int, classes: int, device: torch.device, steps: int,
            repeats: int) -> dict:
    """Images/s of one model: the best of ``repeats`` timings of ``steps`` steps, after warm-up."""
    from mkd.models import create_model, is_vit

    compiled = mode.endswith("+compile")
    train = mode.startswith("train")
    model = create_model(name, classes, img).to(device)
    cnn = not is_vit(model)
    if cnn and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train(train).requires_grad_(train)
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if train else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    x = torch.randn(batch, 3, img, img, device=device)
    if cnn and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)

    def step():
        if train:
            with amp:
                out = fwd(x)
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = torch.nn.functional.cross_entropy(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), amp:
                fwd(x)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    for _ in range(2 if compiled else 1):
        step()
    sync()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        times.append((time.perf_counter() - t) / steps)
    best = min(times)
    del model, opt, fwd
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "mode": mode.split("+")[0], "compiled": compiled, "img_size": img, "batch": batch,
            "img_s": round(batch / best, 1), "ms_per_step": round(1000 * best, 2),
            "spread": round(statistics.pstdev(times) / statistics.mean(times), 3), "warmup_s": round(warm, 1)}


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/rates.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, metavar="NAME:MODE:BATCH",
                    help="e.g. deit_tiny_patch16_224:train+compile:128 (repeatable)")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    rows = []
    for spec in args.model:
        try:
            name, mode, batch = spec.split(":")
            batch = int(batch)
        except ValueError:
            raise UserError(f"--model {spec}: expected NAME:MODE:BATCH, e.g. resnet18:train:32") from None
        if mode not in ("train", "infer", "train+compile", "infer+compile"):
            raise UserError(f"--model {spec}: MODE is train, infer, train+compile or infer+compile")
        rows.append(measure(name, mode, batch, args.img, args.classes, device, args.steps, args.repeats))
        r = rows[-1]
        print(f"{r['model']:<34} {mode:<14} batch {batch:>4}  {r['img_s']:>10,.1f} img/s  {r['ms_per_step']:>8.2f} "
              f"ms/step  (warm-up {r['warmup_s']}s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
