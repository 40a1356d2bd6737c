"""CE: the student trained alone on the labels (both heads of a two-headed student)."""
from __future__ import annotations

from . import register
from .base import Method
from .common import ce_loss, heads


@register
class CE(Method):
    name, label, order, role = "ce", "CE", 0, "baseline"
    needs_teacher = False

    def forward(self, out, batch):
        cls, dist, targets = *heads(out), batch.targets
        ce = ce_loss(cls, targets) if cls is dist else (ce_loss(cls, targets) + ce_loss(dist, targets)) / 2
        return {"ce": ce, "loss": ce}
