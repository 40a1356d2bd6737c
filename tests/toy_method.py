"""A method added the documented way, as a test: one file with its options section and a registration.

``MKD_METHODS=toy_method`` (with tests/ on PYTHONPATH) makes every process of a suite import it.
"""
from __future__ import annotations

from dataclasses import dataclass

from mkd.methods import register
from mkd.methods.base import Method
from mkd.methods.common import hard_label_ce, heads, kd_term
from mkd.options import option


@dataclass
class ToyConfig:
    """Options of the toy method."""

    tau: float = option(2.0, "the one temperature of its KD term")
    beta: float = option(0.3, "weight of its KD term")


@register(sections={"toy": ToyConfig})
class Toy(Method):
    """CE on the hard labels (both images of a Mixup/CutMix pair, by the mixing weight) plus beta times KD at one
    temperature."""

    name, label, order = "toy", "Toy KD", 5
    options = ("toy",)

    def forward(self, out, batch):
        cls, dist = heads(out)
        t = self.cfg.toy
        return self._mix(hard_label_ce(cls, batch), kd_term(dist, batch.teacher_logits, t.tau, t.tau), t.beta, "kd")
