"""Stopping at a step boundary when the cluster asks: a signal only sets a flag; the loop writes a mid-epoch
checkpoint after the step in progress, then hands over to whoever handled the signal before (submitit requeues
the job on USR2) or, run by hand, exits with one line saying how to resume.

Why not checkpoint inside the signal handler (submitit's ``checkpoint()``): the signal can arrive between a
backward and its optimizer step, and a checkpoint of that state would not resume to the uninterrupted result.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable, Optional

from .errors import UserError


class Preempted(UserError):
    """The run stopped on a signal after writing a checkpoint; rerunning resumes it at that step."""


class PreemptGuard:
    """Catches USR2 (Slurm's warning before a time limit or preemption, when submitit or nobody handles it) and
    SIGTERM (when nobody handles it: a kill, ``scancel`` of a hand-started run).  Leaves handlers others rely on
    alone (submitit ignores SIGTERM on purpose: USR2 is its requeue signal)."""

    def __init__(self):
        self.requested: Optional[int] = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptGuard":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            prev = signal.getsignal(sig)
            ours = prev in (signal.SIG_DFL, None) or (sig == signal.SIGUSR2 and _is_submitit_requeue(prev))
            if ours:
                self.previous[sig] = prev
                signal.signal(sig, self._flag)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self.previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self.previous = {}

    def _flag(self, signum, frame) -> None:
        self.requested = signum

    def stop(self, where: str) -> None:
        """After the checkpoint is written: the previous handler's turn (submitit: requeue and exit), else exit."""
        signum = self.requested
        prev = self.previous.get(signum)
        self.__exit__()
        if callable(prev):
            prev(signum, None)  # submitit: checkpoint_and_try_requeue -> requeue, sys.exit
        raise Preempted(f"stopped by {signal.Signals(signum).name} {where}; a checkpoint of that step is written: "
                        "rerun the same command to resume there")


def _is_submitit_requeue(handler: Callable) -> bool:
    return getattr(handler, "__name__", "") == "checkpoint_and_try_requeue"
