"""DKD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation", arXiv 2203.08679): KD's loss split into a
target-class term (TCKD: the binary split target / all others) and a non-target term (NCKD: the distribution
over the other classes), weighted apart, so that the non-target knowledge is not damped by a confident teacher.

Source of the formula and defaults: github megvii-research/mdistiller, ``mdistiller/distillers/DKD.py`` (the
loss, ``min(epoch / warmup, 1)`` on the 1-based epoch, line 72), ``mdistiller/engine/cfg.py`` (defaults: CE 1,
alpha 1, beta 8, T 4, warmup 20 of 240 CIFAR epochs) and ``configs/imagenet/r34_r18/dkd.yaml`` (ImageNet: beta
0.5, T 1, warmup 1 of 100 epochs, lines 26-30: ``min(epoch / 1, 1)`` is 1 from the first epoch, so the ImageNet
recipe has no warm-up in effect, and the default here is 0 there).  The warm-up is a fraction of training
(``common.ramp_position``): the official per-epoch factor at the official lengths, a per-step ramp where a
shortened run leaves it under five epochs.

Mixup/CutMix (the official code has none): an image mixed from classes ``a`` (weight ``lam``) and ``b`` has two
true classes, so by default its DKD term is ``lam * DKD(target a) + (1 - lam) * DKD(target b)``, the same
weighting that turns CE on the mixed targets into CE on each image's class (``dkd.mix=pair``);
``dkd.mix=dominant`` takes the class with the larger weight as the one target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..options import option
from . import register
from .base import Method, Progress
from .common import PER_STEP_BELOW, ce_loss, fp32, heads, ramp_position


@dataclass
class DKDConfig:
    """``ce_weight * CE + min(e / W, 1) * (alpha * TCKD + beta * NCKD)``, both KL terms times T^2 (official)."""

    alpha: float = option(1.0, "weight of TCKD, the target / non-target binary term (official 1)")
    beta: Optional[float] = option(None, "weight of NCKD, the non-target term; unset: the official 0.5 on ImageNet "
                                         "(r34_r18/dkd.yaml) and 8 elsewhere (cfg.py; some CIFAR pairs use 2 or 6)")
    T: Optional[float] = option(None, "temperature; unset: the official 1 on ImageNet and 4 elsewhere")
    ce_weight: float = option(1.0, "weight of CE on the training targets (official CE_WEIGHT 1)")
    warmup: Optional[float] = option(None, "fraction of training over which the DKD term's weight rises linearly "
                                           "(official: min(e / W, 1), e the 1-based epoch, W = warmup x epochs); "
                                           "unset: the official 20 of 240 epochs, and 0 on ImageNet (the official "
                                           "1 of 100 epochs gives min(e / 1, 1) = 1 from the first epoch)")
    per_step_below: float = option(5.0, "a warm-up spanning fewer epochs than this rises per step, min((step+1) / "
                                         "(W x steps per epoch), 1), instead of per epoch (a shortened run still "
                                         "warms up); at the official lengths the per-epoch factor is exact")
    mix: str = option("pair", "the target class of a Mixup/CutMix image: pair = both classes, lam-weighted; "
                               "dominant = the class with the larger weight", ("pair", "dominant"))

    def check(self, cfg, need) -> None:
        imagenet = cfg.dataset == "imagenet"  # resolve the recipe's defaults once: the run id hashes the values used
        self.beta = (0.5 if imagenet else 8.0) if self.beta is None else self.beta
        self.T = (1.0 if imagenet else 4.0) if self.T is None else self.T
        self.warmup = (0.0 if imagenet else 20 / 240) if self.warmup is None else self.warmup
        need(self.T > 0, "dkd.T", f"is {self.T}: it must be > 0")
        need(self.alpha >= 0 and self.beta >= 0, "dkd.beta", "alpha and beta must be >= 0")
        need(0 <= self.warmup <= 1, "dkd.warmup", f"is {self.warmup}: a fraction of the epochs in [0, 1]")
        need(self.per_step_below >= 0, "dkd.per_step_below", "must be >= 0")


def _kl(p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p || q) with 0 log 0 = 0 (``F.kl_div``'s convention)."""
    return (torch.xlogy(p, p) - torch.where(p > 0, p * log_q, torch.zeros_like(p))).sum(dim=-1)


def dkd_terms(z_s: Tensor, z_t: Tensor, target: Tensor, T: float) -> tuple[Tensor, Tensor]:
    """Per-sample (TCKD, NCKD), each a KL times T^2: TCKD between the binary distributions (p(target),
    1 - p(target)); NCKD between the distributions renormalised over the non-target classes."""
    z_s, z_t = fp32(z_s) / T, fp32(z_t) / T
    gt = torch.zeros_like(z_s, dtype=torch.bool).scatter_(1, target[:, None], True)
    p_s, p_t = z_s.softmax(dim=1), z_t.softmax(dim=1)
    b_s = torch.stack([p_s[gt], p_s.masked_fill(gt, 0).sum(dim=1)], dim=1)
    b_t = torch.stack([p_t[gt], p_t.masked_fill(gt, 0).sum(dim=1)], dim=1)
    tckd = _kl(b_t, torch.log(b_s)) * T ** 2
    log_n_s = z_s.masked_fill(gt, float("-inf")).log_softmax(dim=1)
    n_t = z_t.masked_fill(gt, float("-inf")).softmax(dim=1)
    nckd = _kl(n_t, log_n_s) * T ** 2
    return tckd, nckd


def warmup_factor(progress: Progress, warmup: float, per_step_below: float = PER_STEP_BELOW) -> float:
    """The official ``min(epoch / W, 1)`` on the 1-based epoch with ``W`` a fraction of training; per step when ``W``
    is under ``per_step_below`` epochs (``common.ramp_position``)."""
    return ramp_position(progress, warmup, per_step_below)


@register(sections={"dkd": DKDConfig})
class DKD(Method):
    name, label, order, role = "dkd", "DKD", 40, "rival"
    options = ("dkd",)
    fixed_temperature = ("dkd", "T")

    @classmethod
    def check(cls, cfg, need):
        cfg.dkd.check(cfg, need)

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.factor = 1.0

    def on_step(self, progress):
        self.factor = warmup_factor(progress, self.cfg.dkd.warmup, self.cfg.dkd.per_step_below)

    def forward(self, out, batch):
        cls, dist = heads(out)
        c = self.cfg.dkd
        z_t = batch.teacher_logits
        pairs = [(batch.labels, 1.0)]
        if batch.mixed:
            lam = float(batch.lam)
            pairs = [(batch.labels, lam), (batch.labels_b, 1 - lam)] if c.mix == "pair" else \
                [(batch.labels if lam >= 0.5 else batch.labels_b, 1.0)]
        tckd = nckd = 0.0
        for target, w in pairs:
            t, n = dkd_terms(dist, z_t, target, c.T)
            tckd, nckd = tckd + w * t.mean(), nckd + w * n.mean()
        ce = ce_loss(cls, batch.targets)
        term = c.alpha * tckd + c.beta * nckd
        return {"ce": ce, "dkd": term, "tckd": tckd.detach(), "nckd": nckd.detach(),
                "loss": c.ce_weight * ce + self.factor * term}
