"""Intervals over seeds and paired comparisons between methods (scipy.stats).

Why paired: runs that differ only in method share their seed's initialisation, data order and augmentation
(``mkd/stream.py``), so the seed-to-seed noise that moves both runs of a pair cancels in their difference; the
difference of two means with unpaired intervals would throw that away.

- A cell: the mean over seeds with a 95% Student-t interval, ``mean ± t(0.975, n-1) * s / sqrt(n)``.
- A comparison (method minus KD, KD minus CE, and differences of those across teachers or augmentations): the
  per-seed differences over the seeds both sides finished, their mean and 95% paired-t interval (with 3-5
  seeds a bootstrap over seeds has too few distinct resamples to give a meaningful interval), and the
  probability of improvement, the share of seeds in which the difference is positive (ties count half).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95
INTERVAL = "95% Student-t interval over seeds"
PAIRED_INTERVAL = "95% paired-t interval over seeds"


@dataclass
class Estimate:
    """A mean over seeds with its interval (``lo``/``hi`` None with fewer than two seeds)."""

    mean: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    n: int
    p_improve: Optional[float] = None  # paired comparisons only
    sd: Optional[float] = None  # standard deviation over seeds (of the per-seed differences for a comparison)

    @property
    def resolved(self) -> bool:
        """The interval excludes zero."""
        return self.lo is not None and (self.lo > 0 or self.hi < 0)

    def text(self, signed: bool = False, digits: int = 2) -> str:
        if self.mean is None:
            return "—"
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        s = f.format(self.mean)
        if self.lo is not None:
            s += f" [{f.format(self.lo)}, {f.format(self.hi)}]"
        if signed and self.resolved:
            s += "*"
        return s


def t_interval(values) -> Estimate:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if len(v) == 0:
        return Estimate(None, None, None, 0)
    m = float(v.mean())
    if len(v) < 2:
        return Estimate(m, None, None, 1)
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, len(v) - 1) * sd / math.sqrt(len(v)))
    return Estimate(m, m - half, m + half, len(v), sd=sd)


POWER = 0.80
POWER_METHOD = (f"seeds for {POWER:.0%} power: the smallest n at which a two-sided paired t-test at alpha "
                f"{1 - LEVEL:.2f} detects an effect of the observed mean given the observed SD (noncentral t)")


def seeds_needed(e: Estimate, power: float = POWER, most: int = 1000) -> Optional[int]:
    """The number of seeds at which an effect of ``e``'s size, with ``e``'s spread, is resolved with ``power``
    (``POWER_METHOD``); None without a spread, ``most + 1`` for an effect too small to resolve."""
    if e.mean is None or not e.sd or e.n < 2:
        return None
    d = abs(e.mean) / e.sd
    for n in range(2, most + 1):
        crit = stats.t.ppf(0.5 + LEVEL / 2, n - 1)
        nc = d * math.sqrt(n)
        if stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc) >= power:
            return n
    return most + 1


def paired(diffs: pd.Series) -> Estimate:
    """The mean of per-seed differences, its paired-t interval and the probability of improvement."""
    d = diffs.dropna().astype(float)
    e = t_interval(list(d))
    if e.n:
        e.p_improve = float(((d > 0).sum() + 0.5 * (d == 0).sum()) / len(d))
    return e


def by_seed(df: pd.DataFrame, metric: str = "final_top1") -> pd.Series:
    """Finished runs' metric indexed by seed (one run per seed; the rows of one run count once)."""
    done = df[df["status"] == "done"].drop_duplicates("run_id")
    if "seed" not in done:
        done = done.assign(seed=0)
    return done.groupby("seed")[metric].mean().astype(float)


def difference(a: pd.Series, b: pd.Series) -> pd.Series:
    """a - b over the seeds both have."""
    common = a.index.intersection(b.index)
    return a.loc[common] - b.loc[common]
