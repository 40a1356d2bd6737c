"""Cohorts: the runs of a plan that share a teacher stream train in lockstep in one process, so the teacher's
forward (the bulk of a KD step at the imagenet scale) is paid once per step for all of them.

Each step the cohort's first member's feed gives the batch (the stream's augmentation and the teacher's logits,
computed once or read from the stream cache); then each member takes its step with its own RNG state, put back
before and saved after, so its drop path and dropout masks, and every other draw, are those of the run trained
alone: each member ends with the weights and records of its separate run (``tests/test_cohort.py``).  Each keeps
its run directory, metrics, checkpoints and result; one that fails (a non-finite loss, bad input) leaves the
cohort and the others go on; a preemption checkpoints every member at the same step, and the requeued job
resumes them all.  Members that resume from different points train one after another instead.  A cohort
holds the runs of one student architecture; when a member runs out of GPU memory, every member is checkpointed
where it stands and the cohort goes on as two halves, one after the other, in the same process (a member that
does not fit alone fails with one line saying so).
"""
from __future__ import annotations

import json
import signal
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError

MODES = ("auto", "on", "off")


class CohortSplit(Exception):
    """A member ran out of GPU memory: every member was checkpointed where it stood; the cohort goes on in halves."""


def cohort_key(cfg) -> Optional[str]:
    """Runs with equal keys can train as one cohort: the same data stream and the same teacher (weights, input,
    precision, compilation) for the same number of epochs, and the same student architecture, so that a cohort's
    members need what one of them needs times their number (a ViT-L among ViT-Ts would not fit where they do);
    None for a run without a teacher (nothing to share)."""
    from . import methods

    if not methods.get(cfg.method).needs_teacher:
        return None
    return json.dumps([cfg.stream_key(), *cfg.teacher_identity(), cfg.epochs, cfg.student, cfg.student_kwargs],
                      default=str)


def wanted(cfg, mode: str) -> bool:
    """``auto``: cohorts where the teacher's logits are not cached (the imagenet scale by default: there the
    teacher runs every step of every run; where a stream cache holds them, separate runs read them for free and
    the local pool keeps its parallelism); ``on``: wherever runs share a teacher stream; ``off``: never."""
    return mode == "on" or (mode == "auto" and not cfg.caches_teacher)


def plan_cohorts(students: list, mode: str = "auto", max_size: int = 8) -> list[list]:
    """The plan's students as units of work: cohorts of runs with one ``cohort_key`` (at most ``max_size``), in
    plan order, and every other run alone.  All runs of a plan share its scale's resources (the profile's nodes,
    GPUs and time limit), and runs of different epochs never share a key, so a cohort never mixes resources."""
    if mode not in MODES:
        raise UserError(f"--cohorts {mode}: use one of {', '.join(MODES)}")
    units: list[list] = []
    open_: dict[str, list] = {}
    for r in students:
        key = cohort_key(r.config) if wanted(r.config, mode) else None
        if key is None:
            units.append([r])
            continue
        unit = open_.get(key)
        if unit is None or len(unit) >= max_size:
            unit = open_[key] = []
            units.append(unit)
        unit.append(r)
    return units


# ---------------------------------------------------------------------------- training a cohort
def train_cohort(run_dirs: list[str], teacher_dirs: Optional[list[Optional[str]]] = None, quiet: bool = False,
                 say: Optional[Callable] = None) -> dict[str, tuple[bool, str]]:
    """Train the runs in ``run_dirs`` (one cohort) to their ends; returns {run_dir: (finished, why not)}."""
    from .config import load_config
    from .environment import init_distributed
    from .rundir import RunDir

    ctx = init_distributed()
    teacher_dirs = teacher_dirs or [None] * len(run_dirs)
    cfgs = [load_config(RunDir(d).config) for d in run_dirs]
    keys = {cohort_key(c) for c in cfgs}
    if len(keys) != 1 or None in keys:
        raise UserError(f"runs {', '.join(Path(d).name for d in run_dirs)} do not share one teacher stream (data "
                        "stream, teacher, epochs): they cannot train as one cohort; train them separately")
    out: dict[str, tuple[bool, str]] = {}
    try:
        _train_members(run_dirs, teacher_dirs, cfgs, ctx, out, quiet, say)
    except CohortSplit as e:  # out of GPU memory together: the halves, one after the other, in this process
        _free_memory()
        left = [(d, td) for d, td in zip(run_dirs, teacher_dirs) if not RunDir(d).done
                and not (RunDir(d).outcome() and "out of GPU memory" not in (RunDir(d).outcome().reason or ""))]
        if len(left) == 1:
            raise UserError(f"{e}; it runs out of GPU memory alone: lower batch_size or train it on more GPUs") from None
        half = (len(left) + 1) // 2
        (say or _print)(f"{e}: the cohort goes on as two of {half} and {len(left) - half} runs")
        for part in (left[:half], left[half:]):
            out.update(train_cohort([d for d, _ in part], [td for _, td in part], quiet, say))
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return out


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_members(run_dirs, teacher_dirs, cfgs, ctx, out: dict, quiet: bool, say) -> None:
    """Prepare, lock, build and resume every member, then train them (in lockstep where they stand together)."""
    from .environment import rng_state, set_rng_state
    from .prepare import prepare_dir
    from .rundir import RunDir, RunLocked
    from .train import Trainer

    with ExitStack() as stack:
        members = []
        for d, td, cfg in zip(run_dirs, teacher_dirs, cfgs):
            run = RunDir(d)
            log = _member_log(run, quiet or ctx.rank, say)
            done = _broadcast(prepare_dir(cfg, run, log) if ctx.main else None, ctx)
            if done is not None:
                out[str(run.path)] = (True, "")
                continue
            locked = None
            if ctx.main:
                try:
                    stack.enter_context(run.lock())
                except RunLocked as e:  # trained by another process: the cohort goes on without it
                    locked = str(e)
            locked = _broadcast(locked, ctx)  # every rank leaves the same members out
            if locked:
                out[str(run.path)] = (False, locked)
                continue
            members.append(Trainer(cfg, run, ctx, log, td))
        shared, resumed = None, {}
        for m in list(members):
            if not _guarded(m, out, lambda m=m: m.start(shared)):
                members.remove(m)
                if "out of GPU memory" in out[str(m.dir.path)][1] and len(run_dirs) > 1:
                    raise CohortSplit(f"{Path(m.dir.path).name} ran out of GPU memory while the cohort was built")
                continue
            shared = shared or m.parts.teacher
            resumed[m] = rng_state()  # a member resumed mid-epoch continues with the RNG state its checkpoint held
        lockstep, alone = _by_position(members)
        if lockstep:
            _lockstep(lockstep, out, resumed)
        for m in alone:
            set_rng_state(resumed[m])
            _guarded(m, out, lambda m=m: _finish_alone(m))


def _finish_alone(m) -> None:
    with m.guard:
        while m.state.epoch < m.cfg.epochs:
            m.after_epoch(m.epoch())
    _finish(m)


def _finish(m) -> None:
    from . import messages

    result = m.finish()
    for line in messages.done_lines(m.parts.feed, result, m.state.wall, m.dir.path):
        m.say(line)


def _lockstep(members: list, out: dict, resumed: dict) -> None:
    """Epoch after epoch, step after step: one batch from the first member's feed, then each member's step.
    ``resumed``: each member's RNG state once resumed (a fresh epoch reseeds; a resumed one continues from it)."""
    from .engine import NonFiniteLoss, is_out_of_memory
    from .environment import rng_state, set_rng_state
    from .preempt import PreemptGuard

    active = list(members)
    feed_hits = active[0].parts.feed.hits
    for m in active:
        m.parts.feed.hits = feed_hits  # every member read what the shared feed read
    guard = PreemptGuard()
    for m in active:
        m.guard = guard  # one signal stops the cohort, at one step for all
    with guard:
        while active and active[0].state.epoch < active[0].cfg.epochs:
            steps, rngs = {}, {}
            for m in active:
                set_rng_state(resumed.pop(m, None) or rng_state())
                steps[m] = m.begin_epoch()
                rngs[m] = rng_state()
            lead = active[0]
            feed = lead.parts.feed.epoch(lead.state.epoch, steps[lead].part.step_in_epoch)
            for batch in feed:
                for m in list(active):
                    set_rng_state(rngs[m])
                    try:
                        steps[m].take(batch)
                        m.after_step(steps[m], stop=False)
                    except (NonFiniteLoss, UserError, OSError) as e:
                        _fail(m, e, out)
                        active.remove(m)
                        continue
                    except Exception as e:
                        if not is_out_of_memory(e) or len(active) == 1:
                            raise
                        # the member's step did not happen: its RNG back to before it; every member checkpointed at
                        # its own step (those before it in this batch have taken it), then the cohort splits
                        set_rng_state(rngs[m])
                        _checkpoint_all(active, steps, rngs)
                        raise CohortSplit(f"{Path(m.dir.path).name} ran out of GPU memory at step "
                                          f"{steps[m].step} among {len(active)} runs") from None
                    rngs[m] = rng_state()
                if active and active[0].stop_requested(steps[active[0]]):  # DDP: every rank agrees
                    _checkpoint_all(active, steps, rngs)
                    guard.requested = guard.requested or signal.SIGTERM  # another rank's signal
                    guard.stop(f"at step {steps[active[0]].part.step_in_epoch} of epoch {active[0].state.epoch + 1}")
            for m in list(active):
                set_rng_state(rngs[m])
                if not _guarded(m, out, lambda m=m: m.after_epoch(m.end_epoch(steps[m]))):
                    active.remove(m)
    for m in active:
        if _guarded(m, out, lambda m=m: _finish(m)):
            out[str(m.dir.path)] = (True, "")


def _checkpoint_all(active: list, steps: dict, rngs: dict) -> None:
    """Every member's checkpoint at the step where the cohort stops, each with its own RNG state."""
    from .environment import set_rng_state

    for m in active:
        set_rng_state(rngs[m])
        m.checkpoint_in_epoch(steps[m])


def _guarded(m, out: dict, fn: Callable) -> bool:
    """``fn()`` for member ``m``; a failure is recorded as the member's (result.json says why), not the cohort's."""
    from .preempt import Preempted
    from .prepare import failures_recorded

    try:
        with failures_recorded(m.dir, m.cfg, m.ctx.main):
            fn()
        out.setdefault(str(m.dir.path), (True, ""))
        return True
    except Preempted:
        raise
    except UserError as e:
        out[str(m.dir.path)] = (False, str(e))
        return False


def _fail(m, e: Exception, out: dict) -> None:
    """A member that failed mid-step: its result says why; the cohort goes on without it."""
    def boom():
        raise e
    _guarded(m, out, boom)


def _by_position(members: list) -> tuple[list, list]:
    """The members that resume from the most common (epoch, step) train in lockstep; the others alone."""
    from collections import Counter

    pos = {m: (m.state.epoch, m.state.step) for m in members}
    if not members:
        return [], []
    common = Counter(pos.values()).most_common(1)[0][0]
    together = [m for m in members if pos[m] == common]
    return (together, [m for m in members if pos[m] != common]) if len(together) > 1 else ([], members)


def _broadcast(obj, ctx):
    if ctx.world > 1:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box)
        return box[0]
    return obj


def _member_log(run, quiet, say: Optional[Callable]) -> Callable:
    """A member's lines go to its own train.log and, prefixed with its run id, to the cohort's output."""
    if quiet:
        return lambda *a: None

    def log(*a):
        line = " ".join(str(x) for x in a)
        with open(run.log, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        (say or _print)(f"[{Path(run.path).name}] {line}")
    return log


def _print(line: str) -> None:
    print(line, flush=True)



def main(argv: Optional[list[str]] = None) -> int:
    """``python -m mkd.cohort RUN_DIR...``: train run directories (each with its config.yaml) as one cohort;
    under torchrun, with DDP."""
    import argparse

    from .errors import cli

    @cli
    def run(argv):
        ap = argparse.ArgumentParser(prog="python -m mkd.cohort", description="Train run directories (each with its "
                                     "config.yaml) as one cohort of a teacher stream; under torchrun, with DDP.")
        ap.add_argument("run_dirs", nargs="+", help="run directories holding config.yaml")
        ap.add_argument("--teacher-dir", help="where the teacher's stream cache lives (default: beside its checkpoint)")
        args = ap.parse_args(argv)
        for d in args.run_dirs:
            if not (Path(d) / "config.yaml").is_file():
                raise UserError(f"{d}: no config.yaml: write one with python -m mkd.train --print-config > {d}/config.yaml")
        out = train_cohort(args.run_dirs, [args.teacher_dir] * len(args.run_dirs))
        bad = [f"{Path(d).name}: {why}" for d, (ok, why) in out.items() if not ok]
        if bad:
            raise UserError("cohort members failed: " + "; ".join(bad))
        return 0
    try:
        return run(argv)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    sys.exit(main())
