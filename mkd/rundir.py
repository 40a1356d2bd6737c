"""One object that names every file of a run directory and answers its state (submitit's ``JobPaths`` idea).

A run directory (``results/<suite>/<scale>/<run_id>/``, teachers under ``results/teachers/<scale>/``) holds::

    config.yaml    resolved config (headed by its run id)   run.json      suite rows it serves, method declarations
    split.npz      training / meta indices                  metrics.jsonl one line per epoch
    checkpoint.pt  latest resumable state (while unfinished) model.pt     final student weights
    result.json    written last: its status says done/failed train.log    the run's output (local runner)
    job.json       the Slurm job that trains it             .lock         held while a process trains it

This module imports neither torch nor the training code: the launcher, ``--status`` and the analysis use it.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

from . import atomic
from .errors import UserError
from .results import Result, RunInfo

ACTIVE_SLURM = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                "REQUEUE_HOLD", "REQUEUE_FED")
STATES = ("done", "running", "pending", "failed")


class RunLocked(UserError):
    """Another process holds the run's lock."""


class RunDir:
    """The files of one run and its state: ``done`` (result says so), ``running`` (lock held, or its Slurm job
    runs), ``pending`` (nothing yet, or its Slurm job waits) or ``failed``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ names
    config = property(lambda self: self.path / "config.yaml")
    info = property(lambda self: self.path / "run.json")
    split = property(lambda self: self.path / "split.npz")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    previous_checkpoint = property(lambda self: self.path / "checkpoint.prev.pt")  # kept until the next is whole
    model = property(lambda self: self.path / "model.pt")
    result = property(lambda self: self.path / "result.json")
    log = property(lambda self: self.path / "train.log")
    job = property(lambda self: self.path / "job.json")
    lock_file = property(lambda self: self.path / ".lock")

    def failed_result(self, stamp: int) -> Path:
        """Where a failed attempt's result is kept when the run is retried."""
        return self.path / f"result.failed.{stamp}.json"

    # ------------------------------------------------------------------ reading
    def read_result(self) -> Optional[dict]:
        """The result, None when there is none yet; a damaged one reads as a failure that says so (rerunning
        moves it aside and resumes)."""
        try:
            return atomic.read_json(self.result)
        except atomic.Damaged:
            return {"status": "failed", "reason": f"{self.result.name} is damaged: rerun to resume the run"}

    def read_info(self) -> dict:
        try:
            return atomic.read_json(self.info) or {}
        except atomic.Damaged:
            return {}

    def outcome(self) -> Optional[Result]:
        """``result.json`` through the results contract (``mkd/results.py``); None when there is none yet."""
        raw = self.read_result()
        return None if raw is None else Result.from_dict(raw)

    def run_info(self) -> RunInfo:
        """``run.json`` through the results contract (empty for a run planned by no suite)."""
        return RunInfo.from_dict(self.read_info())

    @property
    def done(self) -> bool:
        res = self.outcome()
        return res is not None and res.done

    def read_job(self) -> Optional[dict]:
        try:
            return atomic.read_json(self.job)
        except atomic.Damaged:
            return None

    def log_path(self) -> str:
        """The log a user should open: the Slurm job's stdout when there is one, else train.log."""
        job = self.read_job()
        return job["stdout"] if job and job.get("stdout") else str(self.log)

    # ------------------------------------------------------------------ state
    def is_locked(self) -> bool:
        """True while some process trains this run."""
        if not self.lock_file.exists():
            return False
        with open(self.lock_file, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
        return False

    def state(self, slurm: str = "") -> str:
        """One of STATES; ``slurm`` is the Slurm state of its job, if it has one (``launch.slurm_states``)."""
        if self.done:
            return "done"
        if self.is_locked():
            return "running"
        if slurm.split(" ")[0] in ACTIVE_SLURM:
            return "running" if slurm.startswith("RUNNING") else "pending"
        if self.result.exists():
            return "failed"
        if slurm and slurm not in ("UNKNOWN", "COMPLETED"):
            return "failed"
        return "pending"

    def lock(self) -> "RunLock":
        return RunLock(self)


class RunLock:
    """An exclusive lock on a run directory: two processes never train the same run."""

    def __init__(self, run: RunDir):
        self.run = run
        self.f = None

    def __enter__(self):
        self.f = open(self.run.lock_file, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise RunLocked(f"{self.run.path} is being trained by another process (lock held): "
                            "wait for it, or check with benchmarks/run.py --status") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"{socket.gethostname()} {os.getpid()}\n")
        self.f.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def environment_of(result: dict) -> Optional[str]:
    """'torch X, timm Y, DEVICE' of a finished run: for a CPU its kernel level (AVX2, AVX512), its model and its
    intra-op thread count, each of which changes float results."""
    env = (result or {}).get("environment") or {}
    if not env:
        return None
    device = str(env.get("device", "?"))
    if device.startswith("cpu"):
        device = f"cpu {env['cpu_capability']}" if env.get("cpu_capability") else "cpu"
        if env.get("cpu_model"):
            device += f" ({env['cpu_model']})"
        if env.get("cpu_threads"):
            device += f", {env['cpu_threads']} thread{'s' if env['cpu_threads'] > 1 else ''}"
    return f"torch {env.get('torch', '?')}, timm {env.get('timm', '?')}, {device}"


def mixed_environments(environments: list[Optional[str]]) -> Optional[str]:
    """A warning when runs that are compared were made with other package versions or devices
    (``environments``: ``environment_of`` of each run, None for unfinished ones)."""
    from collections import Counter

    envs = Counter(e for e in environments if e)
    if len(envs) < 2:
        return None
    return "runs made with different environments (their numbers may differ for that reason alone): " + \
        "; ".join(f"{e} ({n} run{'s' if n > 1 else ''})" for e, n in envs.most_common())

