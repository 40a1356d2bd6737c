"""The results contract: what ``run.json``, ``result.json`` and a line of ``metrics.jsonl`` hold, as torch-free
dataclasses that every writer (the launcher, the trainer, the local runner) and reader (``RunDir``, the
analysis, the tests' fixtures) goes through, so a field is named in one place.

Reading is tolerant: a file written by another version may hold keys this one does not know (kept in
``extra`` and written back unchanged) or lack ones it does (their defaults).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


class _Record:
    """Shared dict conversion: known fields by name, unknown keys kept in ``extra``."""

    extra: dict

    @classmethod
    def from_dict(cls, d: Optional[dict]):
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: d.pop(k) for k in list(d) if k in names}
        return cls(**known, extra=d)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None or k in self._always}
        return {**out, **self.extra}

    _always: tuple = ()


@dataclass
class RunInfo(_Record):
    """``run.json``: what the launcher knows of a run (the suite rows it serves, its teacher, its method's
    declarations, the table its suite asks for)."""

    run_id: Optional[str] = None
    kind: str = "student"  # student | teacher | trial (a tuning trial: mkd/tuning.py)
    scale: Optional[str] = None
    suites: list = field(default_factory=list)
    suite: Optional[str] = None
    rows: list = field(default_factory=list)
    label: Optional[str] = None
    teacher_run: Optional[str] = None  # the teacher's run directory
    method: dict = field(default_factory=dict)  # {"name": ..., **Method.declarations()}
    table: Optional[str] = None
    tuned: Optional[dict] = None  # a final run of a tuned setting: the chosen setting and every trial's score
    smallest_effect: Optional[dict] = None  # the suite's smallest effect of interest, fixed when the run was planned
    extra: dict = field(default_factory=dict)
    _always = ("scale", "suite", "label", "teacher_run", "table")


@dataclass
class Result(_Record):
    """``result.json``, written last: ``status`` done (with the numbers) or failed (with the reason)."""

    status: str
    run_id: Optional[str] = None
    method: Optional[str] = None
    reason: Optional[str] = None
    student: Optional[str] = None
    teacher: Optional[str] = None
    dataset: Optional[str] = None
    augment: Optional[str] = None
    fraction: Optional[float] = None
    seed: Optional[int] = None
    epochs: Optional[int] = None
    final_top1: Optional[float] = None
    final_top5: Optional[float] = None
    best_top1: Optional[float] = None
    best_top5: Optional[float] = None
    best_epoch: Optional[int] = None
    heldout_top1: Optional[float] = None  # a tuning trial's score on its held-out split (what tuning selects on)
    tau_t: Optional[float] = None
    tau_s: Optional[float] = None
    teacher_top1: Optional[float] = None
    student_params: Optional[int] = None
    teacher_params: Optional[int] = None
    train_images: Optional[int] = None
    meta_images: Optional[int] = None
    wall_time_s: Optional[float] = None
    total_time_s: Optional[float] = None
    stream_cache: Optional[dict] = None  # epochs read from / written to the stream caches
    environment: Optional[dict] = None  # mkd.environment.environment()
    finished_at: Optional[str] = None
    tau_t_per_class: Optional[list] = None
    tau_s_per_class: Optional[list] = None
    extra: dict = field(default_factory=dict)
    _always = ()

    @property
    def done(self) -> bool:
        return self.status == "done"

    def to_dict(self) -> dict:
        """A finished run's result names every field (null where it does not apply); a failure only what it has."""
        if not self.done:
            return super().to_dict()
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for k in ("reason", "tau_t_per_class", "tau_s_per_class", "heldout_top1"):
            if out[k] is None:
                del out[k]
        return {**out, **self.extra}

    @classmethod
    def failed(cls, run_id: Optional[str], reason: str, method: Optional[str] = None,
               finished_at: Optional[str] = None) -> "Result":
        return cls("failed", run_id=run_id, method=method, reason=reason, finished_at=finished_at)


@dataclass
class MetricsLine(_Record):
    """One line of ``metrics.jsonl`` (an epoch): progress, the method's mean loss terms (``extra``: ``train_loss``
    and e.g. ``kd``, ``ce``), evaluation (when due), temperatures, seconds, the step-level temperature samples."""

    epoch: Optional[int] = None
    step: int = 0
    lr: Optional[float] = None
    train_loss: Optional[float] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    tau_t: Optional[float] = None
    tau_s: Optional[float] = None
    seconds: Optional[float] = None
    temps: Optional[list] = None  # [[step, tau_t, tau_s], ...]
    extra: dict = field(default_factory=dict)
    _always = ()

