"""DeiT hard distillation (Touvron et al., 2021): CE on the teacher's argmax through the distillation head,
mixed with CE on the labels (``hard.alpha``, DeiT's 0.5)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..options import option
from . import register
from .base import Method
from .common import ce_loss, fp32, heads


@dataclass
class HardConfig:
    alpha: float = option(0.5, "weight of CE on the teacher's argmax (DeiT hard distillation: 0.5)")


@register(sections={"hard": HardConfig})
class Hard(Method):
    name, label, order, role = "hard", "hard (DeiT)", 20, "rival"
    options = ("hard",)

    @classmethod
    def check(cls, cfg, need):
        need(0 <= cfg.hard.alpha <= 1, "hard.alpha", f"is {cfg.hard.alpha}: it must lie in [0, 1]")

    def forward(self, out, batch):
        cls, dist = heads(out)
        hard = F.cross_entropy(fp32(dist), batch.teacher_logits.argmax(dim=-1))
        return self._mix(ce_loss(cls, batch.targets), hard, self.cfg.hard.alpha, "hard")
