"""MKD (Liu et al., arXiv 2202.07940): KD whose teacher and student temperatures are meta-learned on a
held-out split (the meta machinery and its hypergradients are in mkd/meta.py)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..meta import LearnedTemperatures, MetaLearner, hypergrad_mode
from ..options import option
from . import register
from .base import Method
from .common import ce_loss, check_temperature_range, heads, kd_term


@dataclass
class MKDConfig:
    """Meta-learned teacher/student temperatures (MKD, arXiv 2202.07940), as mkd/meta.py implements them."""

    hypergrad: str = option("auto", "hypergradient: exact (double backward), jvp (forward mode on the logits), fd (two "
                                     "forwards), auto = jvp under bf16/fp16 autocast (GPU), fd in fp32 (CPU)",
                             ("auto", "exact", "jvp", "fd"))
    meta_interval: int = option(8, "update the temperatures every N training steps")
    meta_lr: float = option(0.01, "Adam learning rate of log(tau) for meta_interval=1")
    lr_scaling: str = option("sqrt", "meta_lr x sqrt(meta_interval), x meta_interval (linear) or x 1 (none): "
                                      "keeps the trajectory's pace with fewer updates", ("sqrt", "linear", "none"))
    meta_batch_size: int = option(0, "global meta batch size (0: half of batch_size)")
    objective: str = option("ce", "meta objective on the held-out batch: ce, kd (KL to the teacher at T=1), ce+kd",
                             ("ce", "kd", "ce+kd"))
    granularity: str = option("global", "global: two scalars; per_class: two vectors, indexed by the target class",
                               ("global", "per_class"))
    tau_min: float = option(0.5, "lower clamp of both temperatures")
    tau_max: float = option(20.0, "upper clamp of both temperatures")
    fd_eps: float = option(0.01, "finite-difference step along v, divided by |v| (DARTS' choice)")
    meta_precision: str = option("auto", "precision of the meta forwards (look-ahead, jvp/fd): loop = the loop's "
                                         "autocast (bf16 on GPU), fp32 = full fp32 (fd without TF32), auto = loop for "
                                         "ViTs, fp32 for CNNs (the self-check's bf16 rows: docs/gpu_scales.md)",
                                 ("auto", "loop", "fp32"))
    lookahead: str = option("sgd", "look-ahead step theta' = theta - lr*g (sgd) or with AdamW's current per-parameter "
                                    "scaling, theta - lr*g/(sqrt(v_hat)+eps) (adam), as the student's optimizer steps",
                             ("sgd", "adam"))


@register(sections={"mkd": MKDConfig})
class MKD(Method):
    """Meta knowledge distillation: KD whose tau_t, tau_s are meta-learned on the held-out split.

    The training loss uses the temperatures as constants; ``meta_step`` (mkd/meta.py) updates them from
    the hypergradient of the meta objective after a one-step look-ahead of the student.
    """

    name, label, order, role = "mkd", "MKD", 60, "subject"
    options = ("kd", "mkd")
    needs_meta_split = True
    learns_temperature = True
    replays_forward = True

    @classmethod
    def check(cls, cfg, need):
        cfg.kd.check(need)
        m = cfg.mkd
        check_temperature_range("mkd", m.tau_min, m.tau_max, need)
        need(m.meta_interval >= 1, "mkd.meta_interval", "must be >= 1")
        need(m.meta_lr > 0, "mkd.meta_lr", "must be > 0")
        need(m.meta_batch_size >= 0, "mkd.meta_batch_size", "must be >= 0 (0: batch_size // 2)")
        need(m.fd_eps > 0, "mkd.fd_eps", "must be > 0")
        need(cfg.meta_split > 0, "meta_split", "must be > 0 for method=mkd (it needs held-out data)")

    @classmethod
    def extra_student_forwards(cls, cfg) -> float:
        """Every meta_interval steps: the look-ahead's forward and backward on the meta batch, and dz = J v on the
        training batch: two forwards (fd), a forward with its tangent (jvp, ~3), a forward and a double backward
        (exact, ~5)."""
        m = cfg.mkd
        meta = (m.meta_batch_size or max(2, cfg.batch_size // 2)) / cfg.batch_size
        amp = "off" if cfg.amp == "off" else "bf16"  # the plan's cost is that of the GPU run (amp=auto: bf16)
        return (3 * meta + {"fd": 2, "jvp": 3, "exact": 5}[hypergrad_mode(m.hypergrad, amp)]) / m.meta_interval

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        m = cfg.mkd
        self.temps = LearnedTemperatures(cfg.kd.tau_t, cfg.kd.tau_s, num_classes, m.granularity, m.tau_min, m.tau_max)
        self.learner = MetaLearner(self.temps, m, cfg.batch_size, self.loss_with)

    def loss_with(self, out, teacher_logits, targets, tau_t, tau_s) -> dict[str, Tensor]:
        cls, dist = heads(out)
        k = self.cfg.kd
        return self._weighted(ce_loss(cls, targets), kd_term(dist, teacher_logits, tau_t, tau_s, k.weight), k.weights(),
                              "kd")

    def forward(self, out, batch):
        tau_t, tau_s = self.temps(batch.targets)
        return self.loss_with(out, batch.teacher_logits, batch.targets, tau_t.detach(), tau_s.detach())

    @property
    def meta_batch_size(self):
        return self.learner.meta_batch_size

    def meta_step(self, ctx):
        self.learner.step(ctx)

    def temperatures(self):
        return self.temps.values()

    @classmethod
    def initial_temperatures(cls, cfg):
        m = cfg.mkd
        return {k: min(max(getattr(cfg.kd, k), m.tau_min), m.tau_max) for k in ("tau_t", "tau_s")}

    def train_parameters(self):
        return []

    def get_extra_state(self):
        return self.learner.state_dict()

    def set_extra_state(self, state):
        self.learner.load_state_dict(state)
