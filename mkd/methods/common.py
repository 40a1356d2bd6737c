"""Functional pieces every method shares: heads of two-headed students, precision, CE, the KD term, and the
distillation term's options (``kd.*``, used by kd, ctkd and mkd)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..options import option


@dataclass
class KDConfig:
    """The distillation term shared by kd, ctkd and mkd:
    L = (1-alpha)*CE(z_s, y) + alpha * w(tau) * KL(softmax(z_t/tau_t) || softmax(z_s/tau_s)), batchmean
    (or ce_weight*CE + kd_weight*KD when the weights are set apart)."""

    tau: Optional[float] = option(None, "shorthand: one temperature for teacher and student (overrides tau_t, tau_s)")
    tau_t: float = option(4.0, "teacher temperature (kd: fixed; ctkd/mkd: initial value)")
    tau_s: float = option(4.0, "student temperature (kd: fixed; mkd: initial value)")
    alpha: float = option(0.5, "weight of the distillation term; CE on labels gets 1-alpha")
    weight: str = option("tau_prod", "w(tau): tau_prod = tau_t*tau_s (Hinton's tau^2), none = 1", ("tau_prod", "none"))
    ce_weight: Optional[float] = option(None, "weight of CE, when not 1 - alpha (DIST's KD (T=4) baseline: 0.9, "
                                              "configs/strategies/distill/resnet_kdt4.yaml)")
    kd_weight: Optional[float] = option(None, "weight of the distillation term, when not alpha (DIST's KD baseline: 1)")

    def weights(self) -> tuple[float, float]:
        """(CE weight, distillation weight): (1 - alpha, alpha) unless set apart."""
        return (1 - self.alpha if self.ce_weight is None else self.ce_weight,
                self.alpha if self.kd_weight is None else self.kd_weight)

    def check(self, need) -> None:
        need(0 <= self.alpha <= 1, "kd.alpha", f"is {self.alpha}: it must lie in [0, 1]")
        for key, v in (("kd.tau", self.tau), ("kd.tau_t", self.tau_t), ("kd.tau_s", self.tau_s)):
            need(v is None or v > 0, key, f"is {v}: temperatures must be > 0")
        if self.tau is not None:  # resolve the shorthand once
            self.tau_t = self.tau_s = self.tau

    def identity(self) -> dict:
        """What the run id hashes: the resolved pair, not the shorthand."""
        d = {**dataclasses.asdict(self), "tau": None}
        for k in ("ce_weight", "kd_weight"):  # added later: unset, they leave the run ids as they were
            if d[k] is None:
                d.pop(k)
        return d


PER_STEP_BELOW = 5.0  # a ramp shorter than this many epochs rises per step (its official per-epoch form is too coarse)


def ramp_position(progress, fraction: float, per_step_below: float = PER_STEP_BELOW) -> float:
    """Where an epoch-counted ramp over ``fraction`` of training stands before a step, in [0, 1].

    The official form (DKD's ``min(epoch / warmup, 1)``, CTKD's cosine position ``min(epoch, L) / L``) counts 1-based
    epochs and holds within one; it is kept exactly when the ramp spans ``W = fraction x epochs >= per_step_below``
    epochs.  A shorter ramp (a run shortened below the recipe's length) rises per step instead,
    ``min((step + 1) / (W x steps per epoch), 1)``: counted in epochs it would be at 1 from the first step
    (``W < 1``) or rise in a few coarse stairs, so a short run would not warm up at all."""
    w = fraction * progress.epochs
    if w <= 0:
        return 1.0
    if w >= per_step_below:
        return min((progress.epoch + 1) / w, 1.0)
    return min((progress.step + 1) / (w * max(1, progress.steps_per_epoch)), 1.0)


def check_temperature_range(section: str, lo: float, hi: float, need) -> None:
    """A learnable temperature's bounds: both positive, upper above lower (``need(cond, key, message)``)."""
    need(lo > 0, f"{section}.tau_min", f"is {lo}: temperature bounds must be > 0")
    need(hi > lo, f"{section}.tau_max", f"is {hi}: it must exceed {section}.tau_min={lo}")


def heads(out: Tensor | tuple) -> tuple[Tensor, Tensor]:
    """(class-head logits, distillation-head logits); the same tensor twice for single-head students."""
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, out


def eval_logits(out: Tensor | tuple) -> Tensor:
    """The prediction of a possibly two-headed student (DeiT averages the heads)."""
    if isinstance(out, (tuple, list)):
        return (out[0] + out[1]) / 2
    return out


def fp32(t: Tensor) -> Tensor:
    """Upcast half precision (autocast outputs) for the softmax; float64 stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def mean_over_ranks(tensors: list[Tensor]) -> list[Tensor]:
    """The mean of each tensor over DDP processes (one all-reduce); unchanged in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, i = [], 0
    for t in tensors:
        out.append(flat[i: i + t.numel()].view_as(t))
        i += t.numel()
    return out


def ce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against class indices or class distributions, mean over the batch."""
    return F.cross_entropy(fp32(logits), targets)


def _col(t: Tensor | float) -> Tensor | float:
    return t.unsqueeze(-1) if isinstance(t, Tensor) and t.dim() == 1 else t


def kd_term(z_s: Tensor, z_t: Tensor, tau_t: Tensor | float, tau_s: Tensor | float,
            weight: str = "tau_prod") -> Tensor:
    """``w(tau) * KL(softmax(z_t/tau_t) || softmax(z_s/tau_s))`` per sample, then the batch mean (batchmean).

    ``tau_*`` are scalars or per-sample vectors; ``w = tau_t*tau_s`` (Hinton's tau^2 when equal) or 1.
    DeiT's soft distillation averages over all elements instead; ours is the per-sample sum.
    """
    tt, ts = _col(tau_t), _col(tau_s)
    log_pt = F.log_softmax(fp32(z_t) / tt, dim=-1)
    log_ps = F.log_softmax(fp32(z_s) / ts, dim=-1)
    kl = torch.sum(log_pt.exp() * (log_pt - log_ps), dim=-1)
    if weight == "tau_prod":
        w = tau_t * tau_s
        kl = kl * w
    return kl.mean()


def hard_label_ce(logits: Tensor, batch) -> Tensor:
    """Cross-entropy on the hard labels of both images of a Mixup/CutMix pair, weighted by the mixing weight
    (``mkd/batch.Batch``): CE on the mixed targets without label smoothing, written from each image's class."""
    ce = F.cross_entropy(fp32(logits), batch.labels)
    if batch.labels_b is None:
        return ce
    return batch.lam * ce + (1 - batch.lam) * F.cross_entropy(fp32(logits), batch.labels_b)
