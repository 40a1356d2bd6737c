"""MKD's meta-learned temperatures and their hypergradient.

Training loss ``L(theta, tau)`` (mkd/methods/mkd.py), look-ahead ``theta' = theta - lr * g`` with
``g = grad_theta L(theta, tau)`` (the gradient the real update already computed), meta objective
``L_meta(theta')`` on a held-out batch.  With ``v = grad L_meta(theta')``::

    dL_meta/dtau = -lr * d/dtau [ v . grad_theta L(theta, tau) ]
                 = -lr * d/dtau < dL/dz (z, tau), J_theta z . v >      (tau enters L only through the logits z)

Three implementations of that product, selected by ``mkd.hypergrad``:

- ``exact``: double backward through the network (recomputes g with ``create_graph``);
- ``jvp``:   forward-mode ``dz = J v`` (``torch.func.jvp``), then a derivative on the logits alone;
- ``fd``:    ``dz ~ (z(theta + eps v) - z(theta - eps v)) / 2 eps``: two forwards, no autograd through the
  network (``eps = fd_eps / |v|``).

Precision (``mkd.meta_precision``): the look-ahead and the jvp / exact forwards run under the loop's autocast (bf16 on
GPU) or in fp32, fd's two forwards always in fp32 without TF32;
``auto`` picks by the self-check's bf16 rows (``meta_precision``).

Fused scaled-dot-product attention has neither double backward nor forward-mode AD, so ``exact`` and ``jvp``
switch timm's ``fused_attn`` off for their own computation and restore it.  ``temperatures`` are stored as
``log tau`` (positive by construction), projected onto ``[tau_min, tau_max]`` after each Adam update.

Every mode differentiates the loss of the step the student actually took: each extra forward on the
training batch replays the RNG state the real forward started from (same drop-path and dropout masks), runs
with BatchNorm normalising by batch statistics without updating its running ones (no meta computation touches
a buffer), and the meta objective at ``theta'`` is evaluated in eval mode (deterministic, like evaluation).
``lookahead=adam`` preconditions the look-ahead with AdamW's current bias-corrected second moment
``P = 1 / (sqrt(v_hat) + eps)`` (a constant in tau): ``theta' = theta - lr * P*g``; the hypergradient then uses
``P*v`` in place of ``v``, at the cost of a few elementwise operations.

``python -m mkd.selfcheck`` compares the three against each other and ``exact`` against a finite
difference of the real meta loss in log tau.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .methods.common import eval_logits, fp32, mean_over_ranks
from .models import is_vit


# ---------------------------------------------------------------------------- temperatures
class LearnedTemperatures(nn.Module):
    """``log tau_t``, ``log tau_s``: two scalars (global) or two per-class vectors.

    Per class, a sample's temperature is the true class's entry (index targets), or the target distribution
    times the vector (smoothed or Mixup/CutMix targets).
    """

    def __init__(self, tau_t: float, tau_s: float, num_classes: int, granularity: str = "global",
                 tau_min: float = 0.5, tau_max: float = 20.0):
        super().__init__()
        n = 1 if granularity == "global" else num_classes
        self.per_class = granularity == "per_class"
        self.log_min, self.log_max = math.log(tau_min), math.log(tau_max)
        self.log_tau_t = nn.Parameter(torch.full((n,), math.log(tau_t)))
        self.log_tau_s = nn.Parameter(torch.full((n,), math.log(tau_s)))
        self.clamp_()

    def forward(self, targets: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        t, s = self.log_tau_t.exp(), self.log_tau_s.exp()
        if not self.per_class:
            return t[0], s[0]
        if targets.dtype == torch.long:
            return t[targets], s[targets]
        return targets.to(t.dtype) @ t, targets.to(s.dtype) @ s

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in (self.log_tau_t, self.log_tau_s):
            p.clamp_(self.log_min, self.log_max)

    def values(self) -> dict:
        t, s = self.log_tau_t.detach().exp().cpu(), self.log_tau_s.detach().exp().cpu()
        out = {"tau_t": float(t.mean()), "tau_s": float(s.mean())}
        if self.per_class:
            out.update(tau_t_per_class=[round(float(v), 5) for v in t], tau_s_per_class=[round(float(v), 5) for v in s])
        return out


@contextlib.contextmanager
def fused_attention_off(model: nn.Module):
    """Turn timm's fused attention off inside the block (double backward / forward-mode AD need the math path)."""
    mods = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in mods:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in mods:
            m.fused_attn = True


def _as_tuple(out) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _untuple(zs: Sequence[Tensor]):
    return zs[0] if len(zs) == 1 else tuple(zs)





# ---------------------------------------------------------------------------- the step actually taken
def capture_rng(device: torch.device | str) -> dict:
    """The RNG state a forward is about to start from (CPU, and the CUDA device when there is one)."""
    device = torch.device(device)
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


@contextlib.contextmanager
def replayed_rng(rng: Optional[dict], device: torch.device | str):
    """Run the block from the captured RNG state (the same stochastic masks), then restore the current one.

    ``rng=None`` leaves the RNG alone (the caller has no real forward to replay)."""
    if rng is None:
        yield
        return
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        yield


@contextlib.contextmanager
def batchnorm_stats_frozen(model: nn.Module):
    """Train-mode BatchNorm normalises with the batch's statistics (as the real step did) and leaves its
    running statistics and counters untouched (``track_running_stats`` off for the block)."""
    mods = [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in mods:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in mods:
            m.track_running_stats = True


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """``1 / (sqrt(v_hat) + eps)`` of the AdamW step about to be taken: the second moment updated with this step's
    gradient, bias-corrected; parameters without state yet start from ``g^2`` (Adam's first step)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p, g in zip(params, grads):
        group, st = group_of[id(p)], optimizer.state.get(p, {})
        beta2, eps = group["betas"][1], group["eps"]
        g = g.detach()
        if "exp_avg_sq" in st:
            t = float(st["step"]) + 1
            v = (beta2 * st["exp_avg_sq"] + (1 - beta2) * g * g) / (1 - beta2 ** t)
        else:
            v = g * g
        out.append(1.0 / (v.sqrt() + eps))
    return out

# ---------------------------------------------------------------------------- the hypergradient
LossFn = Callable[..., dict]


def meta_objective(logits: Tensor, y: Tensor, objective: str, teacher_logits: Optional[Tensor]) -> Tensor:
    """The held-out objective: CE on labels, KL to the teacher at T=1, or both."""
    logits = fp32(logits)
    loss = logits.new_zeros(())
    if "ce" in objective.split("+"):
        loss = loss + F.cross_entropy(logits, y)
    if "kd" in objective.split("+"):
        log_ps = F.log_softmax(logits, -1)
        log_pt = F.log_softmax(fp32(teacher_logits), -1)
        loss = loss + torch.sum(log_pt.exp() * (log_pt - log_ps), -1).mean()
    return loss


def lookahead_meta_grad(student: nn.Module, names: list[str], params: list[Tensor], step: list[Tensor], lr: float,
                        xm: Tensor, ym: Tensor, objective: str, teacher_m: Optional[Tensor],
                        autocast=contextlib.nullcontext) -> tuple[list[Tensor], Tensor]:
    """``v = grad L_meta(theta - lr * step)`` and the meta loss: one forward/backward on the meta batch, in eval
    mode (no stochastic masks, BatchNorm on its running statistics, nothing updated)."""
    theta = [(p.detach() - lr * d.detach()).requires_grad_(True) for p, d in zip(params, step)]
    with eval_mode(student), autocast():
        out = functional_call(student, dict(zip(names, theta)), (xm,))
    loss = meta_objective(eval_logits(out), ym, objective, teacher_m)
    v = torch.autograd.grad(loss, theta, allow_unused=True)
    return [torch.zeros_like(p) if vi is None else vi for p, vi in zip(params, v)], loss.detach()


def _zeros_for_none(ts, like) -> list[Tensor]:
    return [torch.zeros_like(p) if t is None else t for p, t in zip(like, ts)]


def hypergradient(mode: str, student: nn.Module, x: Tensor, targets: Tensor, teacher_logits: Optional[Tensor],
                  temps: LearnedTemperatures, loss_fn: LossFn, lr: float, xm: Tensor, ym: Tensor, *,
                  objective: str = "ce", teacher_m: Optional[Tensor] = None, out=None,
                  grads: Optional[list[Tensor]] = None, fd_eps: float = 0.01, rng: Optional[dict] = None,
                  precond: Optional[Callable[[list[Tensor]], list[Tensor]]] = None,
                  autocast=contextlib.nullcontext, precision: str = "loop") -> tuple[list[Tensor], Tensor]:
    """d L_meta(theta') / d (log tau_t, log tau_s), and the meta loss.

    ``rng`` is the RNG state the real forward started from (``capture_rng``): every forward on the training batch
    here replays it, so the hypergradient is that of the step taken, masks included.  ``out`` (the real
    forward's output) and ``grads`` (the real backward's gradients) are reused when given; ``exact`` recomputes
    them with a differentiable graph.  ``precond(grads) -> P`` makes the look-ahead ``theta - lr * P*g``
    (``lookahead=adam``); None is plain SGD.  ``precision="loop"``: the look-ahead and the jvp / exact forwards
    run under ``autocast`` (the loop's precision); ``"fp32"``: none does.  fd's two forwards always run in fp32
    without TF32 (their difference is the derivative).
    """
    if mode not in ("exact", "jvp", "fd"):
        raise ValueError(f"unknown hypergradient mode {mode!r}")
    full = precision == "fp32"
    s = _Step(student, x, targets, teacher_logits, temps, loss_fn, lr, rng, contextlib.nullcontext if full else autocast)
    meta = (xm, ym, objective, teacher_m)
    if mode == "exact":
        return _exact(s, meta, precond)
    return _first_order(s, mode, meta, out, grads, fd_eps, precond)


class _Step:
    """The training step whose hypergradient is computed: its batch, loss, parameters and RNG state."""

    def __init__(self, student, x, targets, teacher_logits, temps, loss_fn, lr, rng, autocast):
        self.student, self.x, self.targets, self.teacher_logits = student, x, targets, teacher_logits
        self.temps, self.loss_fn, self.lr, self.rng, self.autocast = temps, loss_fn, lr, rng, autocast
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.tparams = list(temps.parameters())
        self.device = _device_of(student)

    def forward(self, fn, *args):
        """The real step's forward: the same masks, batch statistics, no buffer update."""
        with replayed_rng(self.rng, self.device), batchnorm_stats_frozen(self.student):
            return fn(*args)

    def loss(self, z, detach_tau: bool) -> Tensor:
        tau_t, tau_s = self.temps(self.targets)
        if detach_tau:
            tau_t, tau_s = tau_t.detach(), tau_s.detach()
        return self.loss_fn(z, self.teacher_logits, self.targets, tau_t, tau_s)["loss"]

    def lookahead(self, g: list[Tensor], P: Optional[list[Tensor]], meta) -> tuple[list[Tensor], Tensor]:
        """``v`` (``P*v`` with a preconditioner) at ``theta - lr * P*g``, averaged over DDP processes."""
        step = [gi * pi for gi, pi in zip(g, P)] if P else g
        v, meta_loss = lookahead_meta_grad(self.student, self.names, self.params, step, self.lr, *meta[:2],
                                           meta[2], meta[3], self.autocast)
        v = mean_over_ranks(v)
        return ([vi * pi for vi, pi in zip(v, P)] if P else v), meta_loss

    def d_tau(self, quantity: Tensor) -> list[Tensor]:
        return _zeros_for_none(torch.autograd.grad(quantity, self.tparams, allow_unused=True), self.tparams)


def _exact(s: _Step, meta, precond) -> tuple[list[Tensor], Tensor]:
    """Double backward: ``-lr * d/dtau <g(theta, tau), v>`` through the network."""
    with fused_attention_off(s.student), s.autocast():
        z = s.forward(s.student, s.x)
        g = torch.autograd.grad(s.loss(z, detach_tau=False), s.params, create_graph=True, allow_unused=True)
        g = _zeros_for_none(g, s.params)
    P = precond([gi.detach() for gi in g]) if precond else None
    v, meta_loss = s.lookahead(g, P, meta)
    with fused_attention_off(s.student):
        hyper = s.d_tau(-s.lr * sum((gi * vi).sum() for gi, vi in zip(g, v)))
    return hyper, meta_loss


@contextlib.contextmanager
def full_precision():
    """fp32 matmuls and convolutions without TF32 inside the block (the finite difference's two forwards differ
    in their last bits; TF32 rounds the inputs to 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _first_order(s: _Step, mode: str, meta, out, grads, fd_eps: float, precond) -> tuple[list[Tensor], Tensor]:
    """``dz = J v`` by forward mode (jvp) or two forwards at ``theta +- eps v`` (fd), then
    ``-lr * d/dtau <dL/dz (z, tau), dz>`` on the logits alone."""
    if grads is None:
        with s.autocast():
            out = s.forward(s.student, s.x)
            loss = s.loss(out, detach_tau=True)
        grads = torch.autograd.grad(loss, s.params, allow_unused=True)
    g = _zeros_for_none(grads, s.params)
    v, meta_loss = s.lookahead(g, precond(g) if precond else None, meta)
    primals = tuple(p.detach() for p in s.params)

    def logits_at(*ps):
        return _as_tuple(functional_call(s.student, dict(zip(s.names, ps)), (s.x,)))

    if mode == "jvp":
        # forward-mode AD under autocast fails on a convolution of a dual input (the tangent is not cast): CNNs
        # run it in fp32 (a ViT's only convolution, the patch embedding, sees the plain image)
        amp = s.autocast() if is_vit(s.student) else contextlib.nullcontext()
        with fused_attention_off(s.student), amp:
            z, dz = s.forward(torch.func.jvp, logits_at, primals, tuple(v))
    else:
        eps = fd_eps / (torch.sqrt(sum((fp32(vi) ** 2).sum() for vi in v)) + 1e-12)
        with torch.no_grad(), full_precision():  # in bf16 the difference loses up to 18% (self-check, adam)
            zp = s.forward(logits_at, *[p + eps * vi for p, vi in zip(primals, v)])
            zm = s.forward(logits_at, *[p - eps * vi for p, vi in zip(primals, v)])
        dz = tuple((fp32(a) - fp32(b)) / (2 * eps) for a, b in zip(zp, zm))
        z = _as_tuple(out) if out is not None else None
        if z is None:
            with torch.no_grad(), s.autocast():
                z = s.forward(logits_at, *primals)
    zs = [fp32(t.detach()).requires_grad_(True) for t in z]
    gz = torch.autograd.grad(s.loss(_untuple(zs), detach_tau=False), zs, create_graph=True)
    inner = sum((a * fp32(b.detach())).sum() for a, b in zip(gz, dz))
    return s.d_tau(-s.lr * inner), meta_loss


def meta_precision(setting: str, student: nn.Module) -> str:
    """``auto``: the loop's precision for ViTs, fp32 for CNNs.  Why (``python -m mkd.selfcheck --dtype
    float32 --amp bf16``, docs/gpu_scales.md): with its meta forwards under bf16 autocast a ViT's hypergradient
    stays within 1.1e-2 of the same step's in fp32, a BatchNorm CNN's is off by 5% to 100%."""
    return ("loop" if is_vit(student) else "fp32") if setting == "auto" else setting


def hypergrad_mode(setting: str, amp: str) -> str:
    """``auto``: jvp when the loop runs in reduced precision (a forward and its tangent under autocast: 2e-3 from
    fp32 in the self-check; fd would need two full-fp32 forwards), fd in an fp32 loop (two forwards, the cheapest)."""
    return ("jvp" if amp in ("bf16", "fp16") else "fd") if setting == "auto" else setting


class MetaLearner:
    """Adam on ``log tau`` every ``meta_interval`` steps, from the hypergradient on a held-out batch."""

    def __init__(self, temps: LearnedTemperatures, cfg, batch_size: int, loss_fn: LossFn):
        self.temps, self.cfg, self.loss_fn = temps, cfg, loss_fn
        self.meta_batch_size = cfg.meta_batch_size or max(2, batch_size // 2)
        lr = cfg.meta_lr * {"sqrt": math.sqrt(cfg.meta_interval), "linear": cfg.meta_interval, "none": 1}[cfg.lr_scaling]
        self.opt = torch.optim.Adam(temps.parameters(), lr=lr, eps=1e-12)
        self.updates = 0
        self.last_meta_loss: Optional[Tensor] = None

    def step(self, ctx) -> None:
        if ctx.step % self.cfg.meta_interval:
            return
        xm, ym = ctx.meta_batches.next()
        teacher_m = None
        if "kd" in self.cfg.objective:
            with torch.no_grad(), ctx.autocast():
                teacher_m = ctx.teacher(xm)
        params = [p for p in ctx.student.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        precond = None
        if self.cfg.lookahead == "adam":
            precond = lambda g: adam_preconditioner(ctx.optimizer, params, g)  # noqa: E731
        hyper, self.last_meta_loss = hypergradient(
            hypergrad_mode(self.cfg.hypergrad, ctx.amp), ctx.student, ctx.x, ctx.targets, ctx.teacher_logits, self.temps, self.loss_fn,
            ctx.lr, xm, ym, objective=self.cfg.objective, teacher_m=teacher_m, out=ctx.student_out,
            grads=None if any(g is None for g in grads) else grads, fd_eps=self.cfg.fd_eps, rng=ctx.rng,
            precond=precond, autocast=ctx.autocast, precision=meta_precision(self.cfg.meta_precision, ctx.student))
        hyper = mean_over_ranks(hyper)
        for p, h in zip(self.temps.parameters(), hyper):
            p.grad = h.to(p.dtype)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.temps.clamp_()
        self.updates += 1

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.updates = state["updates"]


