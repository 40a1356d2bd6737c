"""The paper's claims, and a reviewer's question, answered from the runs: one ``Finding`` each.

Every finding has one headline effect in top-1 points (a mean of per-seed differences, paired wherever the runs
share their seeds' streams) with its 95% interval, and a verdict against the suite's smallest effect of interest
``delta`` (fixed in the suite file before its runs, recorded in run.json, ``stats.py``): *an effect* (the interval
excludes zero), *no effect larger than delta* (the interval lies inside ±delta), or *not resolved*, then with the
seeds that would resolve an effect of ``delta`` at the paired SD measured so far.

- Q1 gap (degradation, gap_ladder): KD's gain over the student alone with the largest teacher minus with the
  smallest (the CE run cancels: KD_large - KD_small per seed).
- Q2 augmentation: KD's gain under the strongest augmentation minus under the weakest, averaged over teachers; not
  answerable when the student alone keeps under ``BASELINE_FLOOR`` of its weak accuracy (an under-trained baseline).
- Q3 cure: MKD minus KD over all settings, and how it changes with the gap and under strong augmentation.
- Q4 rivals: MKD minus each rival cure (pooled over settings; per setting below), Holm-adjusted over the rivals,
  instead of testing only the rival with the best point estimate.
- Q5 tuned temperatures (temperature_grid): KD at its best grid cell, picked on the held-out split, minus KD at its
  default temperatures, and minus MKD, per setting, on the validation set.
- Q6 transfer (temperature_grid): in each setting, the best cell of the other setting minus its own best cell.
- Q7 dataset scale (data_fraction): how MKD's gain over KD (and KD's over the student alone) changes from the full
  training set to the smallest fraction: the per-seed least-squares trend over log(fraction), across the range.
- Q8 architectures (across suites): MKD minus KD on the ViT ladder (degradation) and on the ResNet ladder
  (gap_ladder), and their difference (unpaired: other students, other streams; Welch's interval).

This module reads tidy frames (``collect.py``, ``frame.py``) and computes; it renders nothing (``tables.py`` does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from analysis.frame import label_of, role_of, roles_of, teacherless, teachers_by_size
from analysis.stats import (EFFECT, EQUIVALENT, LEVEL, OPEN, PAIRED_INTERVAL, POWER_METHOD, Estimate, by_seed, difference,
                   holm, paired, seeds_needed, welch)

AUG_ORDER = ["none", "weak", "medium", "strong"]
BASELINE_FLOOR = 0.75  # CE under strong / CE under weak below this: the strong-augmentation baseline is under-trained
NOT_ANSWERABLE, NO_DATA = "not answerable", "no data"


@dataclass
class Finding:
    key: str  # "Q1 gap", ...: what the claims scoreboard looks up
    question: str
    answer: str = ""
    headline: Optional[Estimate] = None  # the effect the verdict is about
    verdict: str = NO_DATA  # effect | equivalent | not resolved | not answerable | no data
    effects: list[tuple[str, Estimate]] = field(default_factory=list)  # (what, estimate): the per-setting lines
    delta: Optional[float] = None  # the smallest effect of interest it was judged against
    methods: tuple = ()  # the methods whose runs it reads (what more seeds would cost)
    suite: str = ""
    scale: str = ""
    summary: str = ""  # the estimate as the scoreboard shows it, where the headline alone would mislead (Q4)
    brief: str = ""  # the estimate in a few words for the scoreboard at a glance, where the headline would mislead
    unresolved: str = ""  # the parts still open where the verdict rests on others (Q4: the rivals not resolved)

    @property
    def seeds_needed(self) -> Optional[int]:
        e = self.headline
        return seeds_needed(e.sd, self.delta) if e is not None and e.sd else None


def smallest_effect(df: pd.DataFrame) -> tuple[Optional[float], str]:
    """The suite's smallest effect of interest as its runs recorded it when planned (run.json), and its rule."""
    if "smallest_effect" not in df or df["smallest_effect"].dropna().empty:
        return None, ""
    points = df["smallest_effect"].dropna().astype(float)
    rule = df["smallest_effect_rule"].dropna()
    return float(points.mode().iloc[0]), (str(rule.iloc[0]) if len(rule) else "")


# ---------------------------------------------------------------------------- verdict sentences
def verdict_text(e: Estimate, delta: Optional[float], positive: str, negative: str) -> tuple[str, str]:
    """(verdict, sentence): what the interval of ``e`` says against ``delta``."""
    if e.mean is None:
        return NO_DATA, "no finished seeds"
    if e.n < 2:
        return OPEN, f"one seed ({e.mean:+.2f}): no interval, no finding"
    v = e.verdict(delta)
    if v == EFFECT:
        small = delta is not None and -delta < e.lo and e.hi < delta
        return v, (f"resolved: {positive if e.mean > 0 else negative} ({e.text(True)} points, {e.n} seeds, "
                   f"improvement in {e.p_improve:.0%} of them" if e.p_improve is not None else
                   f"resolved: {positive if e.mean > 0 else negative} ({e.text(True)} points, {e.n} seeds") \
            + (f"; smaller than the smallest effect of interest, {delta:g})" if small else ")")
    if v == EQUIVALENT:
        return v, (f"resolved: no effect larger than {delta:g} points ({e.text(True)} lies inside ±{delta:g}, "
                   f"{e.n} seeds)")
    return OPEN, f"not resolved ({e.text(True)}, {e.n} seeds; {plan_text(e, delta)})"


def plan_text(e: Estimate, delta: Optional[float]) -> str:
    """The seeds that would resolve an effect of ``delta`` at the paired SD measured so far (prospective)."""
    if not e.sd:
        return "no spread to plan from"
    if delta is None:
        return f"paired SD {e.sd:.2f}; no smallest effect of interest recorded to plan for"
    n = seeds_needed(e.sd, delta)
    need = f"about {n} seeds" if n <= 1000 else "more than 1,000 seeds"
    return f"paired SD {e.sd:.2f}: {need} would detect an effect of {delta:g} points with 80% power"


def _finding(key, question, e, delta, positive, negative, methods, **kw) -> Finding:
    v, s = verdict_text(e, delta, positive, negative)
    return Finding(key, question, s, e, v, delta=delta, methods=tuple(methods), **kw)


# ---------------------------------------------------------------------------- selection helpers
def _series(df: pd.DataFrame, method: str, teacher=None, augment=None, metric: str = "final_top1", **eq) -> pd.Series:
    sub = df[df["method"] == method]
    if teacher is not None and method not in teacherless(df):
        sub = sub[sub["teacher"] == teacher]
    if augment is not None and "augment" in sub:
        sub = sub[sub["augment"] == augment]
    for k, v in eq.items():
        sub = sub[sub[k] == v]
    return by_seed(sub, metric)


def _mean_over(series: list[pd.Series]) -> pd.Series:
    """Per seed, the mean over several settings (seeds present in all of them)."""
    if not series:
        return pd.Series(dtype=float)
    common = series[0].index
    for s in series[1:]:
        common = common.intersection(s.index)
    return sum(s.loc[common] for s in series) / len(series)


# ---------------------------------------------------------------------------- Q1-Q4: a ladder of teachers
def degradation_findings(df: pd.DataFrame, teachers: list, augs: list, delta: Optional[float] = None,
                         suite: str = "", scale: str = "") -> list[Finding]:
    """Q1-Q4 for a frame with teacher, augment, method and seed; teachers ordered by size.  Which method is the
    student alone, KD, MKD and a rival comes from the methods' declared roles (``Method.role``)."""
    ce, kd, mkd = role_of(df, "baseline"), role_of(df, "reference"), role_of(df, "subject")
    if ce is None or kd is None or len(teachers) < 1:
        return []
    CE, KD = label_of(df, ce), label_of(df, kd)
    small, large = teachers[0], teachers[-1]
    augs = sorted(augs, key=lambda a: AUG_ORDER.index(a) if a in AUG_ORDER else len(AUG_ORDER))
    weak, strong = augs[0], augs[-1]
    where = dict(suite=suite, scale=scale)

    def gain(m: str, base: str, t, a) -> pd.Series:
        return difference(_series(df, m, t, a), _series(df, base, t, a))

    out = []
    ask = f"Does {KD}'s gain over {CE} shrink from the smallest teacher ({small}) to the largest ({large})?"
    if large != small:
        per_aug = [difference(gain(kd, ce, large, a), gain(kd, ce, small, a)) for a in augs]
        q1 = _finding("Q1 gap", ask, paired(_mean_over(per_aug)), delta, f"{KD}'s gain grows with the teacher",
                      f"{KD}'s gain shrinks with the teacher", (ce, kd), **where)
        q1.effects = [(f"augment={a}: {KD} gain with {large} minus with {small}", paired(d))
                      for a, d in zip(augs, per_aug)] + [("mean over augmentations", q1.headline)]
    else:
        q1 = Finding("Q1 gap", ask, "needs two teachers", verdict=NO_DATA, delta=delta, **where)
    out.append(q1)

    if strong != weak:
        ask = f"Does {KD}'s gain over {CE} shrink under {strong} augmentation (vs {weak})?"
        per_t = [difference(gain(kd, ce, t, strong), gain(kd, ce, t, weak)) for t in teachers]
        q2 = _finding("Q2 augmentation", ask, paired(_mean_over(per_t)), delta,
                      f"{KD}'s gain grows under {strong} augmentation", f"{KD}'s gain shrinks under {strong} augmentation",
                      (ce, kd), **where)
        q2.effects = [(f"teacher {t}: {KD} gain under {strong} minus under {weak}", paired(d))
                      for t, d in zip(teachers, per_t)] + [("mean over teachers", q2.headline)]
        ce_weak, ce_strong = _series(df, ce, augment=weak), _series(df, ce, augment=strong)
        if len(ce_weak) and len(ce_strong) and ce_strong.mean() < BASELINE_FLOOR * ce_weak.mean():
            q2.verdict = NOT_ANSWERABLE
            q2.answer = (f"not answerable at this budget: the student trained alone reaches {ce_strong.mean():.2f} "
                         f"under {strong} augmentation against {ce_weak.mean():.2f} under {weak} (below "
                         f"{BASELINE_FLOOR:.0%} of it), so {KD}'s gain under {strong} augmentation measures an "
                         f"under-trained baseline, not the paper's regime; the measured effect: {q2.answer}")
    else:
        q2 = Finding("Q2 augmentation", f"Does {KD}'s gain over {CE} shrink under strong augmentation?",
                     "needs two augmentations", verdict=NO_DATA, delta=delta, **where)
    out.append(q2)

    if mkd is not None and len(_series(df, mkd)):
        out.append(_cure(df, mkd, kd, teachers, augs, gain, delta, where))
        rivals = [m for m in roles_of(df, "rival") if len(_series(df, m))]
        if rivals:
            out.append(_rivals(df, mkd, kd, rivals, teachers, augs, delta, where))
    return out


def _cure(df, mkd, kd, teachers, augs, gain, delta, where) -> Finding:
    """Q3: MKD minus KD overall (the headline), and how it changes with the gap and under strong augmentation."""
    MKD, KD = label_of(df, mkd), label_of(df, kd)
    small, large, weak, strong = teachers[0], teachers[-1], augs[0], augs[-1]
    ask = (f"Does {MKD} beat {KD}, the more so with a larger teacher"
           + (" and under strong augmentation?" if strong != weak else "?"))
    overall = paired(_mean_over([gain(mkd, kd, t, a) for t in teachers for a in augs]))
    q3 = _finding("Q3 cure", ask, overall, delta, f"{MKD} beats {KD}", f"{MKD} trails {KD}", (kd, mkd), **where)
    q3.effects.append((f"{MKD} minus {KD}, mean over all settings", overall))
    parts = [f"overall, {q3.answer}"]
    for t in teachers:
        for a in augs:
            q3.effects.append((f"teacher {t}" + (f", augment={a}" if len(augs) > 1 else "") + f": {MKD} minus {KD}",
                               paired(gain(mkd, kd, t, a))))
    if large != small:
        gap = paired(_mean_over([difference(gain(mkd, kd, large, a), gain(mkd, kd, small, a)) for a in augs]))
        q3.effects.append((f"({MKD} - {KD}) with {large} minus with {small}, mean over augmentations", gap))
        parts.append(f"with the gap, {verdict_text(gap, delta, 'its gain grows', 'its gain shrinks')[1]}")
    if strong != weak:
        aug = paired(_mean_over([difference(gain(mkd, kd, t, strong), gain(mkd, kd, t, weak)) for t in teachers]))
        q3.effects.append((f"({MKD} - {KD}) under {strong} minus under {weak}, mean over teachers", aug))
        parts.append(f"with augmentation, {verdict_text(aug, delta, 'its gain grows', 'its gain shrinks')[1]}")
    q3.answer = "; ".join(parts)
    return q3


def _rivals(df, mkd, kd, rivals, teachers, augs, delta, where) -> Finding:
    """Q4, the reviewer's question: MKD minus each rival, per seed (KD cancels), pooled over the settings, with
    Holm-adjusted p-values over the rivals (an effect: adjusted p < 5%; no effect larger than delta: the
    Bonferroni-level interval inside ±delta); the per-setting lines are Holm-adjusted over every setting and
    rival.  No rival is picked by its point estimate first."""
    MKD = label_of(df, mkd)
    names = ", ".join(label_of(df, r) for r in rivals)
    k = len(rivals)
    pooled = {r: _mean_over([difference(_series(df, mkd, t, a), _series(df, r, t, a)) for t in teachers for a in augs])
              for r in rivals}
    ests = {r: paired(pooled[r]) for r in rivals}
    wide = {r: paired(pooled[r], 1 - (1 - LEVEL) / k) for r in rivals}
    for r, p in zip(rivals, holm([ests[r].p for r in rivals])):
        ests[r].p, ests[r].adjusted = p, True
    q4 = Finding("Q4 rivals", f"Is {MKD}'s gain over KD larger than each rival cure's ({names})?", delta=delta,
                 methods=(mkd, *rivals), **where)
    parts, verdicts = [], []
    for r in rivals:
        e, R = ests[r], label_of(df, r)
        if e.mean is None or e.n < 2:
            v, s = OPEN, f"{MKD} minus {R}: too few seeds"
        elif e.p is not None and e.p < 1 - LEVEL:
            v, s = EFFECT, f"{MKD} {'beats' if e.mean > 0 else 'trails'} {R} ({e.text(True)}, Holm p {e.p:.3f})"
        elif delta is not None and wide[r].lo is not None and -delta < wide[r].lo and wide[r].hi < delta:
            v, s = EQUIVALENT, (f"{MKD} and {R} differ by no more than {delta:g} points ({e.text(True)}; "
                                f"{1 - (1 - LEVEL) / k:.1%} interval {wide[r].lo:+.2f} to {wide[r].hi:+.2f})")
        else:
            v, s = OPEN, f"{MKD} minus {R} not resolved ({e.text(True)}, Holm p {e.p:.2f}; {plan_text(e, delta)})"
        verdicts.append(v)
        parts.append(s)
        if v == OPEN:
            q4.unresolved += (", " if q4.unresolved else "") + f"{MKD} - {R}"
        q4.brief += (", " if q4.brief else f"{MKD} minus ") + f"{R} {e.mean:+.2f}{'*' if e.resolved else ''}" \
            if e.mean is not None else ""
        q4.summary += ("; " if q4.summary else "") + f"{MKD} - {R} {e.text(True)} ({v}" + \
            (f", Holm p {e.p:.2f})" if e.p is not None else ")")
        q4.effects.append((f"{MKD} minus {R}, mean over settings (Holm p {e.p:.3f})" if e.p is not None else
                           f"{MKD} minus {R}, mean over settings", e))
    q4.verdict = EFFECT if EFFECT in verdicts else (EQUIVALENT if all(v == EQUIVALENT for v in verdicts) else OPEN)
    # the headline the scoreboard prices: of the comparisons still open (all, when none is), the one with the largest
    # spread, i.e. the one needing most seeds
    still = [ests[r] for r, v in zip(rivals, verdicts) if v == OPEN] or list(ests.values())
    q4.headline = max(still, key=lambda e: e.sd or 0.0)
    settings = [(t, a) for t in teachers for a in augs]
    lines = [(t, a, r, paired(difference(_series(df, mkd, t, a), _series(df, r, t, a)))) for t, a in settings
             for r in rivals]
    for (t, a, r, e), p in zip(lines, holm([e.p for *_, e in lines])):
        e.p, e.adjusted = p, True  # starred by the adjusted p, not by the unadjusted interval
        setting = f"teacher {t}" + (f", augment={a}" if len(augs) > 1 else "")
        q4.effects.append((f"{setting}: {MKD} minus {label_of(df, r)}"
                           + (f" (Holm p {p:.3f} over {len(lines)} comparisons)" if p is not None else ""), e))
    q4.answer = "; ".join(parts) + f" (Holm's adjustment over the {k} rivals; no rival picked by its point estimate)"
    return q4


# ---------------------------------------------------------------------------- Q5-Q6: the temperature grid
def _cells(kd: pd.DataFrame) -> list[tuple[float, float]]:
    return sorted({(float(a), float(b)) for a, b in zip(kd["kd.tau_t"], kd["kd.tau_s"])})


def best_cell(kd: pd.DataFrame) -> Optional[tuple[float, float]]:
    """The grid cell with the best mean held-out top-1 (a split of the training set, never the validation set the
    findings compare on); None without held-out scores."""
    if "heldout_top1" not in kd or kd["heldout_top1"].dropna().empty:
        return None
    done = kd[kd["status"] == "done"].drop_duplicates("run_id")
    means = done.groupby(["kd.tau_t", "kd.tau_s"])["heldout_top1"].mean()
    return tuple(float(v) for v in means.idxmax()) if len(means) else None


def grid_findings(df: pd.DataFrame, delta: Optional[float] = None, suite: str = "", scale: str = "",
                  default: tuple = (4.0, 4.0)) -> list[Finding]:
    """Q5 (tuned temperatures vs KD's default and vs MKD, per setting) and Q6 (transfer of the best cell)."""
    kd, mkd = role_of(df, "reference"), role_of(df, "subject")
    if kd is None or "kd.tau_t" not in df:
        return []
    KD, where = label_of(df, kd), dict(suite=suite, scale=scale)
    settings = teachers_by_size(df) if "teacher" in df else [None]  # smallest first: the mitigation reads their order
    sub = {t: df[(df["method"] == kd) & ((df["teacher"] == t) if t is not None else True)] for t in settings}
    best = {t: best_cell(sub[t]) for t in settings}
    if any(b is None for b in best.values()):
        return [Finding("Q5 tuned temperatures", "Do tuned temperatures beat KD's default?", "the grid's runs hold no "
                        "held-out split to pick the best cell on (tune_holdout): not answered", delta=delta, **where)]

    def cell(t, c) -> pd.Series:
        s = sub[t]
        return by_seed(s[(s["kd.tau_t"].astype(float) == c[0]) & (s["kd.tau_s"].astype(float) == c[1])])

    fmt = lambda c: f"(tau_t {c[0]:g}, tau_s {c[1]:g})"  # noqa: E731
    vs_default = {t: difference(cell(t, best[t]), cell(t, default)) for t in settings}
    q5 = _finding("Q5 tuned temperatures",
                  f"Does {KD} at its best grid cell (picked on the held-out split) beat {KD} at its default "
                  f"{fmt(default)}, and MKD?", paired(_mean_over(list(vs_default.values()))), delta,
                  "the tuned temperatures help", "the tuned temperatures hurt", (kd,), **where)
    q5.effects.append(("best cell minus default, mean over settings", q5.headline))
    for t in settings:
        q5.effects.append((f"teacher {t}: best cell {fmt(best[t])} minus default", paired(vs_default[t])))
        if mkd is not None:  # MKD at the suite's one setting: KD's best of the grid against it favours KD
            q5.effects.append((f"teacher {t}: best cell minus {label_of(df, mkd)} (KD picked from "
                               f"{len(_cells(sub[t]))} cells, {label_of(df, mkd)} one untuned setting)",
                               paired(difference(cell(t, best[t]), _series(df, mkd, t)))))
    out = [q5]
    if len(settings) > 1:  # the paper's claim: tuning mitigates the degradation, i.e. recovers more with the larger
        s, l = settings[0], settings[-1]  # noqa: E741
        mitig = paired(difference(vs_default[l], vs_default[s]))
        m = _finding("Q5 mitigation", f"Do tuned temperatures recover more with the larger teacher ({l}) than with "
                     f"the smaller ({s}), i.e. mitigate the gap's degradation?", mitig, delta,
                     "tuning recovers more with the larger teacher", "tuning recovers less with the larger teacher",
                     (kd,), **where)
        m.effects = [(f"(best cell minus default) with {l} minus with {s}", mitig)]
        out.append(m)
        per = {}
        for a in settings:
            for b in settings:
                if a != b:
                    per[(a, b)] = difference(cell(b, best[a]), cell(b, best[b]))
        q6 = _finding("Q6 transfer", "Does the best grid cell of one setting do as well in another as that setting's "
                      "own best?", paired(_mean_over(list(per.values()))), delta,
                      "the transferred cell does better", "the transferred cell does worse", (kd,), **where)
        q6.effects = [(f"in teacher {b}: the best cell of {a} {fmt(best[a])} minus its own {fmt(best[b])}"
                       + (" (the same cell)" if best[a] == best[b] else ""), paired(d)) for (a, b), d in per.items()]
        if len(set(best.values())) == 1:  # a zero difference by construction: say so rather than quote [0, 0]
            q6.answer = (f"The held-out split picks the same best cell {fmt(best[settings[0]])} in every setting "
                         f"({', '.join(f'teacher {t}' for t in settings)}), so the grid's best transfers: nothing is "
                         f"lost by using one setting's best in another ({q6.answer})")
            q6.summary = f"the same best cell {fmt(best[settings[0]])} in every setting: {q6.headline.text(True)}"
            q6.brief = f"the same best cell {fmt(best[settings[0]])} in both settings"
        out.append(q6)
    return out


# ---------------------------------------------------------------------------- Q7: data fraction
def fraction_findings(df: pd.DataFrame, delta: Optional[float] = None, suite: str = "",
                      scale: str = "") -> list[Finding]:
    """Q7: MKD's gain over KD (and KD's over CE) against the training-set fraction: per seed, the least-squares
    line over log(fraction); the effect is the line's change from the full set to the smallest fraction."""
    ce, kd, mkd = role_of(df, "baseline"), role_of(df, "reference"), role_of(df, "subject")
    if kd is None or "fraction" not in df or df["fraction"].nunique() < 2:
        return []
    fr = sorted(float(f) for f in df["fraction"].dropna().unique())
    x = np.log(np.asarray(fr))
    span = float(x[0] - x[-1])  # log(smallest) - log(1): negative

    def gains(a, b) -> pd.DataFrame:
        cols = {f: difference(_series(df, a, fraction=f), _series(df, b, fraction=f)) for f in fr}
        return pd.DataFrame(cols).dropna()

    def change(per_seed: pd.DataFrame) -> Estimate:
        xs = x - x.mean()
        slopes = per_seed.apply(lambda r: float(np.dot(xs, r.to_numpy(float)) / np.dot(xs, xs)), axis=1)
        return paired(slopes * span)

    where = dict(suite=suite, scale=scale)
    out = []
    if mkd is not None:
        g = gains(mkd, kd)
        MKD, KD = label_of(df, mkd), label_of(df, kd)
        q7 = _finding("Q7 dataset scale", f"Does {MKD}'s gain over {KD} hold from the full training set down to "
                      f"{fr[0]:g} of it?", change(g), delta, f"{MKD}'s gain grows with less data",
                      f"{MKD}'s gain shrinks with less data", (kd, mkd), **where)
        q7.effects = [(f"fraction {f:g}: {MKD} minus {KD}", paired(g[f])) for f in fr] + \
            [(f"{MKD}'s gain, change from fraction 1 to {fr[0]:g} (least-squares over log fraction)", q7.headline)]
        if ce is not None:
            q7.effects.append((f"{KD}'s gain over {label_of(df, ce)}, the same change", change(gains(kd, ce))))
        out.append(q7)
    return out


# ---------------------------------------------------------------------------- Q8: across architectures
def architecture_findings(frames: dict[str, pd.DataFrame], delta: Optional[float] = None,
                          scale: str = "") -> list[Finding]:
    """Q8: MKD minus KD (pooled over each suite's settings, per seed) on every ladder where both ran, labelled by
    the student's architecture, and the difference between the first two (Welch: unpaired)."""
    arms = []
    augs = [set(df["augment"].dropna()) for df in frames.values() if "augment" in df]
    common = set.intersection(*augs) if augs and len(augs) == len(frames) else None  # like with like where it can
    for suite, df in frames.items():
        kd, mkd = role_of(df, "reference"), role_of(df, "subject")
        if kd is None or mkd is None or "teacher" not in df:
            continue
        settings = [(t, a) for t, a in df[["teacher", "augment"]].drop_duplicates().dropna().itertuples(index=False)
                    if not common or a in common] if "augment" in df else \
            [(t, None) for t in df["teacher"].dropna().unique()]
        per = _mean_over([difference(_series(df, mkd, t, a), _series(df, kd, t, a)) for t, a in settings])
        if len(per) < 2:
            continue
        arch = ", ".join(sorted(df.loc[df["method"] == mkd, "student_model"].dropna().astype(str).unique()))
        arms.append((suite, arch, per, label_of(df, mkd), label_of(df, kd)))
    if len(arms) < 2:
        return []
    (s1, a1, p1, MKD, KD), (s2, a2, p2, *_) = arms[:2]
    e = welch(p1, p2)
    q8 = _finding("Q8 architectures", f"Is {MKD}'s gain over {KD} the same on the {s1} students ({a1}) and the "
                  f"{s2} students ({a2})?", e, delta, f"the gain is larger on {a1}", f"the gain is larger on {a2}",
                  ("kd", "mkd"), suite=f"{s1}+{s2}", scale=scale)
    q8.effects = [(f"{s} ({a}): {MKD} minus {KD}, mean over its settings", paired(p)) for s, a, p, *_ in arms] + \
        [(f"{s1} minus {s2} (unpaired, Welch)", e)]
    q8.answer += ((f"; both arms at augment={', '.join(sorted(common))}" if common else "")
                  + "; the two suites differ in more than the architecture (each its own recipe: optimizer, "
                  "schedule, epochs, teachers), so a difference is not the architecture's alone")
    return [q8]


# ---------------------------------------------------------------------------- dispatch
def findings_for(df: pd.DataFrame, kind: str, suite: str, scale: str) -> list[Finding]:
    """The findings a table kind's runs answer (``tables.tables_for`` decides the kind)."""
    delta, _ = smallest_effect(df)
    if kind in ("degradation", "gap_ladder") and "augment" in df and "seed" in df:
        augs = [a for a in df["augment"].dropna().unique()]
        return degradation_findings(df, teachers_by_size(df), augs, delta, suite, scale)
    if kind == "temperature_grid":
        return grid_findings(df, delta, suite, scale)
    if kind == "data_fraction":
        return fraction_findings(df, delta, suite, scale)
    return []


def failed_findings(tables: list, suite: str = "", scale: str = "") -> list[Finding]:
    """The cells the tables marked as failed runs of their protocol, named in the findings as such."""
    failed = [str(v) for t in tables if t.values is not None and "failed" in t.values
              for v in t.values["failed"].dropna()]
    lines = []
    for t in tables:
        if t.values is None or "failed" not in t.values:
            continue
        for _, r in t.values[t.values["failed"].notna()].iterrows():
            where = ", ".join(f"{k} {r[k]}" for k in ("teacher", "augment", "fraction") if k in r and pd.notna(r[k]))
            lines.append((f"{r['method']} ({where})", None, r["failed"]))
    if not failed:
        return []
    f = Finding("Failed runs", "Which cells are failed runs of this protocol, not measures of their method?",
                f"{len(lines)} cell(s): " + "; ".join(f"{w}: {why}" for w, _, why in lines)
                + ". Their methods' numbers here say how the protocol treats them, not what they can do",
                verdict=NO_DATA, suite=suite, scale=scale)
    return [f]


# ---------------------------------------------------------------------------- text
def findings_lines(findings: list[Finding]) -> list[str]:
    """Plain sentences for the Markdown/HTML outputs and the README: a headline per finding, its lines."""
    lines = []
    for f in findings:
        lines.append(f"**{f.key}.** {f.question} {f.answer[0].upper() + f.answer[1:]}.")
        for what, e in f.effects:
            p = f", P(improvement) {e.p_improve:.2f}" if e.p_improve is not None else ""
            p += f", SD {e.sd:.2f}" if e.sd else ""
            lines.append(f"- {what}: {e.text(True)}{p}")
    if lines:
        deltas = sorted({f.delta for f in findings if f.delta is not None})
        lines.append(f"Effects in top-1 points: mean of per-seed differences, [{PAIRED_INTERVAL}]; * marks an "
                     "interval that excludes zero (an effect); an interval inside ±delta is no effect larger than "
                     "delta (two one-sided tests at 2.5% each), delta = "
                     + (", ".join(f"{d:g}" for d in deltas) or "none recorded")
                     + " points, the suite's smallest effect of interest, fixed before its runs; P(improvement): "
                     f"share of seeds with a positive difference; SD: the paired standard deviation over seeds; "
                     f"{POWER_METHOD}. More seeds: `--axis seed=0..N` (finished seeds are reused).")
    return lines


def is_nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))
