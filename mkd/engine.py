"""One training epoch and one evaluation, for every method (DeiT's engine.py, distillation made generic).

The step has no host synchronisation: loss sums stay on the device and are read every ``log_every``
steps (finiteness check, temperature samples) and at the end of the epoch.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from .augment import AugmentPreset
from .losses import Method, Progress, StepContext, eval_logits
from .meta import capture_rng


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf: the run stops and is marked failed."""


@dataclass
class Loop:
    """What stays fixed across the epochs of one run."""

    model: nn.Module  # what the step calls: DDP wrapper and/or torch.compile of the student
    student: nn.Module  # the bare student (meta computations, checkpoints)
    teacher: Optional[nn.Module]
    teacher_fwd: Optional[Callable[[Tensor], Tensor]]  # compiled / channels_last teacher call
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm scheduler, stepped per update
    augment: AugmentPreset
    device: torch.device
    autocast: Callable
    scaler: Optional[torch.amp.GradScaler]
    clip_grad: Optional[float]
    steps_per_epoch: int
    total_steps: int
    log_every: int
    meta_batches: object = None
    rank: int = 0
    temp_samples: list = field(default_factory=list)


def _all_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def train_one_epoch(loop: Loop, loader, epoch: int, step: int) -> tuple[dict[str, float], int]:
    """Train one epoch from global ``step``; returns (mean of each loss term, next step)."""
    loop.model.train()
    m = loop.method
    sums: dict[str, Tensor] = {}
    n = 0
    show = loop.rank == 0 and sys.stderr.isatty()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not show, dynamic_ncols=True)
    for x, y in bar:
        x = x.to(loop.device, non_blocking=True)
        y = y.to(loop.device, non_blocking=True)
        x, targets = loop.augment.batch(x, y)
        m.on_step(Progress(step, loop.steps_per_epoch, loop.total_steps))
        t_logits = None
        if loop.teacher_fwd is not None:
            with torch.no_grad(), loop.autocast():
                t_logits = loop.teacher_fwd(x)
        rng = capture_rng(loop.device) if m.replays_forward else None  # the meta step replays this forward's masks
        with loop.autocast():
            out = loop.model(x)
            terms = m(out, t_logits, targets)
        loss = terms["loss"]
        loop.optimizer.zero_grad(set_to_none=True)
        if loop.scaler is not None:
            loop.scaler.scale(loss).backward()
            loop.scaler.unscale_(loop.optimizer)
        else:
            loss.backward()
        if m.has_meta_step:
            m.meta_step(StepContext(
                student=loop.student, x=x, targets=targets, teacher_logits=t_logits,
                student_out=tuple(o.detach() for o in out) if isinstance(out, (tuple, list)) else out.detach(),
                lr=loop.optimizer.param_groups[0]["lr"], step=step, autocast=loop.autocast,
                meta_batches=loop.meta_batches, teacher=loop.teacher, rng=rng, optimizer=loop.optimizer,
                scaler=loop.scaler))
        if loop.clip_grad:
            torch.nn.utils.clip_grad_norm_(loop.student.parameters(), loop.clip_grad)
        if loop.scaler is not None:
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
        else:
            loop.optimizer.step()
        step += 1
        loop.scheduler.step_update(num_updates=step)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach()
        n += 1
        if step % loop.log_every == 0:
            _check_finite(_all_sum(sums["loss"]), epoch, step)  # collective: every rank stops together
            if m.learns_temperature:
                temps = m.temperatures()
                loop.temp_samples.append([step, round(temps["tau_t"], 5), round(temps["tau_s"], 5)])
            if show:
                bar.set_postfix(loss=f"{float(sums['loss']) / n:.3f}", lr=f"{loop.optimizer.param_groups[0]['lr']:.2e}")
    means = {k: float(_all_sum(v)) / (n * _world()) for k, v in sums.items()}
    _check_finite(torch.tensor(means.get("loss", 0.0)), epoch, step)
    return means, step


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_finite(loss_sum: Tensor, epoch: int, step: int) -> None:
    if not math.isfinite(float(loss_sum)):
        raise NonFiniteLoss(f"non-finite training loss (NaN/inf) in epoch {epoch} by step {step}: "
                            "lower lr, set clip_grad=1.0 or amp=off")


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, autocast: Callable) -> dict[str, float]:
    """Top-1/top-5 (percent) over ``batches`` of (x, y); sums are reduced over DDP ranks (each holds a shard)."""
    was = model.training
    model.eval()
    correct = torch.zeros(3, device=device, dtype=torch.float64)  # top1, top5, count
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = eval_logits(model(x))
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == y[:, None]
        correct += torch.stack([hit[:, 0].sum(), hit.any(-1).sum(), torch.tensor(len(y), device=device)]).double()
    correct = _all_sum(correct)
    model.train(was)
    return {"top1": round(100 * float(correct[0] / correct[2]), 3), "top5": round(100 * float(correct[1] / correct[2]), 3)}


def tensor_batches(tensors: tuple[Tensor, Tensor], batch_size: int, rank: int = 0, world: int = 1):
    """Batches of this rank's stride of a materialised dataset."""
    x, y = tensors[0][rank::world], tensors[1][rank::world]
    for i in range(0, len(x), batch_size):
        yield x[i: i + batch_size], y[i: i + batch_size]


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
