"""What a plan costs before it is submitted: GPU-hours from the models' FLOPs, the images a run processes and a
stated throughput model.

FLOPs: one forward of each model at the run's resolution, counted by ``torch.utils.flop_counter`` on the meta
device (no weights, no memory, no network).  A training image costs the student's forward and backward
(3 forwards), the teacher's forward unless the stream's teacher cache serves it, and what the method adds per
image (``Method.extra_student_forwards``: MKD's look-ahead on the meta batch and its hypergradient forwards).
Evaluation costs one forward per validation image every ``eval_every`` epochs.

Throughput model: ``seconds = max(FLOPs / (peak bf16 dense FLOP/s of the card x MFU), images / (CPU cores per
GPU x images/s per core))``, with MFU 0.40 unless a measured figure for the card is recorded in
``benchmarks/measured_throughput.json``, and the per-core decode-and-augment rates of ImageNet JPEGs at 224 px
that ``benchmarks/pipeline.py`` measured (``PER_CORE``; in-memory CIFAR and embedded images are not bound by it).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import methods

# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; SXM parts)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "V100": 125.0}
DEFAULT_MFU = 0.40
MEASURED = Path(__file__).resolve().parent.parent / "benchmarks" / "measured_throughput.json"
# images/s per CPU core of ImageNet JPEGs at 224 px, by recipe (benchmarks/pipeline.py: docs/gpu_scales.md)
PER_CORE = {"strong": 330.0, "medium": 340.0, "weak": 600.0, "none": 450.0}
DEFAULT_CORES = 10  # CPU cores (loader workers) per GPU: DeiT's and slurm/example_gpu_cluster.yaml's
# training / validation images of the datasets at full size
DATASET_IMAGES = {"cifar100": (50_000, 10_000), "imagenet": (1_281_167, 50_000)}


@functools.lru_cache(maxsize=None)
def forward_flops(name: str, kwargs_json: str, num_classes: int, img_size: int) -> float:
    """FLOPs of one forward of one image (2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .models import create_model

    with torch.device("meta"):
        model = create_model(name, num_classes, img_size, **json.loads(kwargs_json))
        x = torch.empty(1, 3, img_size, img_size)
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return float(fc.get_total_flops())


def _images(cfg) -> tuple[int, int, int]:
    """(classes, training images per epoch, validation images) the run sees."""
    if cfg.dataset == "embedded":
        e = cfg.embedded
        train, val, classes = e.train_per_class * e.num_classes, e.val_per_class * e.num_classes, e.num_classes
    else:
        (train, val), classes = DATASET_IMAGES[cfg.dataset], (100 if cfg.dataset == "cifar100" else 1000)
    seen = int(train * (1 - cfg.held_out) * cfg.fraction) // cfg.batch_size * cfg.batch_size
    return classes, seen, val


def validation_images(cfg) -> int:
    """How many images the run's reported top-1 is measured on."""
    return _images(cfg)[2]


def img_size_of(cfg) -> int:
    return cfg.img_size or {"embedded": cfg.embedded.img_size, "cifar100": 32, "imagenet": 224}[cfg.dataset]


@dataclass
class RunCost:
    train_pflop: float
    eval_pflop: float
    teacher_share: float  # of the training FLOPs
    train_images: int = 0  # over all epochs
    eval_images: int = 0
    augment: str = "none"
    decodes: bool = False  # JPEG folders: the CPU input pipeline can bound the step

    @property
    def pflop(self) -> float:
        return self.train_pflop + self.eval_pflop

    def gpu_hours(self, flops_per_s: float, cores: int = DEFAULT_CORES) -> tuple[float, float]:
        """(total, evaluation) GPU-hours: each phase at the slower of the GPU and the input pipeline."""
        def phase(pflop: float, images: int, recipe: str) -> float:
            t = pflop * 1e15 / flops_per_s
            return max(t, images / (cores * PER_CORE[recipe])) / 3600 if self.decodes else t / 3600
        ev = phase(self.eval_pflop, self.eval_images, "none")
        return phase(self.train_pflop, self.train_images, self.augment) + ev, ev


def run_cost(cfg, teacher_cached: bool = False) -> RunCost:
    """The FLOPs of one run (``teacher_cached``: another run of the stream computes the teacher's logits)."""
    classes, n_train, n_val = _images(cfg)
    size = img_size_of(cfg)
    f_s = forward_flops(cfg.student, json.dumps(cfg.student_kwargs, sort_keys=True), classes, size)
    method = methods.get(cfg.method)
    f_t = 0.0
    if method.needs_teacher and cfg.teacher and not teacher_cached:
        f_t = forward_flops(cfg.teacher, json.dumps(cfg.teacher_kwargs, sort_keys=True), classes, size)
    per_image = 3 * f_s + f_t + method.extra_student_forwards(cfg) * f_s
    train = per_image * n_train * cfg.epochs
    evals = (cfg.epochs + cfg.eval_every - 1) // cfg.eval_every if cfg.epochs else 1
    return RunCost(train / 1e15, f_s * n_val * evals / 1e15, (f_t * n_train * cfg.epochs) / max(train, 1.0),
                   n_train * cfg.epochs, n_val * evals, cfg.augment, cfg.dataset == "imagenet")


def throughput(gpu: str, mfu: Optional[float] = None) -> tuple[float, str]:
    """(sustained FLOP/s, how it was obtained) for a card."""
    if gpu not in PEAK_TFLOPS:
        from .errors import UserError, suggest

        raise UserError(f"--gpu {gpu} is unknown{suggest(gpu, list(PEAK_TFLOPS))}; known: {', '.join(PEAK_TFLOPS)}")
    if mfu is None and MEASURED.is_file():
        rec = json.loads(MEASURED.read_text()).get(gpu)
        if rec and rec.get("mfu"):
            return PEAK_TFLOPS[gpu] * 1e12 * rec["mfu"], f"MFU {rec['mfu']:.2f} measured ({rec.get('source', '')})"
    mfu = DEFAULT_MFU if mfu is None else mfu
    return PEAK_TFLOPS[gpu] * 1e12 * mfu, f"MFU {mfu:.2f} stated (bf16 peak {PEAK_TFLOPS[gpu]:.0f} TFLOP/s)"

