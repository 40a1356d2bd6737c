"""The one training loop: ``python -m mkd.train --config FILE.yaml --out DIR [key=value ...]``.

Every method trains through one ``Trainer`` (build, resume, epoch, checkpoint, finish); the parts it builds are
``mkd/parts.py``'s, the loop's steps ``mkd/engine.py``'s, its checkpoints ``mkd/checkpoint.py``'s and its files
those of ``mkd/rundir.py`` (``mkd/results.py`` says what they hold).  Every file is written atomically.  Rerun
on a finished directory it does nothing; on an unfinished one it resumes from the last checkpoint (an epoch's
end, a step where USR2/SIGTERM stopped it, or every ``checkpoint_every_steps``) and, the data stream being a
function of (seed, epoch, position) (``mkd/stream.py``) and every RNG state saved, ends with the weights and
records of an uninterrupted run.  Started with several processes (torchrun, or submitit tasks) it trains with
DDP: gloo on CPU, NCCL on GPUs.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from . import atomic, checkpoint, messages
from .config import RunConfig, describe, load_config
from .engine import EpochSteps, Timer, evaluate
from .environment import Context, init_distributed, rng_state, seed_everything
from .errors import UserError, cli
from .parts import build
from .prepare import failures_recorded, prepare_dir
from .preempt import PreemptGuard
from .results import MetricsLine
from .rundir import RunDir


def train(cfg: RunConfig, out: str | Path, quiet: bool = False, teacher_dir: Optional[str | Path] = None) -> dict:
    """Train (or resume, or skip) the run ``cfg`` in ``out``; returns the result dict.  ``teacher_dir``: where
    the teacher's stream cache lives (the suites pass the teacher's run directory; default: beside the teacher
    checkpoint)."""
    run, ctx = RunDir(out), init_distributed()
    say = (lambda *a: None) if (quiet or ctx.rank) else (lambda *a: print(*a, flush=True))
    if cfg.batch_size % ctx.world:
        raise UserError(f"batch_size={cfg.batch_size} does not split over {ctx.world} processes: "
                        f"use a multiple of {ctx.world}")
    done = prepare_dir(cfg, run, say) if ctx.main else None
    if ctx.world > 1:
        box = [done]
        dist.broadcast_object_list(box)
        done = box[0]
    if done is not None:
        say(f"{run.path}: already finished (top1 {done.get('final_top1')}); nothing to do")
        return done
    with run.lock() if ctx.main else nullcontext():  # a RunLocked error leaves the other process's run alone
        with failures_recorded(run, cfg, ctx.main):
            return Trainer(cfg, run, ctx, say, teacher_dir).run()


# ---------------------------------------------------------------------------- the trainer
class Trainer:
    """One training run: its config, run directory, process context, built parts and progress, with build,
    resume, epoch, checkpoint and finish as its steps (``run`` does them in order)."""

    def __init__(self, cfg: RunConfig, run: RunDir, ctx: Context, say=print,
                 teacher_dir: Optional[str | Path] = None):
        self.cfg, self.dir, self.ctx, self.say = cfg, run, ctx, say
        self.teacher_dir = Path(teacher_dir) if teacher_dir else None
        self.parts = None
        self.state = checkpoint.RunState()
        self.timer, self.guard = Timer(ctx.device), PreemptGuard()
        self.t_start, self._t0, self._last_save = time.time(), 0.0, 0.0

    @property
    def loop(self):
        return self.parts.loop

    def build(self, shared_teacher: Optional[tuple] = None) -> None:
        self.parts = build(self.cfg, self.dir, self.ctx, self.say, self.teacher_dir, shared_teacher)

    def resume(self) -> None:
        """From the last whole checkpoint when there is one (``mkd/checkpoint.py``); its records become the metrics."""
        self.state = checkpoint.resume(self.dir, self.cfg.run_id, self.loop, self.ctx, self.say)

    def epoch(self) -> dict:
        """Train and evaluate epoch ``state.epoch`` (from where a mid-epoch checkpoint left it); returns its
        metrics record."""
        steps = self.begin_epoch()
        steps.take_all(self.parts.feed.epoch(self.state.epoch, steps.part.step_in_epoch), self.after_step)
        return self.end_epoch(steps)

    def begin_epoch(self) -> EpochSteps:
        """Seed a fresh epoch (a resumed one has its RNG states from the checkpoint), position the meta batches;
        returns the epoch's steps, to be taken on the stream's batches."""
        L, p = self.loop, self.state
        self._t0 = self.timer.now() - p.in_epoch_seconds
        if p.in_epoch is None:
            seed_everything(self.cfg.seed, p.epoch + 1, self.ctx.rank)
        if L.meta_batches is not None:
            L.meta_batches.set_epoch(p.epoch, (p.meta or {}).get("drawn", 0) if p.in_epoch else 0)
        return EpochSteps(L, p.epoch + 1, p.step, p.in_epoch)

    def end_epoch(self, steps: EpochSteps) -> dict:
        """The epoch's mean loss terms, its evaluation when due, its metrics record."""
        cfg, L, p = self.cfg, self.loop, self.state
        epoch = p.epoch
        terms, p.step = steps.finish()
        p.in_epoch, p.in_epoch_seconds, p.meta = None, 0.0, None
        due = (epoch + 1) % max(1, cfg.eval_every) == 0 or epoch + 1 == cfg.epochs
        ev = evaluate(L.models.student, self.parts.val_batches(), L.precision.device, L.precision.autocast) if due else {}
        secs = self.timer.now() - self._t0
        p.wall += secs
        rec = MetricsLine.from_dict({
            "epoch": epoch + 1, "step": p.step, "lr": L.optim.optimizer.param_groups[0]["lr"],
            "train_loss": terms.pop("loss"), **terms, **ev,
            **{k: v for k, v in L.method.temperatures().items() if not k.endswith("per_class")},
            "seconds": round(secs, 3), "temps": L.temp_samples or None}).to_dict()
        p.records.append(rec)
        if ev and ev["top1"] > p.best["top1"]:
            p.best = {**ev, "epoch": epoch + 1}
        p.epoch = epoch + 1
        return rec

    def after_step(self, steps: EpochSteps, stop: Optional[bool] = None) -> None:
        """A mid-epoch checkpoint every ``checkpoint_every_steps`` steps, and one before stopping when a signal
        asked to (``stop``: a cohort's decision, taken once for all its members)."""
        part, every = steps.part, self.cfg.checkpoint_every_steps
        self.state.step = steps.step
        stop = self.stop_requested(steps) if stop is None else stop
        last = part.step_in_epoch == self.loop.steps_per_epoch  # the epoch's own checkpoint follows unless we stop
        if stop or (every and part.step_in_epoch % every == 0 and not last):
            self.checkpoint_in_epoch(steps)
        if stop:
            self.guard.requested = self.guard.requested or signal.SIGTERM  # another rank's signal
            self.guard.stop(f"at step {part.step_in_epoch}/{self.loop.steps_per_epoch} of epoch {self.state.epoch + 1}")

    def checkpoint_in_epoch(self, steps: EpochSteps) -> None:
        """A checkpoint of the step ``steps`` stands at, inside the epoch (resuming continues from that step)."""
        p = self.state
        p.step, p.in_epoch, p.in_epoch_seconds = steps.step, steps.part, self.timer.now() - self._t0
        self.checkpoint()
        p.in_epoch = None

    def stop_requested(self, steps: EpochSteps) -> bool:
        """Whether a signal asked to stop; under DDP every rank agrees, at a step where they all look."""
        L, ctx = self.loop, self.ctx
        stop = self.guard.requested is not None
        if ctx.world > 1 and (steps.step % L.log_every == 0 or steps.part.step_in_epoch == L.steps_per_epoch):
            flag = torch.tensor([float(stop)], device=ctx.device)
            dist.all_reduce(flag)  # every rank stops at the same step
            return bool(flag.item())
        return stop and ctx.world == 1

    def checkpoint(self) -> None:
        """Everything resuming needs, every process's RNG included; then the metrics so far."""
        rngs = [rng_state()]
        if self.ctx.world > 1:
            rngs = [None] * self.ctx.world
            dist.all_gather_object(rngs, rng_state())
        if self.ctx.main:
            checkpoint.save(self.dir, self.cfg.run_id, self.loop, self.state, rngs)
            atomic.write_jsonl(self.dir.metrics, self.state.records)

    def finish(self) -> dict:
        """result.json (last: its presence means done) and model.pt; the checkpoint goes."""
        L, p, cfg = self.loop, self.state, self.cfg
        final = p.records[-1] if p.records else evaluate(L.models.student, self.parts.val_batches(),
                                                         L.precision.device, L.precision.autocast)
        best = p.best if p.records else {"top1": final["top1"], "top5": final["top5"], "epoch": 0}
        result = self.parts.result(cfg, final, best, p.wall, time.time() - self.t_start, self.ctx.world).to_dict()
        if self.ctx.main:
            atomic.write_dumped(self.dir.model, lambda f: torch.save({"model": L.models.student.state_dict(),
                                                                          "run_id": cfg.run_id}, f))
            atomic.write_json(self.dir.result, result)  # last: its presence means the run is done
            self.dir.checkpoint.unlink(missing_ok=True)
            self.dir.previous_checkpoint.unlink(missing_ok=True)
        return result

    def start(self, shared_teacher: Optional[tuple] = None) -> None:
        """Build and resume; the log's header."""
        self.build(shared_teacher)
        self.resume()
        self.say(messages.header(self.cfg, self.parts, self.ctx))
        self._last_save = time.time()

    def after_epoch(self, rec: dict) -> None:
        """The epoch's checkpoint when due (``checkpoint_minutes``; always after the last), else its metrics."""
        p = self.state
        if _due(time.time() - self._last_save, self.cfg.checkpoint_minutes, self.ctx) or p.epoch == self.cfg.epochs:
            self.checkpoint()
            self._last_save = time.time()
        elif self.ctx.main:
            atomic.write_jsonl(self.dir.metrics, p.records)
        images = self.loop.steps_per_epoch * self.cfg.batch_size
        self.say(messages.epoch_line(self.cfg, p.epoch, rec, self.loop.method.temperatures(), images, p.wall))

    def run(self) -> dict:
        """Start, train epoch after epoch, finish."""
        self.start()
        with self.guard:
            while self.state.epoch < self.cfg.epochs:
                self.after_epoch(self.epoch())
        result = self.finish()
        for line in messages.done_lines(self.parts.feed, result, self.state.wall, self.dir.path):
            self.say(line)
        if self.ctx.world > 1:
            dist.barrier()
        return result


def _due(seconds: float, minutes: float, ctx: Context) -> bool:
    """Whether an epoch's end checkpoint is due (``checkpoint_minutes``); rank 0's clock decides for all ranks."""
    due = torch.tensor([float(seconds >= 60 * minutes)], device=ctx.device)
    if ctx.world > 1:
        dist.broadcast(due, 0)
    return bool(due.item())


# ---------------------------------------------------------------------------- CLI
@cli
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mkd.train", description="Train one run (any method) into --out.")
    ap.add_argument("--config", help="YAML run config (see --help-config)")
    ap.add_argument("--out", help="run directory (default results/train/<run_id>)")
    ap.add_argument("--help-config", action="store_true", help="list every config key with its default")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and run id, then exit")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys (mkd.hypergrad=jvp)")
    args = ap.parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    out = Path(args.out or Path("results") / "train" / cfg.run_id)
    try:
        train(cfg, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
