"""Named augmentation strengths, built from ``timm.data``.

- ``none``:   resize / centre crop only (the evaluation transform)
- ``weak``:   random resized crop + horizontal flip
- ``medium``: weak + RandAugment rand-m9-mstd0.5-inc1
- ``strong``: the DeiT recipe: RandAugment rand-m9-mstd0.5-inc1, Mixup 0.8, CutMix 1.0, random erasing 0.25,
  label smoothing 0.1

Mixup/CutMix act on a whole batch (``AugmentPreset.batch``) and return soft targets with the hard labels of both
mixed images and the weight (``mkd/batch.Batch``); the loop feeds the teacher the same mixed images.  Targets are class indices when a preset neither mixes nor smooths, class
distributions otherwise; ``F.cross_entropy`` takes both (the index path is the faster one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from timm.data import auto_augment as _aa

from .batch import Batch
from .fields import AUGMENTS
from .errors import UserError, suggest
from .stream import isolated_rng, seed_globals

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    # Pillow >= 12 rejects bits=0, which timm's PosterizeIncreasing emits at high magnitudes (m9 + noise).
    # Keeping 0 bits means a black image, as older Pillow produced.
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    _aa.NAME_TO_OP[_name] = _posterize


@dataclass
class AugmentPreset:
    name: str
    train_transform: Callable
    eval_transform: Callable
    mixup: Optional[Mixup]
    label_smoothing: float
    num_classes: int

    def batch(self, x: torch.Tensor, y: torch.Tensor, seed: Optional[int] = None) -> Batch:
        """Batch-level augmentation: images and int labels -> a ``Batch`` (targets: indices or distributions, the
        hard labels of both mixed images, the mixing weight).

        With ``seed`` the Mixup/CutMix draw (timm's, from the global NumPy generator) is that seed's, and the
        caller's generator states are left as they were (``mkd/stream.py``)."""
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise UserError(f"augment={self.name} mixes pairs and needs an even batch per process, got "
                                f"{x.shape[0]}: pick an even batch_size")
            if seed is None:
                return self._mixed(x, y)
            with isolated_rng():
                seed_globals(seed)
                return self._mixed(x, y)
        if self.label_smoothing:
            return Batch(x, soft_targets(y, self.num_classes, self.label_smoothing), y)
        return Batch(x, y, y)

    def _mixed(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        """timm's ``Mixup.__call__`` in batch mode, step by step, keeping its weight: image i is mixed with
        image B-1-i with weight ``lam`` (CutMix: the area-corrected one)."""
        m = self.mixup
        lam = float(m._mix_batch(x))  # mixes x in place, as __call__ does
        return Batch(x, mixup_target(y, self.num_classes, lam, m.label_smoothing), y, y.flip(0), lam)


def soft_targets(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    off = smoothing / num_classes
    return F.one_hot(y, num_classes).float() * (1.0 - smoothing) + off


@dataclass(frozen=True)
class InputConfig:
    """How a model wants its input: timm's data config (mean, std, evaluation crop, interpolation)."""

    mean: tuple
    std: tuple
    crop_pct: float
    interpolation: str = "bicubic"

    def eval_transform(self, img_size: int) -> Callable:
        return create_transform(input_size=img_size, is_training=False, crop_pct=self.crop_pct,
                                interpolation=self.interpolation, mean=tuple(self.mean), std=tuple(self.std))


def model_input_config(model, default: InputConfig) -> InputConfig:
    """timm's ``resolve_data_config`` of a model (its pretrained config), ``default`` where it says nothing."""
    from timm.data import resolve_data_config

    c = resolve_data_config({}, model=model)
    return InputConfig(tuple(map(float, c.get("mean", default.mean))), tuple(map(float, c.get("std", default.std))),
                       float(c.get("crop_pct", default.crop_pct)), str(c.get("interpolation", default.interpolation)))


def renormalizer(src: InputConfig, dst: InputConfig):
    """``x -> x * a + b`` taking inputs normalised for ``src`` to inputs normalised for ``dst`` (per channel; the
    teacher's own normalisation on the student's batch, as timm's distillation task does); None when equal."""
    if tuple(src.mean) == tuple(dst.mean) and tuple(src.std) == tuple(dst.std):
        return None
    a = torch.tensor([s / d for s, d in zip(src.std, dst.std)]).view(1, -1, 1, 1)
    b = torch.tensor([(ms - md) / d for ms, md, d in zip(src.mean, dst.mean, dst.std)]).view(1, -1, 1, 1)
    return a, b


def build_augment(name: str, img_size: int, mean, std, num_classes: int, crop_pct: float = 1.0,
                  crop_scale: tuple[float, float] = (0.08, 1.0), interpolation: str = "bicubic") -> AugmentPreset:
    """The preset ``name`` sized to the dataset's resolution and normalisation."""
    if name not in AUGMENTS:
        raise UserError(f"unknown augmentation '{name}'{suggest(name, AUGMENTS)}; allowed: {', '.join(AUGMENTS)}")
    common = dict(input_size=img_size, interpolation=interpolation, mean=tuple(mean), std=tuple(std))
    eval_tf = create_transform(is_training=False, crop_pct=crop_pct, **common)
    train_kw = dict(is_training=True, scale=crop_scale, hflip=0.5, color_jitter=None, **common)
    mixup, smoothing = None, 0.0
    if name == "none":
        train_tf = eval_tf
    elif name == "weak":
        train_tf = create_transform(**train_kw)
    elif name == "medium":
        train_tf = create_transform(auto_augment=RAND_AUGMENT, **train_kw)
    else:  # strong: DeiT
        train_tf = create_transform(auto_augment=RAND_AUGMENT, re_prob=0.25, re_mode="pixel", re_count=1, **train_kw)
        smoothing = 0.1
        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                      label_smoothing=smoothing, num_classes=num_classes)
    return AugmentPreset(name, train_tf, eval_tf, mixup, smoothing, num_classes)
