#!/usr/bin/env python
"""Input-pipeline throughput on a generated JPEG ImageFolder at 224 px: ``python benchmarks/pipeline.py``.

Side by side, in one run, on the same folder: the suite's stream (``mkd.data.TrainStream``: decode and geometric
augmentation in loader workers, uint8 batches, normalisation and random erasing by ``mkd.stream.to_device``)
for the strong (DeiT) and weak recipes and for the evaluation transform, against timm's own ``create_loader``
with its prefetcher (uint8 batches, normalisation and erasing by ``PrefetchLoader``) on the same recipes.
Each loader has ``--workers`` worker processes (one per core); the rate per core is images/s / workers.  Also
prints the CPU cores per GPU each recipe needs to feed ``--target`` images/s.  ``--device cuda`` puts the
device stage (normalisation, erasing) on the GPU, as training does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_folder(root: Path, n: int, classes: int = 10) -> Path:
    """JPEGs of ImageNet's typical size (about 400 x 350) with smooth content (decodes like a photo)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(300, 420)), int(rng.integers(330, 500))
        small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        img.save(d / f"{i}.JPEG", quality=90)
    (root / "val").mkdir(exist_ok=True)
    return root


def rate(batches, n_batches: int, batch: int, warmup: int = 2) -> float:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(n_batches):
        x = next(it)[0]
    if x.is_cuda:
        torch.cuda.synchronize()
    return n_batches * batch / (time.perf_counter() - t)


def ours(root: Path, augment: str, args, device) -> float:
    import torchvision

    from mkd.augment import build_augment
    from mkd.data import TrainSource, TrainStream
    from mkd.stream import normalizer_of, to_device
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    base = torchvision.datasets.ImageFolder(str(root / "train"))
    aug = build_augment(augment if augment != "eval" else "none", 224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                        len(base.classes), 0.875, (0.08, 1.0))
    tf = aug.train_transform if augment != "eval" else aug.eval_transform
    stream = TrainStream(TrainSource(base, np.arange(len(base)), tf), args.batch, 0, 0, 1, args.workers,
                         device.type == "cuda")
    norm = normalizer_of(stream.source)

    def batches():
        epoch = 0
        while True:
            for raw in stream.epoch(epoch):
                yield to_device(raw, device, norm)
            epoch += 1
    return rate(batches(), args.batches, args.batch)


def timm_loader(root: Path, augment: str, args, device) -> float:
    from timm.data import create_dataset, create_loader

    ds = create_dataset("", root=str(root / "train"), is_training=augment != "eval")
    kw = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel") if augment == "strong" else {}
    loader = create_loader(ds, input_size=(3, 224, 224), batch_size=args.batch, is_training=augment != "eval",
                           num_workers=args.workers, device=device, use_prefetcher=True, color_jitter=None,
                           interpolation="bicubic", crop_pct=0.875, persistent_workers=True, **kw)

    def batches():
        while True:
            yield from loader
    return rate(batches(), args.batches, args.batch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=12, help="timed batches per loader (after 2 warm-up batches)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--target", type=float, default=3000.0, help="images/s one GPU consumes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        root = make_folder(Path(d), args.images)
        print(f"generated {args.images} JPEGs in {time.time() - t:.0f}s; {args.workers} workers, batch {args.batch}")
        for augment in ("strong", "weak", "eval"):
            r_ours, r_timm = ours(root, augment, args, device), timm_loader(root, augment, args, device)
            rows.append({"recipe": augment, "mkd_img_s_per_core": r_ours / args.workers,
                         "timm_img_s_per_core": r_timm / args.workers, "ratio": r_ours / r_timm,
                         "cores_per_gpu": args.target / (r_ours / args.workers)})
    import timm

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    print(f"input pipeline, {cpu}, torch {torch.__version__}, timm {timm.__version__}, device stage on {device}")
    print("| recipe | mkd stream img/s per core | timm create_loader img/s per core | mkd / timm | cores per GPU "
          f"for {args.target:.0f} img/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['mkd_img_s_per_core']:.0f} | {r['timm_img_s_per_core']:.0f} | {r['ratio']:.2f} | "
              f"{r['cores_per_gpu']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "workers": args.workers, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
