"""What a plan costs before it is submitted, as a range (low-high), and what binds each unit of work.

A unit is one process: a run, or a cohort (``mkd/cohort.py``: one teacher forward and one decoded batch per step for
all its members).  Its time is the slowest of three pipelines, each priced low-high:

- **GPU**: training images / the student's training rate (plus what the method adds: ``Method.extra_student_forwards``
  forwards at a third of a training step each), the teacher's forward / its inference rate unless the stream cache
  or the cohort's first member computes it, evaluation (and a validated teacher's one pass) at inference rates, and
  at least ``STEP_FLOOR`` seconds per optimizer step of each member (launches, Python, the optimizer).
- **decode**: the images the CPU workers decode and augment (training, MKD's meta batches, evaluation) / (cores per
  GPU x images/s per core of the recipe, ``PER_CORE``).
- **I/O** (ImageNet folders): the JPEG bytes read / the storage bandwidth per GPU (``IO_MB_S``; a staged copy on
  node-local disk reads the shared filesystem once, then local disk).

Rates (images/s per GPU): a rate ``gpu_check.py --record`` measured on the priced card (``benchmarks/measured/``) is
used as it is (±10%); otherwise ``benchmarks/throughput.csv``'s prior, a published timm benchmark on an RTX 3090,
scaled by the card's factor (``CARDS``: the ratio of dense bf16 tensor peaks times the share of it a large card
reaches on these models relative to the RTX 3090, 0.2-0.45); a model with no row is priced from its FLOPs
(``torch.utils.flop_counter`` on the meta device) at an MFU of ``FALLBACK_MFU``.  On a CPU (the tiny scale) rates
are measured rows for the embedded models, per thread, and the price is in CPU-minutes.
Pricing needs no dataset and no network: image counts are the datasets' published sizes.
"""
from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import methods

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT = ROOT / "benchmarks" / "throughput.csv"
MEASURED_DIR = ROOT / "benchmarks" / "measured"  # <card>.json: benchmarks/gpu_check.py --record
REFERENCE_CARD = "RTX 3090"
# dense bf16/fp16 tensor peaks, TFLOP/s (vendor data sheets: SXM parts; the RTX 3090's fp16 with fp32 accumulate)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "V100": 125.0, "RTX 3090": 71.0}
UTILISATION = (0.20, 0.45)  # a datacentre card's share of peak on these models, relative to the RTX 3090's
CARDS = {c: (p / PEAK_TFLOPS[REFERENCE_CARD] * UTILISATION[0], p / PEAK_TFLOPS[REFERENCE_CARD] * UTILISATION[1])
         for c, p in PEAK_TFLOPS.items() if c != REFERENCE_CARD}
MEASURED_SPREAD = (0.9, 1.1)  # a measured rate, priced within ±10%
FALLBACK_MFU = (0.15, 0.40)  # a model without a row: its FLOPs at this share of the card's peak
STEP_FLOOR = {"cuda": (0.003, 0.008), "cpu": (0.0, 0.0)}  # seconds per optimizer step and member
# images/s per CPU core, decode + augmentation (ImageNet JPEGs at 224 px: benchmarks/pipeline.py, docs/gpu_scales.md;
# CIFAR-100's 32 px arrays: assumed); a card's measured loader rows replace the ImageNet ones (``per_core``)
PER_CORE = {"imagenet": {"strong": (330.0, 420.0), "medium": (340.0, 430.0), "weak": (600.0, 680.0),
                         "none": (440.0, 470.0)},
            "cifar100": {"strong": (1500.0, 3000.0), "medium": (1500.0, 3000.0), "weak": (4000.0, 8000.0),
                         "none": (6000.0, 12000.0)},
            # the embedded 16 px images on one CPU thread, in the run's own thread (tiny): the quartiles of the
            # reference runs that filled their stream's input cache (docs/reference/runs, commit b0e9c29, Intel
            # Xeon): their time less the measured compute rates' share, over the images they decoded
            "embedded": {"strong": (4100.0, 4700.0), "medium": (4100.0, 4700.0), "weak": (4700.0, 16000.0),
                         "none": (4700.0, 16000.0)}}
JPEG_KB = 108.0  # ImageNet-1K's mean training JPEG: 138 GB / 1,281,167 images
# MB/s per GPU: a shared filesystem (1.6-6.4 GB/s for a node of 8 GPUs, assumed); node-local NVMe (assumed)
IO_MB_S = {"shared": (200.0, 800.0), "staged": (1000.0, 3000.0)}
DEFAULT_CORES = 10  # CPU cores (loader workers) per GPU: DeiT's and slurm/example_gpu_cluster.yaml's
DATASET_IMAGES = {"cifar100": (50_000, 10_000), "imagenet": (1_281_167, 50_000)}


# ---------------------------------------------------------------------------- what a run processes
def _images(cfg) -> tuple[int, int, int]:
    """(classes, training images per epoch, validation images) the run sees."""
    if cfg.dataset == "embedded":
        e = cfg.embedded
        train, val, classes = e.train_per_class * e.num_classes, e.val_per_class * e.num_classes, e.num_classes
    else:
        (train, val), classes = DATASET_IMAGES[cfg.dataset], (100 if cfg.dataset == "cifar100" else 1000)
    seen = int(train * (1 - cfg.held_out - cfg.tune_holdout) * cfg.fraction) // cfg.batch_size * cfg.batch_size
    return classes, seen, val


def validation_images(cfg) -> int:
    """How many images the run's reported top-1 is measured on."""
    return _images(cfg)[2]


def img_size_of(cfg) -> int:
    return cfg.img_size or {"embedded": cfg.embedded.img_size, "cifar100": 32, "imagenet": 224}[cfg.dataset]


@functools.lru_cache(maxsize=None)
def forward_flops(name: str, kwargs_json: str, num_classes: int, img_size: int) -> float:
    """FLOPs of one forward of one image (2 per multiply-add), counted on the meta device (no weights, no memory,
    no network); on a CPU tensor where the meta device fails (models that read a value: older torch)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .models import create_model

    def count(device: str) -> float:
        with torch.device(device):
            model = create_model(name, num_classes, img_size, **json.loads(kwargs_json))
            x = torch.empty(1, 3, img_size, img_size)
        model.eval()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(x)
        return float(fc.get_total_flops())

    from .errors import UserError

    try:
        return count("meta")
    except (RuntimeError, NotImplementedError, UserError):  # older torch: "Tensor.item() cannot be called on meta
        return count("cpu")  # tensors" (a model that reads a value while it is built)


# ---------------------------------------------------------------------------- rates
@functools.lru_cache(maxsize=None)
def throughput_rows(path: Path = THROUGHPUT) -> tuple:
    if not path.is_file():
        return ()
    lines = [l for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
    return tuple(csv.DictReader(lines))


def arch(name: str) -> str:
    """The architecture a timm name (with its pretrained tag) or preset builds."""
    from .models import PRESETS

    return name if name in PRESETS else name.split(".")[0]


@dataclass(frozen=True)
class Rate:
    low: float  # images/s, pessimistic
    high: float
    source: str


@functools.lru_cache(maxsize=None)
def measured_on(card: str, directory: Path = MEASURED_DIR) -> dict:
    """The card's measurements (``gpu_check.py --record``): {} until the check has run on it."""
    p = directory / f"{card}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _measured_rate(a: str, mode: str, card: str, img_size: int) -> Optional[Rate]:
    """A rate gpu_check measured on this card: the compiled one where there is one; an eager training rate scaled up
    to the compile factor it measured for DeiT-Ti (runs compile on a GPU)."""
    m = measured_on(card)
    rows = [r for r in m.get("rates", []) if arch(r["model"]) == a and r["mode"] == mode
            and int(r["img_size"]) == img_size]
    if not rows:
        return None
    src = f"measured on {m.get('device', card)} by gpu_check.py ({m.get('date')}, commit {m.get('commit')})"
    best = max(rows, key=lambda r: (r["compiled"], r["img_s"]))
    v = float(best["img_s"])
    if best["compiled"] or mode != "train":
        return Rate(v * MEASURED_SPREAD[0], v * MEASURED_SPREAD[1], src)
    pairs = [r for r in m.get("rates", []) if r["mode"] == "train"]
    comp = {r["model"]: r["img_s"] for r in pairs if r["compiled"]}
    eager = {r["model"]: r["img_s"] for r in pairs if not r["compiled"]}
    factor = max((comp[k] / eager[k] for k in comp if k in eager), default=1.0)
    return Rate(v * MEASURED_SPREAD[0], v * max(factor, 1.0) * MEASURED_SPREAD[1], src + " (eager; compiled up to "
                f"{factor:.2f}x)")


def per_core(dataset: str, augment: str, card: str) -> tuple[float, float]:
    """Images/s per loader core for a recipe: what gpu_check measured on the card's host (``loader`` rows of
    ``benchmarks/pipeline.py``, ImageNet JPEGs), within ±10%, else the ``PER_CORE`` prior."""
    table = PER_CORE[dataset]
    if dataset == "imagenet" and card != "cpu":
        rows = {r.get("recipe"): r.get("mkd_img_s_per_core") for r in (measured_on(card).get("loader") or {})
                .get("rows", [])}
        v = rows.get(augment)  # strong, weak (eval rows price nothing here)
        if v:
            return float(v) * MEASURED_SPREAD[0], float(v) * MEASURED_SPREAD[1]
    return table.get(augment, table["weak"])


def rate(model: str, mode: str, card: str, img_size: int, kwargs: Optional[dict] = None, classes: int = 1000,
         path: Path = THROUGHPUT) -> Rate:
    """Images/s per GPU (or per CPU thread, ``card`` 'cpu') for ``model`` training or in inference (``mode``)."""
    a = arch(model)
    recorded = _measured_rate(a, mode, card, img_size) if card != "cpu" else None
    if recorded is not None:
        return recorded
    rows = [r for r in throughput_rows(path) if r["model"] == a and r["mode"] == mode and int(r["img_size"]) == img_size]
    measured = [r for r in rows if r["card"] == card and r["kind"] == "measured"]
    if measured:
        r = measured[-1]
        v = float(r["img_s"])
        return Rate(v * MEASURED_SPREAD[0], v * MEASURED_SPREAD[1], f"measured on {card}: {r['source']}")
    prior = [r for r in rows if r["card"] == REFERENCE_CARD]
    if prior and card in CARDS:
        v, (lo, hi) = float(prior[0]["img_s"]), CARDS[card]
        return Rate(v * lo, v * hi, f"prior: {REFERENCE_CARD} x {lo:.1f}-{hi:.1f} ({prior[0]['source']})")
    flops = forward_flops(model, json.dumps(kwargs or {}, sort_keys=True), classes, img_size)
    per_img = flops * (3 if mode == "train" else 1)
    if card == "cpu":  # scaled by FLOPs from the measured CPU rates of the other models at this size
        ref = [r for r in throughput_rows(path) if r["card"] == "cpu" and r["mode"] == mode
               and int(r["img_size"]) == img_size]
        per_s = sorted(float(r["img_s"]) * forward_flops(r["model"], "{}", classes, img_size) for r in ref)
        if not per_s:
            return Rate(1e-9, 1e-9, f"no CPU rate at {img_size} px in {path.name}: run benchmarks/prices.py "
                                    "--calibrate-cpu RESULTS")
        return Rate(per_s[0] / flops, per_s[-1] / flops,
                    f"the measured CPU models' FLOP rates ({len(per_s)} rows of {path.name}) over its FLOPs")
    peak = PEAK_TFLOPS.get(card, PEAK_TFLOPS["H100"]) * 1e12
    return Rate(peak * FALLBACK_MFU[0] / per_img, peak * FALLBACK_MFU[1] / per_img,
                f"FLOPs at MFU {FALLBACK_MFU[0]:.2f}-{FALLBACK_MFU[1]:.2f} of {card} (no row in {path.name})")


# ---------------------------------------------------------------------------- a unit's price
@dataclass
class Price:
    """Seconds of one GPU (or CPU thread) for a unit, low-high, and what binds it."""

    low: float = 0.0
    high: float = 0.0
    binds: str = "GPU"
    parts: dict = field(default_factory=dict)  # pipeline -> (low, high) seconds
    sources: list = field(default_factory=list)

    def hours(self) -> tuple[float, float]:
        return self.low / 3600, self.high / 3600

    def __add__(self, other: "Price") -> "Price":
        return Price(self.low + other.low, self.high + other.high, self.binds,
                     {k: tuple(a + b for a, b in zip(self.parts.get(k, (0, 0)), other.parts.get(k, (0, 0))))
                      for k in set(self.parts) | set(other.parts)}, self.sources + other.sources)


@dataclass(frozen=True)
class Machine:
    """Where a plan runs: the card (``cpu`` for the tiny scale), CPU cores per GPU and the input's storage."""

    card: str = "H100"
    cores: int = DEFAULT_CORES
    storage: str = "shared"  # shared | staged (the training set copied to node-local disk once per job)

    @property
    def cpu(self) -> bool:
        return self.card == "cpu"


def price_unit(cfgs: list, machine: Machine, teacher_cached: Optional[list[bool]] = None,
               inputs_cached: Optional[list[bool]] = None) -> Price:
    """The price of one unit of work: a run (``cfgs`` of one) or a cohort (one decoded batch and one teacher forward
    per step for every member); ``teacher_cached[i]``: member i reads its teacher's logits from the stream cache;
    ``inputs_cached[i]``: its decoded training batches (on a CPU, where decoding shares the run's thread, a unit
    whose members all read them pays no training decode)."""
    cached = teacher_cached or [False] * len(cfgs)
    inputs_read = all(inputs_cached) if inputs_cached else False
    gpu_lo = gpu_hi = 0.0
    sources = []
    lead = cfgs[0]
    classes, n_train, n_val = _images(lead)
    size = img_size_of(lead)
    card = machine.card
    decoded = 0.0  # images the CPU decodes (once for the unit: its members share the batches)
    teacher_paid = False
    for cfg, is_cached in zip(cfgs, cached):
        classes, n_train, n_val = _images(cfg)
        steps = cfg.epochs * (n_train // cfg.batch_size)
        images = steps * cfg.batch_size
        m = methods.get(cfg.method)
        s_train = rate(cfg.student, "train", card, size, cfg.student_kwargs, classes)
        s_infer = rate(cfg.student, "infer", card, size, cfg.student_kwargs, classes)
        extra = m.extra_student_forwards(cfg) / 3  # extra forwards at a third of a training step each
        evals = (cfg.epochs + cfg.eval_every - 1) // cfg.eval_every if cfg.epochs else 1
        lo = images * (1 + extra) / max(s_train.high, 1e-9) + n_val * evals / max(s_infer.high, 1e-9)
        hi = images * (1 + extra) / max(s_train.low, 1e-9) + n_val * evals / max(s_infer.low, 1e-9)
        sources.append(s_train.source)
        if m.needs_teacher and cfg.teacher and not is_cached and not teacher_paid:
            t = rate(cfg.teacher, "infer", card, size, cfg.teacher_kwargs, classes)
            lo, hi = lo + images / max(t.high, 1e-9), hi + images / max(t.low, 1e-9)
            sources.append(t.source)
            teacher_paid = len(cfgs) > 1  # a cohort's first member computes the teacher's logits for all
        floor = STEP_FLOOR["cpu" if machine.cpu else "cuda"]
        lo, hi = max(lo, steps * floor[0]), max(hi, steps * floor[1])
        gpu_lo, gpu_hi = gpu_lo + lo, gpu_hi + hi
        meta = 0.0
        if m.needs_meta_split and steps:
            meta_batch = cfg.mkd.meta_batch_size or max(2, cfg.batch_size // 2)
            meta = steps / cfg.mkd.meta_interval * meta_batch
        decoded = max(decoded, images) + meta + n_val * evals  # members share the training batches
    if machine.cpu and lead.dataset in PER_CORE and not inputs_read:  # decoding in the run's thread: it adds
        per = per_core(lead.dataset, lead.augment, machine.card)
        train_images = max(c.epochs * (_images(c)[1] // c.batch_size) * c.batch_size for c in cfgs)
        gpu_lo, gpu_hi = gpu_lo + train_images / per[1], gpu_hi + train_images / per[0]
    parts = {"CPU" if machine.cpu else "GPU": (gpu_lo, gpu_hi)}
    if not machine.cpu and lead.dataset in PER_CORE:
        per = per_core(lead.dataset, lead.augment, machine.card)
        parts["decode"] = (decoded / (machine.cores * per[1]), decoded / (machine.cores * per[0]))
        if lead.dataset == "imagenet":
            mb = decoded * JPEG_KB / 1024
            bw = IO_MB_S[machine.storage]
            parts["I/O"] = (mb / bw[1], mb / bw[0])
            if machine.storage == "staged" and lead.epochs:  # one copy of the training set per job, from shared storage
                copy = n_train * JPEG_KB / 1024
                parts["I/O"] = tuple(p + copy / b for p, b in zip(parts["I/O"], IO_MB_S["shared"][::-1]))
    binds = max(parts, key=lambda k: parts[k][1])
    low = max(v[0] for v in parts.values())
    high = max(v[1] for v in parts.values())
    return Price(low, high, binds, parts, sources)


def price_runs(runs: list, machine: Machine) -> Price:
    """The price of a unit of a plan's runs (``mkd.suites.Run``: its config and which stream caches it reads)."""
    return price_unit([r.config for r in runs], machine, [r.reads_logits for r in runs],
                      [r.reads_inputs for r in runs])


def per_seed_prices(plan, machine: Machine) -> dict[str, list[float]]:
    """What one more seed of each method costs in a plan (seconds, low-high): its students' units, finals still
    waiting for their tuning included, a cohort's price shared among its members, over the plan's seeds."""
    students = plan.students + plan.waiting
    seeds = len({r.config.seed for r in students}) or 1
    per: dict[str, list[float]] = {}
    for u in plan.units() + [[r] for r in plan.waiting]:
        if u[0].kind != "student":
            continue
        p = price_runs(u, machine)
        for r in u:
            acc = per.setdefault(r.config.method, [0.0, 0.0])
            acc[0] += p.low / len(u) / seeds
            acc[1] += p.high / len(u) / seeds
    return per


def machine_for(scale: str, card: str = "H100", cores: Optional[int] = None, storage: str = "shared") -> Machine:
    """The tiny scale runs on a CPU (one thread per run); the others on the card."""
    if scale == "tiny":
        return Machine("cpu", 1, storage)
    return Machine(card, cores or DEFAULT_CORES, storage)


def unit_label(machine: Machine) -> str:
    return "CPU-min" if machine.cpu else f"{machine.card} GPU-h"


def in_units(seconds: float, machine: Machine) -> float:
    return seconds / 60 if machine.cpu else seconds / 3600


def check_card(card: str) -> None:
    if card not in CARDS and card != "cpu":
        from .errors import UserError, suggest

        raise UserError(f"--gpu {card} is unknown{suggest(card, list(CARDS))}; known: {', '.join(CARDS)}")
