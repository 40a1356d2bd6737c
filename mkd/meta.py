"""MKD's meta-learned temperatures and their hypergradient.

Training loss ``L(theta, tau)`` (mkd/losses.py), look-ahead ``theta' = theta - lr * g`` with
``g = grad_theta L(theta, tau)`` (the gradient the real update already computed), meta objective
``L_meta(theta')`` on a held-out batch.  With ``v = grad L_meta(theta')``::

    dL_meta/dtau = -lr * d/dtau [ v . grad_theta L(theta, tau) ]
                 = -lr * d/dtau < dL/dz (z, tau), J_theta z . v >      (tau enters L only through the logits z)

Three implementations of that product, selected by ``mkd.hypergrad``:

- ``exact``: double backward through the network (recomputes g with ``create_graph``);
- ``jvp``:   forward-mode ``dz = J v`` (``torch.func.jvp``), then a derivative on the logits alone;
- ``fd``:    ``dz ~ (z(theta + eps v) - z(theta - eps v)) / 2 eps``: two forwards, no autograd through the
  network (run in fp32; ``eps = fd_eps / |v|``).

Fused scaled-dot-product attention has neither double backward nor forward-mode AD, so ``exact`` and ``jvp``
switch timm's ``fused_attn`` off for their own computation and restore it.  ``temperatures`` are stored as
``log tau`` (positive by construction), projected onto ``[tau_min, tau_max]`` after each Adam update.

``python -m mkd.meta --selfcheck`` compares the three against each other and ``exact`` against a finite
difference of the real meta loss in log tau.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .config import MKDConfig
from .losses import eval_logits, fp32


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


def _mean_over_ranks(tensors: list[Tensor]) -> list[Tensor]:
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


def lookahead_meta_grad(student: nn.Module, names: list[str], params: list[Tensor], g: list[Tensor], lr: float,
                        xm: Tensor, ym: Tensor, objective: str, teacher_m: Optional[Tensor],
                        autocast=contextlib.nullcontext) -> tuple[list[Tensor], Tensor]:
    """``v = grad L_meta(theta - lr g)`` and the meta loss (one forward/backward on the meta batch)."""
    theta = [(p.detach() - lr * gi.detach()).requires_grad_(True) for p, gi in zip(params, g)]
    with autocast():
        out = functional_call(student, dict(zip(names, theta)), (xm,))
    loss = meta_objective(eval_logits(out), ym, objective, teacher_m)
    v = torch.autograd.grad(loss, theta, allow_unused=True)
    return [torch.zeros_like(p) if vi is None else vi for p, vi in zip(params, v)], loss.detach()


def hypergradient(mode: str, student: nn.Module, x: Tensor, targets: Tensor, teacher_logits: Optional[Tensor],
                  temps: LearnedTemperatures, loss_fn: LossFn, lr: float, xm: Tensor, ym: Tensor, *,
                  objective: str = "ce", teacher_m: Optional[Tensor] = None, out=None,
                  grads: Optional[list[Tensor]] = None, fd_eps: float = 0.01,
                  autocast=contextlib.nullcontext) -> tuple[list[Tensor], Tensor]:
    """d L_meta(theta') / d (log tau_t, log tau_s), and the meta loss.

    ``out`` (the real forward's output) and ``grads`` (the real backward's gradients) are reused when given;
    ``exact`` always recomputes them with a differentiable graph.
    """
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    tparams = list(temps.parameters())

    if mode == "exact":
        with fused_attention_off(student), autocast():
            z = student(x)
            tau_t, tau_s = temps(targets)
            loss = loss_fn(z, teacher_logits, targets, tau_t, tau_s)["loss"]
            g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]
        v, meta_loss = lookahead_meta_grad(student, names, params, g, lr, xm, ym, objective, teacher_m, autocast)
        v = _mean_over_ranks(v)
        with fused_attention_off(student):
            dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
            hyper = torch.autograd.grad(-lr * dot, tparams, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h for p, h in zip(tparams, hyper)], meta_loss

    if grads is None:
        with autocast():
            out = student(x)
            tau_t, tau_s = temps(targets)
            loss = loss_fn(out, teacher_logits, targets, tau_t.detach(), tau_s.detach())["loss"]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, grads)]
    v, meta_loss = lookahead_meta_grad(student, names, params, g, lr, xm, ym, objective, teacher_m, autocast)
    v = _mean_over_ranks(v)
    primals = tuple(p.detach() for p in params)

    def logits_at(*ps):
        return _as_tuple(functional_call(student, dict(zip(names, ps)), (x,)))

    if mode == "jvp":
        with fused_attention_off(student), autocast():
            z, dz = torch.func.jvp(logits_at, primals, tuple(v))
    elif mode == "fd":
        eps = fd_eps / (torch.sqrt(sum((fp32(vi) ** 2).sum() for vi in v)) + 1e-12)
        with torch.no_grad():
            zp = logits_at(*[p + eps * vi for p, vi in zip(primals, v)])
            zm = logits_at(*[p - eps * vi for p, vi in zip(primals, v)])
        dz = tuple((fp32(a) - fp32(b)) / (2 * eps) for a, b in zip(zp, zm))
        z = _as_tuple(out) if out is not None else None
        if z is None:
            with torch.no_grad(), autocast():
                z = logits_at(*primals)
    else:
        raise ValueError(f"unknown hypergradient mode {mode!r}")

    zs = [fp32(t.detach()).requires_grad_(True) for t in z]
    tau_t, tau_s = temps(targets)
    loss = loss_fn(_untuple(zs), teacher_logits, targets, tau_t, tau_s)["loss"]
    gz = torch.autograd.grad(loss, zs, create_graph=True)
    inner = sum((a * fp32(b.detach())).sum() for a, b in zip(gz, dz))
    hyper = torch.autograd.grad(-lr * inner, tparams, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for p, h in zip(tparams, hyper)], meta_loss


class MetaLearner:
    """Adam on ``log tau`` every ``meta_interval`` steps, from the hypergradient on a held-out batch."""

    def __init__(self, temps: LearnedTemperatures, cfg: MKDConfig, batch_size: int, loss_fn: LossFn):
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
        grads = [p.grad for p in ctx.student.parameters() if p.requires_grad]
        hyper, self.last_meta_loss = hypergradient(
            self.cfg.hypergrad, ctx.student, ctx.x, ctx.targets, ctx.teacher_logits, self.temps, self.loss_fn,
            ctx.lr, xm, ym, objective=self.cfg.objective, teacher_m=teacher_m, out=ctx.student_out,
            grads=None if any(g is None for g in grads) else grads, fd_eps=self.cfg.fd_eps, autocast=ctx.autocast)
        hyper = _mean_over_ranks(hyper)
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


# ---------------------------------------------------------------------------- self-check
def real_meta_loss(student, x, targets, teacher_logits, temps, loss_fn, lr, xm, ym, objective="ce",
                   teacher_m=None) -> Tensor:
    """``L_meta(theta - lr * grad_theta L(theta, tau))`` evaluated for the temperatures' current values."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    with torch.no_grad():
        tau_t, tau_s = temps(targets)
    loss = loss_fn(student(x), teacher_logits, targets, tau_t, tau_s)["loss"]
    g = torch.autograd.grad(loss, params)
    with torch.no_grad():
        out = functional_call(student, {n: p - lr * gi for n, p, gi in zip(names, params, g)}, (xm,))
        return meta_objective(eval_logits(out), ym, objective, teacher_m)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def selfcheck(device: str = "cpu", dtype: str = "float64", lr: float = 0.5, seed: int = 0,
              granularity: str = "global", student_name: str = "emb_vit_s") -> dict[str, float]:
    """Relative errors of jvp and fd against exact, and of exact against a finite difference of the real
    meta loss in log tau, on embedded data with a tiny ViT student and teacher."""
    from .augment import build_augment
    from .config import RunConfig
    from .data import Transformed, load_base
    from .losses import MKD
    from .models import create_model

    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    cfg = RunConfig(method="mkd", teacher="emb_vit_m")
    cfg.mkd.granularity = granularity
    train, _, info = load_base(cfg)
    aug = build_augment("none", info.img_size, info.mean, info.std, info.num_classes)
    ds = Transformed(train, None, aug.eval_transform)
    xs = torch.stack([ds[i][0] for i in range(96)]).to(device, dt)
    ys = torch.tensor([ds[i][1] for i in range(96)], device=device)
    x, y, xm, ym = xs[:64], ys[:64], xs[64:], ys[64:]
    student = create_model(student_name, info.num_classes, info.img_size).to(device, dt).train()
    teacher = create_model("emb_vit_m", info.num_classes, info.img_size).to(device, dt).eval()
    with torch.no_grad():
        tl = 3 * teacher(x)  # sharpen the untrained teacher so the KD term matters
    targets = F.one_hot(y, info.num_classes).to(dt)
    method = MKD(cfg, info.num_classes).to(device, dt)
    with torch.no_grad():  # start away from tau_t == tau_s, where symmetric cancellations can hide bugs
        method.temps.log_tau_t.fill_(math.log(3.0))
        method.temps.log_tau_s.fill_(math.log(5.0))
    temps, loss_fn = method.temps, method.loss_with

    # the real training step: fused attention on, gradients in .grad
    out = student(x)
    tau_t, tau_s = temps(targets)
    loss_fn(out, tl, targets, tau_t.detach(), tau_s.detach())["loss"].backward()
    grads = [p.grad.clone() for p in student.parameters()]
    hg = {}
    for mode in ("exact", "jvp", "fd"):
        h, _ = hypergradient(mode, student, x, targets, tl, temps, loss_fn, lr, xm, ym,
                             out=tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach(),
                             grads=grads, fd_eps=1e-4 if dtype == "float64" else 1e-2)
        hg[mode] = torch.cat([t.reshape(-1) for t in h])
    # finite difference of the real meta loss in each log-tau coordinate
    delta = 1e-5 if dtype == "float64" else 1e-2
    fd_real = []
    for p in temps.parameters():
        for i in range(p.numel()):
            vals = []
            for sgn in (1, -1):
                with torch.no_grad():
                    p.view(-1)[i] += sgn * delta
                vals.append(real_meta_loss(student, x, targets, tl, temps, loss_fn, lr, xm, ym))
                with torch.no_grad():
                    p.view(-1)[i] -= sgn * delta
            fd_real.append((vals[0] - vals[1]) / (2 * delta))
    fd_real = torch.stack(fd_real)
    return {"jvp_vs_exact": _rel(hg["jvp"], hg["exact"]), "fd_vs_exact": _rel(hg["fd"], hg["exact"]),
            "exact_vs_fd_of_meta_loss": _rel(hg["exact"], fd_real), "hypergrad_exact": hg["exact"].tolist(),
            "fd_of_meta_loss": fd_real.tolist()}


TOLERANCES = {"float64": {"jvp_vs_exact": 1e-6, "fd_vs_exact": 1e-4, "exact_vs_fd_of_meta_loss": 1e-4},
              "float32": {"jvp_vs_exact": 1e-3, "fd_vs_exact": 5e-2, "exact_vs_fd_of_meta_loss": 5e-2}}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mkd.meta", description=__doc__.split("\n")[0])
    ap.add_argument("--selfcheck", action="store_true", help="check the hypergradients (exit 1 above tolerance)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--granularity", default="global", choices=["global", "per_class"])
    ap.add_argument("--student", default="emb_vit_s", help="student preset or timm name (16 px input)")
    args = ap.parse_args(argv)
    if not args.selfcheck:
        ap.print_help()
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible: use --device cpu", file=sys.stderr)
        return 2
    res = selfcheck(args.device, args.dtype, granularity=args.granularity, student_name=args.student)
    tol = TOLERANCES[args.dtype]
    ok = True
    print(f"MKD hypergradient self-check ({args.device}, {args.dtype}, granularity={args.granularity}, "
          f"student={args.student})")
    for k, t in tol.items():
        good = res[k] <= t
        ok &= good
        print(f"  {k:<28} rel. error {res[k]:.2e}  (tolerance {t:.0e})  {'ok' if good else 'FAIL'}")
    if not args.granularity == "per_class":
        print(f"  d L_meta / d(log tau_t, log tau_s): exact {['%.4e' % v for v in res['hypergrad_exact']]}, "
              f"finite difference {['%.4e' % v for v in res['fd_of_meta_loss']]}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
