"""CTKD (Li et al., AAAI 2023): one temperature for teacher and student, learnt adversarially through a
gradient-reversal layer whose strength rises on a cosine; the official code's defaults (github zhengli97/CTKD)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..options import option
from . import register
from .base import Method, Progress
from .common import (PER_STEP_BELOW, ce_loss, check_temperature_range, heads, kd_term, mean_over_ranks,
                     ramp_position)


@dataclass
class CTKDConfig:
    """Curriculum temperature (CTKD, AAAI 2023): one learnable temperature behind a gradient reversal.

    Defaults are the official code's (github zhengli97/CTKD, models/temp_global.py, train_student.py,
    scripts/run_cifar_distill.sh): tau = 1 + 20*sigmoid(p), p starting at 1 (tau 15.62); reversal strength
    (1 - cos(pi*e/L))/2 on the 1-based epoch e, constant within an epoch, over L = 10 of 240 epochs (CIFAR;
    ImageNet: 5 of 120, the same 1/24); p trained by SGD (lr 0.05, momentum 0.9, weight decay 5e-4) following
    the student's learning-rate schedule.  The earlier variant: init=kd schedule=step ramp=0.2 optimizer=student."""

    tau_min: float = option(1.0, "lower end of the temperature range (tau = min + (max-min)*sigmoid(p); official t_start 1)")
    tau_max: float = option(21.0, "upper end of the temperature range (official t_start + t_end = 1 + 20)")
    init: str = option("official", "official: p = 1 (tau = 15.62, the official Global_T's ones(1)); kd: start at kd.tau_t",
                   ("official", "kd"))
    lambda_max: float = option(1.0, "final strength of the gradient reversal (official decay_min -1)")
    ramp: float = option(1 / 24, "fraction of training over which lambda rises (cosine) from 0 to lambda_max "
                                  "(official: 10 of 240 epochs on CIFAR, 5 of 120 on ImageNet)")
    schedule: str = option("epoch", "epoch: lambda from the 1-based epoch index, constant within an epoch (official), "
                                     "per step when the ramp spans fewer than per_step_below epochs; step: a smooth "
                                     "per-step cosine", ("epoch", "step"))
    per_step_below: float = option(5.0, "schedule=epoch: a ramp spanning fewer epochs than this rises per step (a "
                                         "shortened run still ramps); at the official lengths the per-epoch form is exact")
    optimizer: str = option("sgd", "sgd: the temperature's own SGD (lr, momentum, weight_decay below), scaled by the "
                                    "student's schedule, as the official code's shared SGD does; student: a parameter "
                                    "of the student's AdamW (whose normalisation leaves only lambda's sign)",
                             ("sgd", "student"))
    lr: float = option(0.05, "SGD learning rate of p at the schedule's peak (official CIFAR 0.05, ImageNet 0.1)")
    momentum: float = option(0.9, "SGD momentum of p (official 0.9)")
    weight_decay: float = option(5e-4, "SGD weight decay of p (official CIFAR 5e-4, ImageNet 1e-4)")
    weights: str = option("official", "CE / KD weights: cifar = scripts/run_cifar_distill.sh's -r 0.1 -a 0.9, imagenet "
                                      "= run_imagenet_distill.sh's -r 1 -a 1, official = the one of the run's dataset "
                                      "(resolved before the run id is made), kd = KD's (1 - kd.alpha) / kd.alpha",
                          ("official", "cifar", "imagenet", "kd"))

    def resolve(self, cfg) -> None:
        if self.weights == "official":  # the run id hashes the weights used
            self.weights = "imagenet" if cfg.dataset == "imagenet" else "cifar"

    def ce_kd_weights(self, cfg) -> tuple[float, float]:
        if self.weights == "kd":
            return 1 - cfg.kd.alpha, cfg.kd.alpha
        imagenet = self.weights == "imagenet" or (self.weights == "official" and cfg.dataset == "imagenet")
        return (1.0, 1.0) if imagenet else (0.1, 0.9)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


def ctkd_lambda(progress: Progress, lambda_max: float, ramp: float, schedule: str,
                per_step_below: float = PER_STEP_BELOW) -> float:
    """Strength of CTKD's gradient reversal before a step.

    ``epoch`` (official, train_student.py's CosineDecay on the 1-based epoch e): ``(1 - cos(pi*min(e, L)/L))/2``
    with ``L = ramp * epochs``, per step when ``L`` is under ``per_step_below`` epochs (``common.ramp_position``);
    ``step``: the same cosine over the fraction of training done."""
    if schedule == "epoch":
        x = ramp_position(progress, ramp, per_step_below)
    else:
        x = min(1.0, progress.fraction / max(ramp, 1e-8))
    return lambda_max * 0.5 * (1 - math.cos(math.pi * x))


@register(sections={"ctkd": CTKDConfig})
class CTKD(Method):
    """Curriculum temperature KD (AAAI 2023): one temperature ``tau = tau_min + (tau_max - tau_min) * sigmoid(p)``
    for teacher and student, trained adversarially through a gradient reversal of rising strength.

    With ``ctkd.optimizer=sgd`` (official) ``p`` has its own SGD, stepped in ``meta_step`` with the student's
    schedule shape; with ``student`` it joins the student's AdamW."""

    name, label, order, role = "ctkd", "CTKD", 50, "rival"
    options = ("kd", "ctkd")
    learns_temperature = True

    @classmethod
    def check(cls, cfg, need):
        cfg.kd.check(need)
        c = cfg.ctkd
        c.resolve(cfg)
        check_temperature_range("ctkd", c.tau_min, c.tau_max, need)
        need(c.lr > 0 and 0 <= c.momentum < 1, "ctkd.lr", "needs lr > 0 and 0 <= momentum < 1")

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
        self.lam = ctkd_lambda(progress, c.lambda_max, c.ramp, c.schedule, c.per_step_below)

    def forward(self, out, batch):
        cls, dist = heads(out)
        c = self.cfg.ctkd
        tau = c.tau_min + (c.tau_max - c.tau_min) * torch.sigmoid(_GradReverse.apply(self.p, self.lam))
        ce, kd = ce_loss(cls, batch.targets), kd_term(dist, batch.teacher_logits, tau, tau, self.cfg.kd.weight)
        w_ce, w_kd = c.ce_kd_weights(self.cfg)
        return {"ce": ce, "kd": kd, "loss": w_ce * ce + w_kd * kd}

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

    @classmethod
    def initial_temperatures(cls, cfg):
        c = cfg.ctkd
        t = c.tau_min + (c.tau_max - c.tau_min) / (1 + math.exp(-1.0)) if c.init == "official" else cfg.kd.tau_t
        return {"tau_t": t, "tau_s": t}

    def train_parameters(self):
        return [self.p] if self.opt is None else []

    def get_extra_state(self):
        return {"opt": self.opt.state_dict() if self.opt is not None else None}

    def set_extra_state(self, state):
        if self.opt is not None and state.get("opt"):
            self.opt.load_state_dict(state["opt"])
