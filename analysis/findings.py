"""The paper's three questions and the reviewer's fourth, answered from a degradation study's runs, each with
an effect and its interval.

- Q1 gap: does KD's gain over the student trained alone shrink as the teacher grows?  Effect: KD's gain with
  the largest teacher minus its gain with the smallest (the CE run cancels: kd_large - kd_small per seed).
- Q2 augmentation: does KD's gain shrink under strong augmentation?  Effect: KD's gain under the strongest
  augmentation minus under the weakest, averaged over the teachers per seed.
- Q3 cure: does MKD's gain over KD grow with the gap and under strong augmentation?  Effects: (MKD - KD) with
  the largest teacher minus with the smallest; (MKD - KD) under the strongest augmentation minus the weakest.
- Q4 rivals: per setting, is MKD's gain over KD larger than the best rival cure's (DIST, DKD, CTKD, ...)?
  Effect: MKD minus the rival with the largest mean gain over KD in that setting, per seed.

Every effect is a mean of per-seed differences with its 95% paired-t interval (``stats.py``); one whose interval
spans zero is "not resolved at this budget", and nothing is claimed from it.

Q2 also needs a working baseline: in the paper's regime strong augmentation is part of a normal recipe, so the
student trained alone does about as well with it as without.  When the student alone keeps less than
``BASELINE_FLOOR`` of its weak-augmentation accuracy under strong augmentation, KD's gain there measures the
baseline's under-training, and Q2 is reported as not answerable at this budget (its effect is still shown).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import pandas as pd

from stats import PAIRED_INTERVAL, POWER_METHOD, Estimate, by_seed, difference, paired, seeds_needed
from tables import label_of, role_of, roles_of, teacherless

AUG_ORDER = ["none", "weak", "medium", "strong"]
BASELINE_FLOOR = 0.75  # CE under strong / CE under weak below this: the strong-augmentation baseline is under-trained


@dataclass
class Finding:
    question: str  # "Q1 gap", ...
    asks: str
    effects: list[tuple[str, Estimate]] = field(default_factory=list)  # (what, estimate)
    answer: str = ""


def _verdict(e: Estimate, positive: str, negative: str) -> str:
    if e.mean is None:
        return "no finished seeds"
    if e.n < 2:
        return f"one seed ({e.mean:+.2f}): no interval, no finding"
    if not e.resolved:
        return f"not resolved at this budget ({e.text(True)} spans zero, {e.n} seeds; {_power(e)})"
    return f"{positive if e.mean > 0 else negative}: {e.text(True)} points, {e.n} seeds, " \
           f"improvement in {e.p_improve:.0%} of them"


def _power(e: Estimate) -> str:
    """The observed spread and the seeds at which an effect of this size would be resolved."""
    n = seeds_needed(e)
    if n is None:
        return "no spread to plan from"
    need = f"about {n} seeds would resolve an effect of this size" if n <= 1000 else "too small to resolve with 1,000 seeds"
    return f"paired SD {e.sd:.2f}: {need}"


def _series(df: pd.DataFrame, method: str, teacher=None, augment=None) -> pd.Series:
    sub = df[df["method"] == method]
    if teacher is not None and method not in teacherless(df):
        sub = sub[sub["teacher"] == teacher]
    if augment is not None:
        sub = sub[sub["augment"] == augment]
    return by_seed(sub)


def _mean_over(series: list[pd.Series]) -> pd.Series:
    """Per seed, the mean over several settings (seeds present in all of them)."""
    if not series:
        return pd.Series(dtype=float)
    common = series[0].index
    for s in series[1:]:
        common = common.intersection(s.index)
    return sum(s.loc[common] for s in series) / len(series)


def degradation_findings(df: pd.DataFrame, teachers: list, augs: list) -> list[Finding]:
    """Q1-Q4 for a frame with teacher, augment, method and seed; teachers ordered by size.  Which method is the
    student alone, KD, MKD and a rival comes from the methods' declared roles (``Method.role``)."""
    ce, kd, mkd = role_of(df, "baseline"), role_of(df, "reference"), role_of(df, "subject")
    if ce is None or kd is None or len(teachers) < 1:
        return []
    CE, KD = label_of(df, ce), label_of(df, kd)
    small, large = teachers[0], teachers[-1]
    augs = sorted(augs, key=lambda a: AUG_ORDER.index(a) if a in AUG_ORDER else len(AUG_ORDER))
    weak, strong = augs[0], augs[-1]

    def gain(m: str, base: str, t, a) -> pd.Series:
        return difference(_series(df, m, t, a), _series(df, base, t, a))

    out = []
    q1 = Finding("Q1 gap", f"Does {KD}'s gain over {CE} shrink from the smallest teacher ({small}) to the largest ({large})?")
    if large != small:
        for a in augs:
            e = paired(difference(gain(kd, ce, large, a), gain(kd, ce, small, a)))
            q1.effects.append((f"augment={a}: {KD} gain with {large} minus with {small}", e))
        pooled = paired(_mean_over([difference(gain(kd, ce, large, a), gain(kd, ce, small, a)) for a in augs]))
        q1.effects.append(("mean over augmentations", pooled))
        q1.answer = _verdict(pooled, f"{KD}'s gain grows with the teacher", f"{KD}'s gain shrinks with the teacher")
    else:
        q1.answer = "needs two teachers"
    out.append(q1)

    if strong != weak:
        q2 = Finding("Q2 augmentation", f"Does {KD}'s gain over {CE} shrink under {strong} augmentation (vs {weak})?")
        per_t = []
        for t in teachers:
            d = difference(gain(kd, ce, t, strong), gain(kd, ce, t, weak))
            per_t.append(d)
            q2.effects.append((f"teacher {t}: {KD} gain under {strong} minus under {weak}", paired(d)))
        pooled = paired(_mean_over(per_t))
        q2.effects.append(("mean over teachers", pooled))
        q2.answer = _verdict(pooled, f"{KD}'s gain grows under {strong} augmentation",
                             f"{KD}'s gain shrinks under {strong} augmentation")
        ce_weak, ce_strong = _series(df, ce, augment=weak), _series(df, ce, augment=strong)
        if len(ce_weak) and len(ce_strong) and ce_strong.mean() < BASELINE_FLOOR * ce_weak.mean():
            q2.answer = (f"not answerable at this budget: the student trained alone reaches {ce_strong.mean():.2f} "
                         f"under {strong} augmentation against {ce_weak.mean():.2f} under {weak} (below "
                         f"{BASELINE_FLOOR:.0%} of it), so {KD}'s gain under {strong} augmentation measures an "
                         f"under-trained baseline, not the paper's regime; the measured effect: {q2.answer}")
    else:
        q2 = Finding("Q2 augmentation", f"Does {KD}'s gain over {CE} shrink under strong augmentation?",
                     answer="needs two augmentations")
    out.append(q2)

    if mkd is not None:
        out.append(_cure(df, mkd, kd, teachers, augs, gain))
        rivals = [m for m in roles_of(df, "rival") if len(_series(df, m))]
        if rivals:
            out.append(_rivals(df, mkd, kd, rivals, teachers, augs))
    return out


def _cure(df, mkd, kd, teachers, augs, gain) -> Finding:
    """Q3: MKD minus KD overall, and how it changes with the gap and under strong augmentation."""
    MKD, KD = label_of(df, mkd), label_of(df, kd)
    small, large, weak, strong = teachers[0], teachers[-1], augs[0], augs[-1]
    q3 = Finding("Q3 cure", f"Does {MKD}'s gain over {KD} grow with the teacher"
                 + (" and under strong augmentation?" if strong != weak else "?"))
    overall = paired(_mean_over([gain(mkd, kd, t, a) for t in teachers for a in augs]))
    q3.effects.append((f"{MKD} minus {KD}, mean over all settings", overall))
    parts = [f"overall, {_verdict(overall, f'{MKD} beats {KD}', f'{MKD} trails {KD}')}"]
    if large != small:
        gap = paired(_mean_over([difference(gain(mkd, kd, large, a), gain(mkd, kd, small, a)) for a in augs]))
        q3.effects.append((f"({MKD} - {KD}) with {large} minus with {small}, mean over augmentations", gap))
        parts.append(f"with the gap, {_verdict(gap, 'its gain grows', 'its gain shrinks')}")
    if strong != weak:
        strong_e = paired(_mean_over([difference(gain(mkd, kd, t, strong), gain(mkd, kd, t, weak)) for t in teachers]))
        q3.effects.append((f"({MKD} - {KD}) under {strong} minus under {weak}, mean over teachers", strong_e))
        parts.append(f"with augmentation, {_verdict(strong_e, 'its gain grows', 'its gain shrinks')}")
    q3.answer = "; ".join(parts)
    return q3


def _rivals(df, mkd, kd, rivals, teachers, augs) -> Finding:
    """Q4, the reviewer's question: per setting, is MKD's gain over KD larger than the best rival's?  The best
    rival of a setting is the one with the largest mean gain over KD there; the effect is MKD minus it, per seed
    (KD cancels), with its paired interval."""
    MKD, KD = label_of(df, mkd), label_of(df, kd)
    names = ", ".join(label_of(df, r) for r in rivals)
    q4 = Finding("Q4 rivals", f"Is {MKD}'s gain over {KD} larger than the best rival's ({names}), per setting?")
    wins = losses = unresolved = 0
    open_: list[Estimate] = []
    for t in teachers:
        for a in augs:
            gains = {r: paired(difference(_series(df, r, t, a), _series(df, kd, t, a))) for r in rivals}
            gains = {r: e for r, e in gains.items() if e.mean is not None}
            if not gains:
                continue
            best = max(gains, key=lambda r: gains[r].mean)
            e = paired(difference(_series(df, mkd, t, a), _series(df, best, t, a)))
            mine = paired(difference(_series(df, mkd, t, a), _series(df, kd, t, a)))
            setting = f"teacher {t}" + (f", augment={a}" if len(augs) > 1 else "")
            q4.effects.append((f"{setting}: {MKD} - {KD} {mine.text(True)}, best rival {label_of(df, best)} - {KD} "
                               f"{gains[best].text(True)}; {MKD} minus {label_of(df, best)}", e))
            if e.mean is None or e.n < 2 or not e.resolved:
                unresolved += 1
                open_.append(e)
            elif e.mean > 0:
                wins += 1
            else:
                losses += 1
    n = wins + losses + unresolved
    q4.answer = (f"in {n} settings, {MKD}'s gain over {KD} is larger than the best rival's in {wins}, smaller in "
                 f"{losses}, and not resolved at this budget in {unresolved}")
    needs = sorted(k for k in (seeds_needed(e) for e in open_) if k is not None)
    if needs:  # what would resolve the open settings: the easiest and the hardest of them
        span = f"{needs[0]}" if needs[0] == needs[-1] else f"{needs[0]} to {needs[-1] if needs[-1] <= 1000 else '>1000'}"
        q4.answer += (f" (paired SD {min(e.sd for e in open_ if e.sd is not None):.2f} to "
                      f"{max(e.sd for e in open_ if e.sd is not None):.2f}: about {span} seeds would resolve "
                      "effects of these sizes)")
    return q4


def findings_lines(findings: list[Finding]) -> list[str]:
    """Plain sentences for the Markdown/HTML outputs and the README."""
    lines = []
    for f in findings:
        lines.append(f"**{f.question}.** {f.asks} {f.answer[0].upper() + f.answer[1:]}.")
        for what, e in f.effects:
            p = f", P(improvement) {e.p_improve:.2f}" if e.p_improve is not None else ""
            n = seeds_needed(e)
            p += (f", SD {e.sd:.2f}, {n if n <= 1000 else '>1000'} seeds for 80% power" if n is not None else "")
            lines.append(f"- {what}: {e.text(True)}{p}")
    if lines:
        lines.append(f"Effects in top-1 points: mean of per-seed differences, [{PAIRED_INTERVAL}]; * marks an "
                     "interval that excludes zero; P(improvement): share of seeds with a positive difference; "
                     f"SD: the paired standard deviation over seeds; {POWER_METHOD}. More seeds: "
                     "`--axis seed=0..N` (finished seeds are reused).")
    return lines

