"""Checking a run directory before a run trains in it: finished (nothing to do), damaged files (moved aside),
another run's directory (refused), a failed attempt (kept beside, retried); and recording a failure."""
from __future__ import annotations

import errno
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import yaml

from . import atomic
from .config import RunConfig, load_config
from .engine import NonFiniteLoss
from .errors import UserError
from .preempt import Preempted
from .results import Result
from .rundir import RunDir


def prepare_dir(cfg: RunConfig, run: RunDir, say=print) -> Optional[dict]:
    """Create/check the run directory; returns the finished result when there is nothing to do.

    A damaged result.json or config.yaml is moved aside (``NAME.damaged.<time>``) and the run resumes; a config
    of another run is refused."""
    run.path.mkdir(parents=True, exist_ok=True)
    try:
        res = atomic.read_json(run.result)
    except atomic.Damaged:
        say(f"{run.result} is damaged: moved aside to {atomic.move_aside(run.result).name}; resuming the run")
        res = None
    if run.config.exists():
        text = run.config.read_text(errors="replace")
        m = re.match(r"# run_id: (\w+)\n", text)
        try:
            prev_id = m.group(1) if m else load_config(overrides=yaml.safe_load(text) or {}).run_id
        except UserError:  # written by another version with other keys
            prev_id = "unknown"
        except yaml.YAMLError:
            say(f"{run.config} is damaged: moved aside to {atomic.move_aside(run.config).name}; rewriting it")
            prev_id = cfg.run_id  # the checkpoint's run id is checked on resume
        if prev_id != cfg.run_id:
            raise UserError(f"{run.path} holds another run ({prev_id}, this config is {cfg.run_id}): use a new --out")
    if res and res.get("status") == "done":
        return res
    if res:  # failed before: keep the record, retry from the last checkpoint
        os.replace(run.result, run.failed_result(int(time.time())))
    atomic.write_text(run.config, cfg.to_yaml())
    return None


RESOURCE_ERRORS = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free quota", errno.EROFS: "make it writable",
                   errno.EACCES: "make it writable", errno.ENOENT: "restore the results directory"}


def write_failure(run: RunDir, cfg: RunConfig, reason: str) -> None:
    try:
        atomic.write_json(run.result, Result.failed(cfg.run_id, reason, cfg.method,
                                                    time.strftime("%Y-%m-%dT%H:%M:%S")).to_dict())
    except OSError:  # the disk that failed the run may fail this too: the error message still reaches the user
        pass


@contextmanager
def failures_recorded(run: RunDir, cfg: RunConfig, main: bool):
    """Around a run's training: a preemption leaves it unfinished (its checkpoint is written), a non-finite loss
    or bad input fails it with one line saying why, a full or read-only disk says what to free, a bug is recorded
    with its traceback kept.  Only the main process (``main``) writes the failed result."""
    try:
        yield
    except Preempted:
        raise
    except (NonFiniteLoss, UserError) as e:
        if main:
            write_failure(run, cfg, str(e))
        if isinstance(e, NonFiniteLoss):
            raise UserError(f"{run.path}: {e}") from None
        raise
    except OSError as e:
        if e.errno not in RESOURCE_ERRORS:
            raise
        what = Path(e.filename).name.lstrip(".").split(".tmp")[0] if e.filename else "a file"
        raise UserError(f"{run.path}: could not write {what} ({e.strerror}): {RESOURCE_ERRORS[e.errno]}; "
                        "then rerun the same command: the run resumes from its last checkpoint, and nothing "
                        "half-written is read as a result") from None
    except Exception as e:  # a bug: record it, keep the traceback; out of memory: one clear line
        from .engine import is_out_of_memory

        if is_out_of_memory(e):
            err = UserError(f"{run.path}: out of GPU memory ({str(e).splitlines()[0][:120]}): lower batch_size, train "
                            "on more GPUs (DDP splits the batch), or use a larger card")
            if main:
                write_failure(run, cfg, str(err))
            raise err from None
        if main:
            write_failure(run, cfg, f"{type(e).__name__}: {e}")
        raise
