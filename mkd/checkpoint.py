"""A run's resumable state: what a checkpoint holds, writing it whole, and reading back the newest whole one.

A checkpoint holds everything resuming needs to end with the weights and records of an uninterrupted run: the
student, the method's parameters, optimizers, scheduler, scaler, every process's RNG state, the records so far,
and, for a checkpoint taken inside an epoch, where in it the run stopped (``EpochPartial``, the meta batches'
position).  ``checkpoint.pt`` is written atomically and the one before it kept until the new one is whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed

from . import atomic
from .engine import EpochPartial, Loop
from .environment import set_rng_state
from .rundir import RunDir


@dataclass
class RunState:
    """Where a run stands: what a checkpoint saves and resuming restores."""

    epoch: int = 0
    step: int = 0
    records: list = field(default_factory=list)
    wall: float = 0.0
    best: dict = field(default_factory=lambda: {"top1": -1.0})
    in_epoch: Optional[EpochPartial] = None  # epoch ``epoch`` stopped mid-way (a mid-epoch checkpoint)
    in_epoch_seconds: float = 0.0
    meta: Optional[dict] = None  # the meta batches' position in that epoch


def save(run: RunDir, run_id: str, loop: Loop, p: RunState, rngs: list) -> None:
    """``checkpoint.pt`` (the previous one kept as ``checkpoint.prev.pt`` until this one is whole)."""
    L = loop
    state = {
        "model": L.models.student.state_dict(), "method": L.method.state_dict(),
        "optimizer": L.optim.optimizer.state_dict(), "scheduler": L.optim.scheduler.state_dict(),
        "scaler": L.optim.scaler.state_dict() if L.optim.scaler else None, "rng": rngs, "epoch": p.epoch,
        "step": p.step, "records": p.records, "wall_time": p.wall, "best": p.best, "run_id": run_id,
        "in_epoch": None if p.in_epoch is None else {
            "step_in_epoch": p.in_epoch.step_in_epoch, "sums": {k: v.detach().cpu() for k, v in p.in_epoch.sums.items()},
            "n": p.in_epoch.n, "temp_samples": p.in_epoch.temp_samples, "seconds": p.in_epoch_seconds,
            "meta": L.meta_batches.state() if L.meta_batches is not None else None}}
    atomic.write_dumped(run.checkpoint, lambda f: torch.save(state, f), keep_previous=run.previous_checkpoint)


def newest(run: RunDir, run_id: str, say) -> tuple[Optional[Path], Optional[dict]]:
    """The newest whole checkpoint of this run: ``checkpoint.pt``, else the one before it; a damaged file is moved
    aside (never deleted), and with none left the run starts over.  Returns (its path, its state)."""
    for path in (run.checkpoint, run.previous_checkpoint):
        if not path.exists():
            continue
        try:
            state = load(path)
            if not isinstance(state, dict) or state.get("run_id") != run_id or "model" not in state:
                raise ValueError("not a checkpoint of this run")
            return path, state
        except Exception as e:  # truncated zip, unpickling error, foreign file: keep it, fall back
            say(f"{path} is damaged ({type(e).__name__}): moved aside to {atomic.move_aside(path).name}")
    return None, None


def pick(run: RunDir, run_id: str, ctx, say) -> Optional[dict]:
    """The state to resume from: rank 0 picks the newest whole checkpoint (moving damaged ones aside), the other
    ranks load the file it picked."""
    path, state = newest(run, run_id, say) if ctx.main else (None, None)
    if ctx.world > 1:
        box = [str(path) if path else None]
        torch.distributed.broadcast_object_list(box)
        if ctx.rank and box[0]:
            state = load(box[0])
    return state


def load(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def restore(loop: Loop, state: dict) -> RunState:
    """Put a checkpoint's weights and optimizer states into the loop; returns the progress it recorded (the
    caller restores this process's RNG state)."""
    L = loop
    L.models.student.load_state_dict(state["model"])
    L.method.load_state_dict(state["method"])
    L.optim.optimizer.load_state_dict(state["optimizer"])
    L.optim.scheduler.load_state_dict(state["scheduler"])
    if L.optim.scaler is not None and state.get("scaler"):
        L.optim.scaler.load_state_dict(state["scaler"])
    p = RunState(state["epoch"], state["step"], state["records"], state["wall_time"], state["best"])
    mid = state.get("in_epoch")
    if mid is not None:
        dev = L.precision.device
        p.in_epoch = EpochPartial(mid["step_in_epoch"], {k: v.to(dev) for k, v in mid["sums"].items()}, mid["n"],
                                  mid["temp_samples"])
        p.in_epoch_seconds, p.meta = mid["seconds"], mid.get("meta")
    return p


def resume(run: RunDir, run_id: str, loop: Loop, ctx, say) -> RunState:
    """Restore the newest whole checkpoint (weights, optimizers, scheduler, scaler, this process's RNG) and rewrite
    the metrics to its records; a fresh state (and empty metrics) when there is none."""
    state = pick(run, run_id, ctx, say)
    if state is None:
        if ctx.main:
            atomic.write_jsonl(run.metrics, [])
        return RunState()
    p = restore(loop, state)
    if len(state["rng"]) == ctx.world:
        set_rng_state(state["rng"][ctx.rank])
    if ctx.main:
        atomic.write_jsonl(run.metrics, p.records)
    L = loop
    where = f", step {p.in_epoch.step_in_epoch}/{L.steps_per_epoch} of epoch {p.epoch + 1}" if p.in_epoch else ""
    say(f"{run.path}: resuming after epoch {p.epoch}/{L.total_steps // max(1, L.steps_per_epoch)}{where}")
    return p
