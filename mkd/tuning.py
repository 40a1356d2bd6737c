"""The same tuning budget for every method, where no published recipe fixes the scale.

A suite declares, per method, a small grid of settings (``tuning.grid``): config keys with lists of values,
and optionally ``setting:``, a list of bundles of keys (a rival's published settings, e.g. DKD's CIFAR and ImageNet
defaults).  Every method gets the same number of trials.  A trial is an ordinary run (cached, resumable,
Slurm-able) with ``tune_holdout`` set: it holds a class-balanced share of the training set out of its training
and is scored on it (``heldout_top1``), never on the validation set the tables report.  For each setting of the
suite (a row without its seed: teacher, augmentation, fraction ...), each method's final runs take the trial
setting with the best mean held-out top-1 over the tuning seeds (ties: the first in grid order; a failed
trial, e.g. a diverged one, scores below every finished one).  The finals are planned once every trial of
their setting has ended; until then they wait (``Plan.waiting``), priced with the suite's own setting.

Suite syntax::

    tuning:
      scales: [tiny]        # where it applies (no published recipe at that scale)
      seeds: [0]            # each trial's seeds
      holdout: 0.1          # share of each class a trial holds out and is scored on
      grid:
        ce:  {lr: [5.0e-4, 1.0e-3, 2.0e-3, 4.0e-3]}
        kd:  {lr: [1.0e-3, 2.0e-3], setting: [{kd.tau: 4}, {kd.tau: 1}]}
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError, suggest

TUNING_KEYS = ("scales", "seeds", "holdout", "grid", "description")
SCORE = "heldout_top1"


@dataclass
class Tuning:
    """A suite's ``tuning:`` section, validated."""

    scales: list[str]
    seeds: list[int]
    holdout: float
    grid: dict[str, list[dict]]  # method -> its trials' overrides (dotted keys), in grid order
    description: str = ""

    def applies(self, scale: str) -> bool:
        return scale in self.scales

    @property
    def trials_per_method(self) -> int:
        return len(next(iter(self.grid.values()))) if self.grid else 0

    def describe(self) -> str:
        """One sentence for table notes."""
        return (f"each method's setting chosen among {self.trials_per_method} trials (its grid: "
                f"{'; '.join(f'{m} {grid_text(g)}' for m, g in self.grid.items())}) by top-1 on a held-out "
                f"{self.holdout:.0%} of the training set, seed{'s' * (len(self.seeds) > 1)} "
                f"{', '.join(map(str, self.seeds))}, per setting; the validation set the tables report plays no part")


def grid_text(trials: list[dict]) -> str:
    """'lr 0.001/0.002 x kd.tau 4/1': the grid of one method, from its trials."""
    keys = list(dict.fromkeys(k for t in trials for k in t))
    return " x ".join(f"{k} {'/'.join(dict.fromkeys(_fmt(t.get(k)) for t in trials))}" for k in keys)


def setting_text(overrides: dict) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in overrides.items()) or "the suite's own"


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def parse(path: Path, spec: Optional[dict], methods_known: tuple) -> Optional[Tuning]:
    """Validate ``tuning:`` (None when the suite has none): every method's grid the same number of trials."""
    if spec is None:
        return None

    def fail(key: str, msg: str) -> UserError:
        return UserError(f"{path.name}: tuning.{key}: {msg}")

    if not isinstance(spec, dict):
        raise fail("", "must be a mapping (scales, seeds, holdout, grid)")
    for k in spec:
        if k not in TUNING_KEYS:
            raise fail(k, f"unknown key{suggest(k, TUNING_KEYS)}; allowed: {', '.join(TUNING_KEYS)}")
    scales = spec.get("scales") or []
    seeds = spec.get("seeds", [0])
    holdout = spec.get("holdout", 0.1)
    if not isinstance(scales, list) or not scales:
        raise fail("scales", "give the scales it applies to, e.g. [tiny]")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise fail("seeds", "give a list of integer seeds, e.g. [0]")
    if not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise fail("holdout", f"is {holdout!r}: a share of the training set in (0, 1), e.g. 0.1")
    grid_spec = spec.get("grid")
    if not isinstance(grid_spec, dict) or not grid_spec:
        raise fail("grid", "give each method's grid, e.g. {kd: {lr: [1.0e-3, 2.0e-3]}}")
    grid = {}
    for m, g in grid_spec.items():
        if m not in methods_known:
            raise fail(f"grid.{m}", f"unknown method{suggest(m, methods_known)}; methods: {', '.join(methods_known)}")
        grid[m] = _expand(g, lambda msg, m=m: fail(f"grid.{m}", msg))
    sizes = {m: len(t) for m, t in grid.items()}
    if len(set(sizes.values())) > 1:
        raise fail("grid", "every method gets the same number of trials; now "
                   + ", ".join(f"{m} {n}" for m, n in sizes.items()) + ": make them equal")
    return Tuning(scales, seeds, float(holdout), grid, str(spec.get("description", "")).strip())


def _expand(g, fail) -> list[dict]:
    """A method's grid -> its trials: the product of its keys' values; ``setting`` values are bundles of keys."""
    if not isinstance(g, dict) or not g:
        raise fail("must be a mapping of config key -> list of values (and setting: a list of bundles)")
    axes = []
    for k, vals in g.items():
        if not isinstance(vals, list) or not vals:
            raise fail(f"{k}: give a non-empty list of values")
        if k == "setting":
            if not all(isinstance(v, dict) and v for v in vals):
                raise fail("setting: each value is a mapping of config keys (a published setting)")
            axes.append([dict(v) for v in vals])
        else:
            axes.append([{k: v} for v in vals])
    trials = [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in itertools.product(*axes)]
    seen = []
    for t in trials:
        if t in seen:
            raise fail(f"two trials are the same setting ({setting_text(t)}): each trial must differ")
        seen.append(t)
    return trials


def setting_key(row: dict) -> tuple:
    """The setting a choice is made for: the row without its seed (teacher, augment, fraction, method ...)."""
    return tuple(sorted((k, str(v)) for k, v in row.items() if k != "seed"))


@dataclass
class Choice:
    """The outcome of one setting's trials: the chosen overrides (None until every trial has ended) and why."""

    overrides: Optional[dict]
    scores: list[dict] = field(default_factory=list)  # per trial: {"setting", "score", "runs": [run ids]}
    waiting: int = 0  # trials not ended yet
    reason: str = ""

    def record(self, tuning: Tuning) -> dict:
        """What a final run's run.json keeps of its tuning."""
        return {"setting": self.overrides, "score": SCORE, "holdout": tuning.holdout, "seeds": tuning.seeds,
                "trials": self.scores}


def choose(trial_runs: list[list], outcome) -> Choice:
    """``trial_runs[i]``: the runs (one per tuning seed) of the i-th trial, each with ``.config`` and ``.run_id``;
    ``outcome(run)`` its ``Result`` or None.  Returns the best trial's overrides once all have ended."""
    scores, waiting = [], 0
    for runs, overrides in trial_runs:
        vals, failed = [], 0
        for r in runs:
            res = outcome(r)
            if res is None or res.status not in ("done", "failed"):
                waiting += 1
            elif res.status == "failed" or res.heldout_top1 is None:
                failed += 1
            else:
                vals.append(float(res.heldout_top1))
        score = -math.inf if failed else (sum(vals) / len(vals) if vals else None)
        scores.append({"setting": overrides, "score": None if score is None or score == -math.inf else round(score, 3),
                       "failed": failed, "runs": [r.run_id for r in runs]})
    if waiting:
        return Choice(None, scores, waiting, f"{waiting} trial run(s) not finished")
    ok = [(s["score"], -i) for i, s in enumerate(scores) if s["score"] is not None]
    if not ok:
        return Choice(None, scores, 0, "every trial failed: see their logs (--status)")
    best = -max(ok)[1]
    return Choice(dict(scores[best]["setting"]), scores)
