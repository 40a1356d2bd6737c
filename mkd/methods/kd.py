"""KD (Hinton et al., 2015) with fixed temperatures: one T, or separate tau_t / tau_s (``kd.*``)."""
from __future__ import annotations

from . import register
from .base import Method
from .common import KDConfig, ce_loss, heads, kd_term


@register(sections={"kd": KDConfig})
class KD(Method):
    name, label, order, role = "kd", "KD", 10, "reference"
    options = ("kd",)

    @classmethod
    def check(cls, cfg, need):
        cfg.kd.check(need)

    def forward(self, out, batch):
        cls, dist = heads(out)
        k = self.cfg.kd
        return self._weighted(ce_loss(cls, batch.targets),
                              kd_term(dist, batch.teacher_logits, k.tau_t, k.tau_s, k.weight), k.weights(), "kd")

    def temperatures(self):
        return {"tau_t": self.cfg.kd.tau_t, "tau_s": self.cfg.kd.tau_s}

    @classmethod
    def initial_temperatures(cls, cfg):
        return {"tau_t": cfg.kd.tau_t, "tau_s": cfg.kd.tau_s}
