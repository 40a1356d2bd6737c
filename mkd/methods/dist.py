"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher", arXiv 2205.10536):
match the *relations* of the teacher's and student's predictions (Pearson correlations), not the predictions
themselves, so a much stronger teacher's sharper outputs need not be matched exactly.

Source of the formula and defaults: github hunto/image_classification_sota, ``lib/models/losses/dist_kd.py``
(the loss), ``lib/models/losses/kd_loss.py`` (``kd: dist`` is tau 1, ``dist_t4`` tau 4; the total is
``ori_loss_weight * CE + kd_loss_weight * DIST``), ``configs/strategies/distill/resnet_dist.yaml`` (ImageNet:
weights 1 / 2, tau 1) and ``dist_cifar.yaml`` (CIFAR-100: weights 1 / 2, tau 4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..options import option
from . import register
from .base import Method
from .common import ce_loss, fp32, heads


@dataclass
class DISTConfig:
    """DIST's loss ``ce_weight * CE + loss_weight * tau^2 * (beta * inter + gamma * intra)`` (official defaults)."""

    tau: Optional[float] = option(None, "temperature of both softmaxes; unset: the official recipe's, 1 on ImageNet "
                                        "(resnet_dist.yaml, kd: dist) and 4 elsewhere (dist_cifar.yaml, kd: dist_t4)")
    beta: float = option(1.0, "weight of the inter-class relation (row-wise correlation; official 1)")
    gamma: float = option(1.0, "weight of the intra-class relation (column-wise correlation over the batch; official 1)")
    ce_weight: float = option(1.0, "weight of CE on the training targets (official ori_loss_weight 1)")
    loss_weight: float = option(2.0, "weight of the DIST term (official kd_loss_weight 2)")
    eps: float = option(1e-8, "added to the norms' product in the correlation (official 1e-8)")

    def check(self, cfg, need) -> None:
        if self.tau is None:  # resolve the recipe's default once, so the run id hashes the value used
            self.tau = 1.0 if cfg.dataset == "imagenet" else 4.0
        need(self.tau > 0, "dist.tau", f"is {self.tau}: it must be > 0")
        need(self.ce_weight >= 0 and self.loss_weight >= 0, "dist.loss_weight", "weights must be >= 0")


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (the official cosine of the centred
    rows, ``eps`` added to the norms' product)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(z_s: Tensor, z_t: Tensor, tau: float, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """(inter-class, intra-class) relation losses, each ``tau^2 * (1 - mean correlation)``: inter over each image's
    class probabilities, intra over each class's probabilities across the batch (of this process, as the
    official per-GPU batch)."""
    y_s = (fp32(z_s) / tau).softmax(dim=1)
    y_t = (fp32(z_t) / tau).softmax(dim=1)
    inter = tau ** 2 * (1 - pearson_rows(y_s, y_t, eps).mean())
    intra = tau ** 2 * (1 - pearson_rows(y_s.t(), y_t.t(), eps).mean())
    return inter, intra


@register(sections={"dist": DISTConfig})
class DIST(Method):
    name, label, order, role = "dist", "DIST", 30, "rival"
    options = ("dist",)
    fixed_temperature = ("dist", "tau")

    @classmethod
    def check(cls, cfg, need):
        cfg.dist.check(cfg, need)

    def forward(self, out, batch):
        cls, dist = heads(out)
        c = self.cfg.dist
        inter, intra = dist_terms(dist, batch.teacher_logits, c.tau, c.eps)
        ce = ce_loss(cls, batch.targets)
        term = c.beta * inter + c.gamma * intra
        return {"ce": ce, "dist": term, "dist_inter": inter.detach(), "dist_intra": intra.detach(),
                "loss": c.ce_weight * ce + c.loss_weight * term}
