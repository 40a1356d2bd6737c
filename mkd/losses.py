"""Distillation methods as small loss objects.

A method maps ``(student_out, teacher_logits, targets)`` to a dict of named loss terms, the total under
``"loss"``.  ``targets`` are class indices or class distributions (smoothed or mixed by Mixup/CutMix); the
cross-entropy takes either.  A student with a distillation head (timm ``deit_*_distilled``) returns ``(cls, dist)``
logits in training: CE goes through the class head, the teacher term through the distillation head.

Hooks the loop calls for every method (the loop never branches on a method's name):
``on_step(progress)`` before the forward, ``meta_step(ctx)`` after the backward and before the optimizer
step, ``temperatures()`` for logging, ``train_parameters()`` for parameters the student's optimizer owns.

To add a method: subclass ``Method``, implement ``forward``, add it to ``METHODS``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RunConfig


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


@dataclass(frozen=True)
class Progress:
    """Where training stands before a step (for schedules): global step, 0-based epoch, totals."""

    step: int
    steps_per_epoch: int
    total_steps: int

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)

    @property
    def epoch(self) -> int:
        return self.step // max(1, self.steps_per_epoch)

    @property
    def epochs(self) -> float:
        return self.total_steps / max(1, self.steps_per_epoch)


@dataclass
class StepContext:
    """What a method's ``meta_step`` may use about the current training step."""

    student: nn.Module  # the bare module (not the DDP wrapper), parameters and .grad of this step
    x: Tensor  # the (mixed) input batch of this process
    targets: Tensor
    teacher_logits: Optional[Tensor]
    student_out: Any  # detached output of the real forward
    lr: float  # the student's current learning rate
    step: int  # global step, starting at 0
    autocast: Callable[[], Any]  # context manager factory of the loop's precision
    meta_batches: Any = None  # mkd.data.MetaBatches of the held-out split
    teacher: Optional[nn.Module] = None
    rng: Optional[dict] = None  # RNG state the real forward started from (mkd.meta.capture_rng): replay its masks
    optimizer: Optional[torch.optim.Optimizer] = None  # the student's optimizer (its state, not to be stepped)
    scaler: Any = None  # the fp16 GradScaler, when one is used (gradients of the method's own parameters are scaled)


class Method(nn.Module):
    """Base class: a loss object with optional state (temperatures) and hooks."""

    needs_teacher = True
    learns_temperature = False  # the loop samples temperatures of such methods every log_every steps
    replays_forward = False  # meta_step recomputes the real forward: the loop records the RNG state it started from

    def __init__(self, cfg: RunConfig, num_classes: int):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes

    def forward(self, out, teacher_logits: Optional[Tensor], targets: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def on_step(self, progress: Progress) -> None:
        """Called before each training step with where training stands (schedules)."""

    def meta_step(self, ctx: StepContext) -> None:
        """Called after the backward of each step, before the optimizer step (meta learning)."""

    @property
    def has_meta_step(self) -> bool:
        """Whether the loop must build a StepContext and call meta_step (kept off the plain methods' step)."""
        return type(self).meta_step is not Method.meta_step

    def temperatures(self) -> dict[str, float]:
        """Current temperatures for logging ({} when the method has none)."""
        return {}

    def train_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the student's optimizer (e.g. CTKD's temperature)."""
        return list(self.parameters())

    def _mix(self, ce: Tensor, distill: Tensor, alpha: float, name: str) -> dict[str, Tensor]:
        return {"ce": ce, name: distill, "loss": (1 - alpha) * ce + alpha * distill}


class CE(Method):
    """No teacher: cross-entropy on the labels (both heads of a distilled student)."""

    needs_teacher = False

    def forward(self, out, teacher_logits, targets):
        cls, dist = heads(out)
        ce = ce_loss(cls, targets) if cls is dist else (ce_loss(cls, targets) + ce_loss(dist, targets)) / 2
        return {"ce": ce, "loss": ce}


class KD(Method):
    """Hinton KD with fixed temperatures (one T, or separate tau_t/tau_s)."""

    def forward(self, out, teacher_logits, targets):
        cls, dist = heads(out)
        k = self.cfg.kd
        return self._mix(ce_loss(cls, targets), kd_term(dist, teacher_logits, k.tau_t, k.tau_s, k.weight), k.alpha, "kd")

    def temperatures(self):
        return {"tau_t": self.cfg.kd.tau_t, "tau_s": self.cfg.kd.tau_s}


class Hard(Method):
    """DeiT hard distillation: CE on the teacher's argmax (through the distillation head) mixed with CE on labels."""

    def forward(self, out, teacher_logits, targets):
        cls, dist = heads(out)
        hard = F.cross_entropy(fp32(dist), teacher_logits.argmax(dim=-1))
        return self._mix(ce_loss(cls, targets), hard, self.cfg.hard.alpha, "hard")


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


def ctkd_lambda(progress: Progress, lambda_max: float, ramp: float, schedule: str) -> float:
    """Strength of CTKD's gradient reversal before a step.

    ``epoch`` (official, train_student.py's CosineDecay on the 1-based epoch e): ``(1 - cos(pi*min(e, L)/L))/2``
    with ``L = ramp * epochs``; ``step``: the same cosine over the fraction of training done."""
    if schedule == "epoch":
        L = ramp * progress.epochs
        x = 1.0 if L <= 1e-8 else min(progress.epoch + 1, L) / L
    else:
        x = min(1.0, progress.fraction / max(ramp, 1e-8))
    return lambda_max * 0.5 * (1 - math.cos(math.pi * x))


class CTKD(Method):
    """Curriculum temperature KD (AAAI 2023): one temperature ``tau = tau_min + (tau_max - tau_min) * sigmoid(p)``
    for teacher and student, trained adversarially through a gradient reversal of rising strength.

    With ``ctkd.optimizer=sgd`` (official) ``p`` has its own SGD, stepped in ``meta_step`` with the student's
    schedule shape; with ``student`` it joins the student's AdamW."""

    learns_temperature = True

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        c = cfg.ctkd
        if c.init == "official":
            p0 = 1.0
        else:
            u = min(max((cfg.kd.tau_t - c.tau_min) / (c.tau_max - c.tau_min), 1e-4), 1 - 1e-4)
            p0 = math.log(u / (1 - u))
        self.p = nn.Parameter(torch.tensor(p0))
        self.lam = 0.0
        self.opt = None
        if c.optimizer == "sgd":
            self.opt = torch.optim.SGD([self.p], lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def tau(self) -> Tensor:
        c = self.cfg.ctkd
        return c.tau_min + (c.tau_max - c.tau_min) * torch.sigmoid(self.p)

    def on_step(self, progress):
        c = self.cfg.ctkd
        self.lam = ctkd_lambda(progress, c.lambda_max, c.ramp, c.schedule)

    def forward(self, out, teacher_logits, targets):
        cls, dist = heads(out)
        c = self.cfg.ctkd
        tau = c.tau_min + (c.tau_max - c.tau_min) * torch.sigmoid(_GradReverse.apply(self.p, self.lam))
        return self._mix(ce_loss(cls, targets), kd_term(dist, teacher_logits, tau, tau, self.cfg.kd.weight),
                         self.cfg.kd.alpha, "kd")

    def meta_step(self, ctx):
        if self.opt is None or self.p.grad is None:
            return
        g = mean_over_ranks([self.p.grad])[0]  # p is outside DDP: average its gradient by hand
        if ctx.scaler is not None:
            g = g / ctx.scaler.get_scale()
        self.p.grad = g
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.ctkd.lr * ctx.lr / self.cfg.lr  # the student's schedule, the official peak
        self.opt.step()
        self.p.grad = None  # the student's zero_grad does not reach p

    def temperatures(self):
        t = float(self.tau().detach())
        return {"tau_t": t, "tau_s": t}

    def train_parameters(self):
        return [self.p] if self.opt is None else []

    def get_extra_state(self):
        return {"opt": self.opt.state_dict() if self.opt is not None else None}

    def set_extra_state(self, state):
        if self.opt is not None and state.get("opt"):
            self.opt.load_state_dict(state["opt"])


class MKD(Method):
    """Meta knowledge distillation: KD whose tau_t, tau_s are meta-learned on the held-out split.

    The training loss uses the temperatures as constants; ``meta_step`` (mkd/meta.py) updates them from
    the hypergradient of the meta objective after a one-step look-ahead of the student.
    """

    learns_temperature = True
    replays_forward = True

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        from .meta import LearnedTemperatures, MetaLearner

        m = cfg.mkd
        self.temps = LearnedTemperatures(cfg.kd.tau_t, cfg.kd.tau_s, num_classes, m.granularity, m.tau_min, m.tau_max)
        self.learner = MetaLearner(self.temps, m, cfg.batch_size, self.loss_with)

    def loss_with(self, out, teacher_logits, targets, tau_t, tau_s) -> dict[str, Tensor]:
        cls, dist = heads(out)
        k = self.cfg.kd
        return self._mix(ce_loss(cls, targets), kd_term(dist, teacher_logits, tau_t, tau_s, k.weight), k.alpha, "kd")

    def forward(self, out, teacher_logits, targets):
        tau_t, tau_s = self.temps(targets)
        return self.loss_with(out, teacher_logits, targets, tau_t.detach(), tau_s.detach())

    def meta_step(self, ctx):
        self.learner.step(ctx)

    def temperatures(self):
        return self.temps.values()

    def train_parameters(self):
        return []

    def get_extra_state(self):
        return self.learner.state_dict()

    def set_extra_state(self, state):
        self.learner.load_state_dict(state)


METHODS: dict[str, type[Method]] = {"ce": CE, "kd": KD, "hard": Hard, "ctkd": CTKD, "mkd": MKD}


def build_method(cfg: RunConfig, num_classes: int) -> Method:
    return METHODS[cfg.method](cfg, num_classes)
