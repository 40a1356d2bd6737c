"""The hypergradient self-check: ``python -m mkd.selfcheck [--drop-path P] [--dropout P] [--student NAME]``.

Compares the three hypergradients (mkd/meta.py) against each other and ``exact`` against a finite difference of
the real meta loss in log tau, on the embedded data with a tiny student (stochastic layers, BatchNorm and the Adam
look-ahead included), and checks that no meta computation changed a buffer.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .augment import build_augment
from .config import RunConfig
from .data import Transformed, load_base
from .meta import (adam_preconditioner, batchnorm_stats_frozen, capture_rng, eval_mode, hypergradient, meta_objective,
                   meta_precision, replayed_rng)
from .methods.common import eval_logits
from .methods.mkd import MKD
from .models import create_model, is_vit


def real_meta_loss(student, x, targets, teacher_logits, temps, loss_fn, lr, xm, ym, objective="ce",
                   teacher_m=None, rng=None, precond: Optional[list[Tensor]] = None) -> Tensor:
    """``L_meta(theta - lr * P*grad_theta L(theta, tau))`` for the temperatures' current values: the training
    forward replays ``rng`` with BatchNorm's running statistics frozen, the meta forward is in eval mode."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    with torch.no_grad():
        tau_t, tau_s = temps(targets)
    with replayed_rng(rng, next(student.parameters()).device), batchnorm_stats_frozen(student):
        z = student(x)
    g = torch.autograd.grad(loss_fn(z, teacher_logits, targets, tau_t, tau_s)["loss"], params)
    if precond is not None:
        g = [gi * pi for gi, pi in zip(g, precond)]
    with torch.no_grad(), eval_mode(student):
        out = functional_call(student, {n: p - lr * gi for n, p, gi in zip(names, params, g)}, (xm,))
        return meta_objective(eval_logits(out), ym, objective, teacher_m)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _buffers(model: nn.Module) -> list[Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def selfcheck(device: str = "cpu", dtype: str = "float64", lr: Optional[float] = None, seed: int = 0,
              granularity: str = "global", student_name: str = "emb_vit_s", drop_path: float = 0.0,
              dropout: float = 0.0, lookahead: str = "sgd", amp: str = "off", img: int = 0) -> dict[str, float]:
    """Relative errors of jvp and fd against exact, and of exact against a finite difference of the real
    meta loss in log tau, on embedded data with a tiny student (stochastic layers and BatchNorm included) and
    teacher; also whether any meta computation changed a buffer.  ``amp=bf16``: the training step runs under bf16
    autocast (as the loop runs it on a GPU) and each mode's hypergradient of that step with its meta forwards in
    bf16 is compared with the same mode's in fp32 (what ``mkd.meta_precision`` chooses between)."""
    torch.manual_seed(seed)
    dev_type = torch.device(device).type
    autocast = (functools.partial(torch.autocast, dev_type, dtype=torch.bfloat16) if amp == "bf16"
                else contextlib.nullcontext)
    dt = getattr(torch, dtype)
    lr = lr or (0.5 if lookahead == "sgd" else 0.01)  # a step of the size each look-ahead takes in training
    cfg = RunConfig(method="mkd", teacher="emb_vit_m")
    cfg.mkd.granularity = granularity
    (x, y, xm, ym), student, info = _batches_and_student(cfg, device, dt, student_name, drop_path, dropout)
    teacher = create_model("emb_vit_m", info.num_classes, info.img_size).to(device, dt).eval()
    with torch.no_grad():
        tl = 3 * teacher(x)  # sharpen the untrained teacher so the KD term matters
    if img:  # the student at a real model's size (DeiT-Ti at 224 px): the images upsampled, the teacher's logits kept
        student = create_model(student_name, info.num_classes, img, drop_path=drop_path).to(device, dt).train()
        x, xm = (F.interpolate(t, size=(img, img), mode="bilinear", align_corners=False) for t in (x, xm))
    targets = F.one_hot(y, info.num_classes).to(dt)
    method = _mkd_away_from_equal_temperatures(cfg, info.num_classes, device, dt)
    temps, loss_fn = method.temps, method.loss_with
    params = [p for p in student.parameters() if p.requires_grad]
    P = None
    opt = _adam_with_a_second_moment(student, params, xm, ym) if lookahead == "adam" else None

    # the real training step: fused attention on, its RNG state recorded, gradients in .grad
    rng = capture_rng(device)
    with autocast():
        out = student(x)
        tau_t, tau_s = temps(targets)
        loss = loss_fn(out, tl, targets, tau_t.detach(), tau_s.detach())["loss"]
    loss.backward()
    grads = [p.grad.clone() for p in params]
    if lookahead == "adam":
        P = adam_preconditioner(opt, params, grads)
    before = _buffers(student)
    def hyper(mode: str, fd_eps: float, precision: str) -> torch.Tensor:
        h, _ = hypergradient(mode, student, x, targets, tl, temps, loss_fn, lr, xm, ym,
                             out=tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach(),
                             grads=grads, fd_eps=fd_eps, rng=rng, precond=(lambda g: P) if P is not None else None,
                             autocast=autocast, precision=precision)
        return torch.cat([t.reshape(-1) for t in h])

    hg = {}
    for mode in ("exact", "jvp", "fd"):
        torch.manual_seed(seed + 1000 + len(hg))  # a different current RNG state for each: replay must not care
        hg[mode] = hyper(mode, 1e-6 if dtype == "float64" else 1e-2, meta_precision("auto", student))
    if amp != "off":  # each mode of the same (bf16) step with its meta forwards in bf16 and in fp32
        hg.update({f"{mode}_{prec}": hyper(mode, 1e-2, prec) for mode in ("exact", "jvp", "fd") for prec in ("loop", "fp32")})
    buffers_changed = any(not torch.equal(a, b) for a, b in zip(before, _buffers(student)))
    # finite difference of the real meta loss in each log-tau coordinate
    fd_real = _fd_of_meta_loss(lambda: real_meta_loss(student, x, targets, tl, temps, loss_fn, lr, xm, ym, rng=rng,
                                                      precond=P), temps, 1e-5 if dtype == "float64" else 1e-2)
    extra = {f"{m}_meta_{amp}_vs_{dtype}": _rel(hg[f"{m}_loop"], hg[f"{m}_fp32"]) for m in ("exact", "jvp", "fd")} \
        if amp != "off" else {}
    return {**extra, "jvp_vs_exact": _rel(hg["jvp"], hg["exact"]), "fd_vs_exact": _rel(hg["fd"], hg["exact"]),
            "exact_vs_fd_of_meta_loss": _rel(hg["exact"], fd_real), "hypergrad_exact": hg["exact"].tolist(),
            "fd_of_meta_loss": fd_real.tolist(), "buffers_changed": buffers_changed}


def _batches_and_student(cfg: RunConfig, device: str, dt, student_name: str, drop_path: float, dropout: float):
    """96 embedded images (64 to train on, 32 as the meta batch) and the student, in the check's dtype."""
    train, _, info = load_base(cfg)
    aug = build_augment("none", info.img_size, info.mean, info.std, info.num_classes)
    ds = Transformed(train, None, aug.eval_transform)
    xs = torch.stack([ds[i][0] for i in range(96)]).to(device, dt)
    ys = torch.tensor([ds[i][1] for i in range(96)], device=device)
    kw = {"drop_rate": dropout}
    student = create_model(student_name, info.num_classes, info.img_size, drop_path=drop_path, **kw)
    if dropout and is_vit(student):  # ViTs take dropout in three places; attention dropout stays 0 (see README)
        student = create_model(student_name, info.num_classes, info.img_size, drop_path=drop_path,
                               proj_drop_rate=dropout, pos_drop_rate=dropout, **kw)
    return (xs[:64], ys[:64], xs[64:], ys[64:]), student.to(device, dt).train(), info


def _mkd_away_from_equal_temperatures(cfg: RunConfig, num_classes: int, device: str, dt) -> MKD:
    """MKD with tau_t 3 and tau_s 5: away from tau_t == tau_s, where symmetric cancellations can hide bugs."""
    method = MKD(cfg, num_classes).to(device, dt)
    with torch.no_grad():
        method.temps.log_tau_t.fill_(math.log(3.0))
        method.temps.log_tau_s.fill_(math.log(5.0))
    return method


def _adam_with_a_second_moment(student, params, xm, ym) -> torch.optim.AdamW:
    """An AdamW after one earlier step on the meta batch, so the Adam look-ahead has a second moment."""
    opt = torch.optim.AdamW(params, lr=1e-3)
    F.cross_entropy(eval_logits(student(xm)), ym).backward()
    opt.step()
    opt.zero_grad()
    return opt


def _fd_of_meta_loss(meta_loss, temps, delta: float) -> torch.Tensor:
    """Central finite difference of the real meta loss in each log-tau coordinate."""
    fd = []
    for p in temps.parameters():
        for i in range(p.numel()):
            vals = []
            for sgn in (1, -1):
                with torch.no_grad():
                    p.view(-1)[i] += sgn * delta
                vals.append(meta_loss())
                with torch.no_grad():
                    p.view(-1)[i] -= sgn * delta
            fd.append((vals[0] - vals[1]) / (2 * delta))
    return torch.stack(fd)


TOLERANCES = {"float64": {"jvp_vs_exact": 1e-6, "fd_vs_exact": 1e-4, "exact_vs_fd_of_meta_loss": 1e-4},
              "float32": {"jvp_vs_exact": 1e-3, "fd_vs_exact": 5e-2, "exact_vs_fd_of_meta_loss": 5e-2}}


AMP_TOLERANCE = 5e-2  # the float32 finite-difference tolerance: reduced precision may cost no more than fd does


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mkd.selfcheck", description=__doc__.split("\n")[0])
    ap.add_argument("--selfcheck", action="store_true", help=argparse.SUPPRESS)  # the check is what this command does
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--granularity", default="global", choices=["global", "per_class"])
    ap.add_argument("--student", default="emb_vit_s",
                    help="student preset or timm name (16 px input), e.g. emb_resnet (a BatchNorm CNN)")
    ap.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the student")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout rate of the student (not attention dropout)")
    ap.add_argument("--lookahead", default="sgd", choices=["sgd", "adam"], help="look-ahead step (mkd.lookahead)")
    ap.add_argument("--img", type=int, default=0, help="run the student at this input size (the embedded images "
                                                        "upsampled): e.g. deit_tiny_patch16_224 at 224")
    ap.add_argument("--amp", default="off", choices=["off", "bf16"],
                    help="bf16: run the step and the hypergradients under bf16 autocast, compare with exact in --dtype")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible: use --device cpu", file=sys.stderr)
        return 2
    if args.amp != "off" and args.dtype != "float32":
        print("error: --amp bf16 compares with exact in float32: add --dtype float32", file=sys.stderr)
        return 2
    res = selfcheck(args.device, args.dtype, granularity=args.granularity, student_name=args.student,
                    drop_path=args.drop_path, dropout=args.dropout, lookahead=args.lookahead, amp=args.amp, img=args.img)
    tol = dict(TOLERANCES[args.dtype])
    if args.amp != "off":  # a bf16 step: every row within the reduced-precision tolerance
        tol = {k: AMP_TOLERANCE for k in tol}
        tol.update({f"{m}_meta_{args.amp}_vs_{args.dtype}": AMP_TOLERANCE for m in ("exact", "jvp", "fd")})
    ok = not res["buffers_changed"]
    print(f"MKD hypergradient self-check ({args.device}, {args.dtype}, amp={args.amp}, granularity={args.granularity}, "
          f"student={args.student}, drop_path={args.drop_path}, dropout={args.dropout}, lookahead={args.lookahead})")
    print(f"  {'buffers untouched':<28} {'ok' if ok else 'FAIL: a meta computation changed a buffer'}")
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
