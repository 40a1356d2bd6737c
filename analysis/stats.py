"""Intervals over seeds, paired comparisons, equivalence and prospective seed counts (scipy.stats).

Why paired: runs that differ only in method share their seed's initialisation, data order and augmentation
(``mkd/stream.py``), so the seed-to-seed noise that moves both runs of a pair cancels in their difference.

- A cell: the mean over seeds with a 95% Student-t interval, ``mean ± t(0.975, n-1) * s / sqrt(n)``.
- A comparison: the per-seed differences over the seeds both sides finished, their mean and 95% paired-t interval
  (with 3-5 seeds a bootstrap has too few distinct resamples to mean much), and the share of seeds that improve.
- A verdict against the suite's smallest effect of interest ``delta`` (fixed in the suite file before its runs):
  *an effect* when the interval excludes zero; *no effect larger than delta* when it lies inside ``±delta``
  (two one-sided tests at 2.5% each, the same 95% interval); *not resolved* otherwise.
- Seeds needed: prospective, for ``delta`` and the paired SD measured so far (a pilot), never for the observed
  effect: the smallest n at which a two-sided paired t-test at 5% detects ``delta`` with 80% power
  (``paired_power``: the noncentral t, guarded where scipy's tails fail).
- Several comparisons answering one question (MKD against each rival) carry Holm-adjusted p-values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
from scipy import integrate, stats

LEVEL = 0.95
INTERVAL = "95% Student-t interval over seeds"
PAIRED_INTERVAL = "95% paired-t interval over seeds"
POWER = 0.80
POWER_METHOD = (f"seeds needed: the smallest n at which a two-sided paired t-test at {1 - LEVEL:.0%} detects the "
                f"smallest effect of interest with {POWER:.0%} power, given the paired SD measured so far")
EFFECT, EQUIVALENT, OPEN = "effect", "equivalent", "not resolved"


@dataclass
class Estimate:
    """A mean over seeds with its interval (``lo``/``hi`` None with fewer than two seeds)."""

    mean: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    n: int
    p_improve: Optional[float] = None  # paired comparisons only
    sd: Optional[float] = None  # standard deviation over seeds (of the per-seed differences for a comparison)
    p: Optional[float] = None  # two-sided p-value of a paired t-test against 0 (Holm-adjusted where a family says)
    adjusted: bool = False  # p is adjusted for a family of comparisons: resolved means adjusted p < 5%

    @property
    def resolved(self) -> bool:
        """The interval excludes zero (for a member of a family, its adjusted p is under 5%)."""
        if self.adjusted:
            return self.p is not None and self.p < 1 - LEVEL
        return self.lo is not None and (self.lo > 0 or self.hi < 0)

    def verdict(self, delta: Optional[float]) -> str:
        """``effect`` (the interval excludes 0), ``equivalent`` (it lies inside ±delta), else ``not resolved``."""
        if self.lo is None:
            return OPEN
        if self.resolved:
            return EFFECT
        if delta is not None and -delta < self.lo and self.hi < delta:
            return EQUIVALENT
        return OPEN

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


def t_interval(values, level: float = LEVEL) -> Estimate:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if len(v) == 0:
        return Estimate(None, None, None, 0)
    m = float(v.mean())
    if len(v) < 2:
        return Estimate(m, None, None, 1)
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * sd / math.sqrt(len(v)))
    p = float(2 * stats.t.sf(abs(m) / (sd / math.sqrt(len(v))), len(v) - 1)) if sd > 0 else (0.0 if m else 1.0)
    return Estimate(m, m - half, m + half, len(v), sd=sd, p=p)


def _tail_by_integration(crit: float, df: int, nc: float) -> float:
    """P(T' > crit) for a noncentral t with ``df`` degrees of freedom and noncentrality ``nc``, as the expectation
    over V ~ chi2(df) of P(Z > crit * sqrt(V / df) - nc): finite where scipy's series loses its way."""
    f = lambda v: stats.norm.sf(crit * math.sqrt(v / df) - nc) * stats.chi2.pdf(v, df)  # noqa: E731
    hi = stats.chi2.ppf(1 - 1e-15, df)
    return float(integrate.quad(f, 0, hi, limit=200)[0])


def paired_power(d: float, n: int, alpha: float = 1 - LEVEL) -> float:
    """Power of a two-sided paired t-test at ``alpha`` with ``n`` pairs for a standardised effect ``d`` (mean/SD).

    The upper tail of the noncentral t (scipy ``nct.sf``), plus the lower tail where it matters; where scipy returns
    NaN (large noncentrality: scipy before 1.17, and statsmodels' ``TTestPower`` above d ~ 5) the tail is
    integrated directly (``_tail_by_integration``), and the lower tail, then below 1e-12, is dropped."""
    if n < 2:
        return 0.0
    df, d = n - 1, abs(d)
    crit, nc = float(stats.t.ppf(1 - alpha / 2, df)), d * math.sqrt(n)
    up = float(stats.nct.sf(crit, df, nc))
    if not math.isfinite(up):
        up = _tail_by_integration(crit, df, nc)
    low = float(stats.nct.cdf(-crit, df, nc))
    if not math.isfinite(low):
        low = 0.0 if nc > 10 else 1 - _tail_by_integration(-crit, df, nc)
    return min(1.0, up + low)


def seeds_needed(sd: Optional[float], delta: Optional[float], power: float = POWER, most: int = 1000) -> Optional[int]:
    """Prospective: the smallest number of seeds at which an effect of ``delta`` (the smallest effect of interest)
    is detected with ``power`` by a two-sided paired t-test at 5%, for a paired SD ``sd`` measured on a pilot;
    None without both, ``most + 1`` beyond ``most``."""
    if not sd or not delta or sd <= 0:
        return None
    d = abs(delta) / sd
    lo, hi = 2, most
    if paired_power(d, hi) < power:
        return most + 1
    while lo < hi:  # power grows with n: bisect
        mid = (lo + hi) // 2
        if paired_power(d, mid) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


def holm(pvalues: list[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (None stays None): sort, multiply the i-th smallest by
    (m - i), carry the running maximum, cap at 1."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    m, out, run = len(order), list(pvalues), 0.0
    for rank, i in enumerate(order):
        run = max(run, min(1.0, (m - rank) * pvalues[i]))
        out[i] = run
    return out


def paired(diffs: pd.Series, level: float = LEVEL) -> Estimate:
    """The mean of per-seed differences, its paired-t interval, p-value and the probability of improvement."""
    d = diffs.dropna().astype(float)
    e = t_interval(list(d), level)
    if e.n:
        e.p_improve = float(((d > 0).sum() + 0.5 * (d == 0).sum()) / len(d))
    return e


def welch(a: pd.Series, b: pd.Series) -> Estimate:
    """a - b for two unpaired samples (other streams, e.g. two architectures' gains): Welch's interval."""
    a, b = a.dropna().astype(float), b.dropna().astype(float)
    if len(a) < 2 or len(b) < 2:
        return Estimate(float(a.mean() - b.mean()) if len(a) and len(b) else None, None, None, min(len(a), len(b)))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
    m = float(a.mean() - b.mean())
    half = float(stats.t.ppf(0.5 + LEVEL / 2, df) * se)
    p = float(2 * stats.t.sf(abs(m) / se, df)) if se > 0 else (0.0 if m else 1.0)
    # an equivalent paired SD, so that seeds_needed plans both arms growing together
    return Estimate(m, m - half, m + half, min(len(a), len(b)), sd=se * math.sqrt(min(len(a), len(b))), p=p)


def slope(x: list[float], per_seed: pd.DataFrame) -> Estimate:
    """A trend over settings, per seed: the least-squares slope of each seed's values against ``x`` (columns of
    ``per_seed`` in the order of ``x``), then the paired interval of those slopes over the seeds."""
    xs = np.asarray(x, float)
    xs = xs - xs.mean()
    rows = per_seed.dropna()
    s = rows.apply(lambda r: float(np.dot(xs, r.to_numpy(float) - r.to_numpy(float).mean()) / np.dot(xs, xs)), axis=1)
    return paired(s)


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
