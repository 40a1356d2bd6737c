"""One training epoch and one evaluation, for every method (DeiT's engine.py, distillation made generic).

The step has no host synchronisation: loss sums stay on the device and are read every ``log_every``
steps (finiteness check, temperature samples) and at the end of the epoch.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler
from torch import Tensor, nn
from tqdm import tqdm

from .augment import AugmentPreset
from .methods import Method, Progress, StepContext
from .methods.common import eval_logits
from .meta import capture_rng
from .models import is_vit


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf: the run stops and is marked failed."""


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error: torch's class, or its message on older releases."""
    return isinstance(e, getattr(torch, "OutOfMemoryError", ())) or \
        (isinstance(e, RuntimeError) and "out of memory" in str(e))


@dataclass
class Models:
    """The networks of a run: what the step calls, the bare student, the teacher and how it is called."""

    model: nn.Module  # DDP wrapper and/or torch.compile of the student
    student: nn.Module  # the bare student (meta computations, checkpoints)
    teacher: Optional[nn.Module] = None
    teacher_fwd: Optional[Callable[[Tensor], Tensor]] = None  # renormalised / compiled / channels_last teacher call
    teacher_compiled: bool = False


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm scheduler, stepped per update
    scaler: Optional[torch.amp.GradScaler] = None  # fp16 only
    clip_grad: Optional[float] = None


@dataclass
class Precision:
    device: torch.device
    amp: str  # off, bf16, fp16
    autocast: Callable  # context manager factory


@dataclass
class Loop:
    """What stays fixed across the epochs of one run; built by ``build_loop`` (train.py and perf.py alike)."""

    models: Models
    method: Method
    optim: Optimization
    precision: Precision
    augment: AugmentPreset
    steps_per_epoch: int
    total_steps: int
    log_every: int
    meta_batches: object = None
    rank: int = 0
    temp_samples: list = field(default_factory=list)


def precision_for(amp: str, device: torch.device) -> Precision:
    """``amp=auto`` is bf16 on GPU and off on CPU."""
    amp = {"auto": "bf16" if device.type == "cuda" else "off"}.get(amp, amp)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return Precision(device, amp, partial(torch.autocast, device.type, dtype=dtype or torch.float32,
                                          enabled=dtype is not None))


def build_models(cfg, student: nn.Module, teacher: Optional[nn.Module], method: Method, device: torch.device,
                 world: int = 1, renorm: Optional[tuple[Tensor, Tensor]] = None) -> Models:
    """DDP and ``torch.compile`` (``compile=auto``: on GPU) around the student; channels_last for CNN teachers;
    ``renorm = (a, b)``: the teacher sees ``x * a + b`` (its own normalisation, ``augment.renormalizer``)."""
    compile_on = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_on:
        model = torch.compile(model, options={"fallback_random": True} if method.replays_forward else None)
    teacher_fwd = None
    if teacher is not None:
        fwd = torch.compile(teacher) if compile_on else teacher
        cnn = not is_vit(teacher) and device.type == "cuda"
        if cnn:
            teacher.to(memory_format=torch.channels_last)
        if renorm is not None:
            a, b = (t.to(device) for t in renorm)
        if renorm is None and not cnn:
            teacher_fwd = fwd
        else:
            def teacher_fwd(x: Tensor) -> Tensor:
                if renorm is not None:
                    x = torch.addcmul(b, x, a)
                return fwd(x.contiguous(memory_format=torch.channels_last) if cnn else x)
    return Models(model, student, teacher, teacher_fwd, teacher_compiled=compile_on)


def build_optimization(cfg, student: nn.Module, method: Method, steps_per_epoch: int, amp: str,
                       device: torch.device) -> Optimization:
    """AdamW (fused) or SGD, no weight decay on norms/biases/tokens, with the run's learning-rate schedule."""
    groups = param_groups_weight_decay(student, cfg.weight_decay, getattr(student, "no_weight_decay", lambda: ())())
    if method.train_parameters():
        groups.append({"params": method.train_parameters(), "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)  # one kernel per group, on GPU and CPU alike
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return Optimization(opt, build_schedule(cfg, opt, steps_per_epoch), scaler, cfg.clip_grad)


def milestone_steps(cfg, steps_per_epoch: int) -> list[int]:
    """A multistep schedule's milestones in optimizer steps: epochs x steps per epoch, or fractions of the run's
    steps (a shortened run keeps the shape)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.decay_fractions:
        return [round(f * total) for f in cfg.decay_fractions]
    return [round(m * steps_per_epoch) for m in cfg.decay_milestones]


def build_schedule(cfg, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """timm's scheduler for the run, driven per update (``step_update``): a linear warm-up from lr/1000 over
    ``warmup_epochs``, then a cosine to ``min_lr``, a decay every ``decay_epochs`` (``step``) or a decay at each
    milestone (``multistep``).  The step that a milestone names is the first with the decayed rate, as in
    torch's MultiStepLR and the official recipes.  ``lr_per=epoch`` holds the rate within an epoch (DeiT's
    per-epoch scheduler), ``lr_epoch_lag`` delays it by whole epochs (``tests/test_schedules.py``)."""
    per_epoch = cfg.lr_per == "epoch"
    unit = 1 if per_epoch else steps_per_epoch  # the scheduler's clock: epochs, or optimizer steps
    total = max(1, cfg.epochs * unit)
    warm = dict(warmup_t=int(cfg.warmup_epochs * unit), warmup_lr_init=cfg.lr * 1e-3, t_in_epochs=per_epoch)
    if cfg.lr_schedule == "step":  # x decay_rate every decay_epochs (on step counts: an epoch's steps share one lr)
        sched = StepLRScheduler(opt, decay_t=max(1, round(cfg.decay_epochs * unit)), decay_rate=cfg.decay_rate, **warm)
    elif cfg.lr_schedule == "multistep":
        # timm applies milestone m at t = m - 1 (its documented historical convention): m + 1 puts it at t = m
        sched = MultiStepLRScheduler(opt, decay_t=[m + 1 for m in milestone_steps(cfg, unit)],
                                     decay_rate=cfg.decay_rate, warmup_prefix=False, **warm)
    else:
        sched = CosineLRScheduler(opt, t_initial=total, lr_min=cfg.min_lr, **warm)
    return EpochClock(sched, steps_per_epoch, cfg.lr_epoch_lag) if per_epoch else sched


class EpochClock:
    """A per-epoch timm scheduler driven by the loop's per-update calls: before the first step of epoch e the
    rate becomes the schedule's value at epoch ``max(e - lag, 0)``."""

    def __init__(self, sched, steps_per_epoch: int, lag: int = 0):
        self.sched, self.steps_per_epoch, self.lag = sched, max(1, steps_per_epoch), lag

    def step_update(self, num_updates: int) -> None:
        if num_updates % self.steps_per_epoch == 0:
            self.sched.step(max(num_updates // self.steps_per_epoch - self.lag, 0))

    def state_dict(self) -> dict:
        return self.sched.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sched.load_state_dict(state)


def lr_curve(cfg, steps_per_epoch: int) -> list[float]:
    """The learning rate of every optimizer step of a run, from the scheduler the run builds (one per step)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = build_schedule(cfg, opt, steps_per_epoch)
    out = []
    for step in range(max(1, cfg.epochs * steps_per_epoch)):
        out.append(opt.param_groups[0]["lr"])
        sched.step_update(num_updates=step + 1)
    return out


def build_loop(cfg, student: nn.Module, teacher: Optional[nn.Module], method: Method, augment: AugmentPreset,
               device: torch.device, steps_per_epoch: int, meta_batches=None, rank: int = 0, world: int = 1,
               renorm=None) -> Loop:
    """The loop of ``cfg`` from its parts: models, optimization, precision."""
    prec = precision_for(cfg.amp, device)
    return Loop(models=build_models(cfg, student, teacher, method, device, world, renorm), method=method,
                optim=build_optimization(cfg, student, method, steps_per_epoch, prec.amp, device), precision=prec,
                augment=augment, steps_per_epoch=steps_per_epoch, total_steps=max(1, cfg.epochs * steps_per_epoch),
                log_every=cfg.log_every, meta_batches=meta_batches, rank=rank)


def _all_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


@dataclass
class EpochPartial:
    """A training epoch in progress: what a mid-epoch checkpoint saves and a resumed epoch starts from."""

    step_in_epoch: int = 0
    sums: dict = field(default_factory=dict)  # running sums of the loss terms (device tensors)
    n: int = 0
    temp_samples: list = field(default_factory=list)


def train_one_epoch(loop: Loop, feed, epoch: int, step: int, part: Optional[EpochPartial] = None,
                    after_step: Optional[Callable[[EpochPartial, int], None]] = None) -> tuple[dict[str, float], int]:
    """Train one epoch from global ``step`` on ``feed``'s ``Batch``es (``mkd/batch.py``: images, targets, hard
    labels, mixing weight, teacher logits), which the stream (``mkd/stream_cache.Feed``) gives after batch
    augmentation; returns (mean of each loss term, next step).

    ``part``: the epoch so far when it resumes mid-way (the feed then starts at ``part.step_in_epoch``);
    ``after_step(part, step)`` runs after every step (mid-epoch checkpoints, preemption)."""
    steps = EpochSteps(loop, epoch, step, part)
    steps.take_all(feed, after_step and (lambda s: after_step(s.part, s.step)))
    return steps.finish()


class EpochSteps:
    """One epoch of one student, a step at a time: the loop above takes them from its feed; a cohort
    (``mkd/cohort.py``) hands the same batch to each of its members in turn."""

    def __init__(self, loop: Loop, epoch: int, step: int, part: Optional[EpochPartial] = None):
        self.loop, self.epoch, self.step = loop, epoch, step
        self.part = part or EpochPartial()
        loop.models.model.train()
        loop.temp_samples = self.part.temp_samples

    def take(self, batch) -> None:
        """One optimizer step on ``batch``; every ``log_every`` steps the loss is checked (a collective: every rank
        stops together) and the learned temperatures sampled."""
        loop, part = self.loop, self.part
        terms = train_step(loop, batch, self.step)
        self.step += 1
        for k, v in terms.items():
            part.sums[k] = part.sums.get(k, 0.0) + v.detach()
        part.n += 1
        if self.step % loop.log_every == 0:
            _check_finite(_all_sum(part.sums["loss"]), self.epoch, self.step)
            if loop.method.learns_temperature:
                temps = loop.method.temperatures()
                loop.temp_samples.append([self.step, round(temps["tau_t"], 5), round(temps["tau_s"], 5)])
        part.step_in_epoch += 1

    def take_all(self, feed, after_step: Optional[Callable[["EpochSteps"], None]] = None) -> None:
        """A step on every batch of ``feed`` (a progress bar on a terminal), ``after_step(self)`` after each."""
        loop = self.loop
        show = loop.rank == 0 and sys.stderr.isatty()
        bar = tqdm(feed, desc=f"epoch {self.epoch}", leave=False, disable=not show, dynamic_ncols=True,
                   total=loop.steps_per_epoch, initial=self.part.step_in_epoch)
        for batch in bar:
            self.take(batch)
            if show and self.step % loop.log_every == 0:
                bar.set_postfix(loss=f"{float(self.part.sums['loss']) / self.part.n:.3f}",
                                lr=f"{loop.optim.optimizer.param_groups[0]['lr']:.2e}")
            if after_step is not None:
                after_step(self)

    def finish(self) -> tuple[dict[str, float], int]:
        """(mean of each loss term over the epoch and every rank, the next global step)."""
        n = self.part.n
        means = {k: float(_all_sum(v)) / (n * _world()) for k, v in self.part.sums.items()}
        _check_finite(torch.tensor(means.get("loss", 0.0)), self.epoch, self.step)
        return means, self.step


def train_step(loop: Loop, batch, step: int) -> dict[str, Tensor]:
    """One optimizer step of the student on ``batch`` at global ``step``: forward, the method's loss, backward,
    the meta step (methods with one), clipping, the optimizer and the schedule; returns the loss terms."""
    M, O, P, m = loop.models, loop.optim, loop.precision, loop.method
    x = batch.x
    m.on_step(Progress(step, loop.steps_per_epoch, loop.total_steps))
    rng = capture_rng(P.device) if m.replays_forward else None  # the meta step replays this forward's masks
    with P.autocast():
        out = M.model(x)
        terms = m(out, batch)
    loss = terms["loss"]
    O.optimizer.zero_grad(set_to_none=True)
    if O.scaler is not None:
        O.scaler.scale(loss).backward()
        O.scaler.unscale_(O.optimizer)
    else:
        loss.backward()
    if m.has_meta_step:
        m.meta_step(StepContext(
            student=M.student, x=x, targets=batch.targets, teacher_logits=batch.teacher_logits, batch=batch,
            student_out=tuple(o.detach() for o in out) if isinstance(out, (tuple, list)) else out.detach(),
            lr=O.optimizer.param_groups[0]["lr"], step=step, autocast=P.autocast,
            meta_batches=loop.meta_batches, teacher=M.teacher_fwd, rng=rng, optimizer=O.optimizer,
            scaler=O.scaler, amp=P.amp))
    if O.clip_grad:
        torch.nn.utils.clip_grad_norm_(M.student.parameters(), O.clip_grad)
    if O.scaler is not None:
        O.scaler.step(O.optimizer)
        O.scaler.update()
    else:
        O.optimizer.step()
    O.scheduler.step_update(num_updates=step + 1)
    return terms


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
