"""The claims scoreboard: one row per claim of the MKD paper (and the reviewer's question about the rival cures),
with the paper's number where one is published, this study's estimate and interval, the verdict, and what
resolving it would cost.

The claims and where each is tested are listed in docs/claims.md (``tests/test_claims.py`` keeps the two in step).
The verdict reads a finding's headline against the claim's direction: *supported* (an effect in the claimed
direction, or, for a robustness claim, no change larger than the smallest effect of interest), *contradicted*
(an effect against it, or no effect larger than delta where the claim predicts one), *not resolved*, or *not run*.
Costs come from ``benchmarks/prices.json`` (``python benchmarks/run.py --prices``: the plan's cost model per seed
and scale), read as data: the analysis imports no training code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from analysis.findings import NO_DATA, NOT_ANSWERABLE, Finding
from analysis.stats import EFFECT, EQUIVALENT, OPEN

PRICES = Path(__file__).resolve().parent.parent / "benchmarks" / "prices.json"
SUPPORTED, CONTRADICTED, UNRESOLVED, NOT_RUN = "supported", "contradicted", "not resolved", "not run"
NOTE = {NOT_ANSWERABLE: " (measures an under-trained student alone: see the finding)"}


@dataclass(frozen=True)
class Claim:
    key: str
    text: str  # the claim, in the paper's words where it has them
    source: str
    published: str = ""  # the paper's (or its neighbours') number, where one is published (docs/published.md)
    tested: tuple = ()  # (suite, finding key) pairs, the first the paper's own setting
    sign: int = 0  # +1 / -1: the direction the claim predicts for the finding's effect; 0: no change (robustness)
    untested: str = ""  # why no suite answers it, and what would
    price: tuple = ()  # (book, entry, method): what a pilot costs where no run answers it (benchmarks/prices.json)
    measure: str = ""  # what the estimate is, in a few words (analysis/findings.py has each finding's definition)


CLAIMS = (
    Claim("gap", "KD degrades with the teacher-student gap: a larger, better teacher can give a worse student",
          "MKD abstract", "ImageNet, ResNet-18: KD (T=4) 71.21 -> 71.12 (-0.09) as the teacher gains +5.0 points, "
          "ResNet-34 -> ResNet-152 (DIST README)", (("degradation", "Q1 gap"), ("gap_ladder", "Q1 gap")), -1,
          measure="KD's gain over CE, largest teacher minus smallest"),
    Claim("augmentation", "KD degrades under strong augmentation (RandAugment, Mixup, CutMix)", "MKD abstract",
          "ImageNet, ResNet-18, DIST's strong recipe: KD 72.6 below the student alone 73.4 (DIST README)",
          (("degradation", "Q2 augmentation"),), -1,
          measure="KD's gain over CE, strong augmentation minus weak"),
    Claim("tuned temperatures", "Properly tuned teacher/student temperatures mitigate the degradation",
          "MKD abstract", "", (("temperature_grid", "Q5 mitigation"),), +1,
          measure="what tuning KD's temperatures recovers (best cell minus default) with the larger teacher minus "
                  "with the smaller"),
    Claim("transfer", "A grid-searched temperature transfers poorly to another setting", "MKD abstract", "",
          (("temperature_grid", "Q6 transfer"),), -1,
          measure="another setting's best cell minus the setting's own best"),
    Claim("cure", "MKD (meta-learned temperatures) improves on KD", "MKD abstract",
          "ViT-T +4.2, ViT-S +2.3 over previous distillation methods (a secondary summary; baseline unnamed)",
          (("degradation", "Q3 cure"), ("gap_ladder", "Q3 cure")), +1,
          measure="MKD minus KD, over all settings"),
    Claim("dataset scale", "MKD is robust to the dataset's scale", "MKD abstract", "",
          (("data_fraction", "Q7 dataset scale"),), 0,
          measure="MKD's gain over KD at 10% of the data minus at 100%"),
    Claim("architectures", "MKD is robust to the teacher/student architectures", "MKD abstract", "",
          (("degradation+gap_ladder", "Q8 architectures"),), 0,
          measure="MKD minus KD on the ViT ladder minus on the ResNet one (unpaired)"),
    Claim("augmentation type", "MKD is robust to the augmentation type", "MKD abstract", "", (), 0,
          untested="no suite varies the augmentation type apart (RandAugment, Mixup, CutMix); "
                   "--axis augment=weak,medium,strong on degradation separates RandAugment (medium) from "
                   "RandAugment + Mixup/CutMix (strong)"),
    Claim("ViT-L 86.5", "ViT-L with MKD reaches 86.5% on ImageNet-1K only (600 epochs), +0.6 over MAE (85.9%, "
          "1,650 epochs)", "MKD abstract", "86.5 (MKD ViT-L); 85.9 (MAE ViT-L)", (("imagenet_main", "ViT-L"),), +1,
          price=("extra", "imagenet_main ViT-L 600 epochs", "mkd")),
    Claim("rivals", "Reviewer's question: is MKD's gain over KD larger than the rival cures' (DIST, DKD, CTKD)?",
          "this suite", "ImageNet ResNet-34 -> ResNet-18: DKD 71.70 (its KD 71.03), CTKD 71.32 (its KD 70.83); "
          "DIST +0.86 to +1.12 over KD on the DIST ladder (their READMEs)",
          (("degradation", "Q4 rivals"), ("gap_ladder", "Q4 rivals")), +1,
          measure="MKD minus each rival, over all settings"),
)


@dataclass
class Row:
    claim: Claim
    lines: list[dict] = field(default_factory=list)  # per tested suite: estimate, verdict, cost
    verdict: str = NOT_RUN

    def as_dict(self) -> dict:
        return {"claim": self.claim.key, "text": self.claim.text, "published": self.claim.published,
                "verdict": self.verdict, "lines": self.lines}


def judge(f: Finding, sign: int) -> str:
    """A finding's verdict read against the claim's direction."""
    if f.verdict == NOT_ANSWERABLE:
        return NOT_ANSWERABLE
    if f.verdict == NO_DATA or f.headline is None or f.headline.mean is None:
        return NOT_RUN
    if f.verdict == EFFECT:
        if sign == 0:
            return CONTRADICTED
        return SUPPORTED if (f.headline.mean > 0) == (sign > 0) else CONTRADICTED
    if f.verdict == EQUIVALENT:
        return SUPPORTED if sign == 0 else CONTRADICTED
    return UNRESOLVED


def load_prices(path: Path = PRICES) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _money(lo_hi: list, unit: str) -> str:
    lo, hi = lo_hi
    fmt = (lambda x: f"{x:,.0f}") if hi >= 10 else (lambda x: f"{x:,.1f}")
    return f"{fmt(lo)} {unit}" if abs(hi - lo) < 1e-9 else f"{fmt(lo)}-{fmt(hi)} {unit}"


def cost_text(suite: str, methods: tuple, seeds: int, have: int, scale: str, prices: dict) -> str:
    """What ``seeds`` seeds of the methods a finding reads cost: the extra seeds at the scale it ran at, the whole
    count at the larger scales (``benchmarks/prices.json``; each scale's one-off teachers and tuning included)."""
    parts = []
    books = [(prices.get("suites") or {}).get(part) or {} for part in suite.split("+")]  # a finding across suites
    for s in ("tiny", "cifar", "imagenet"):  # needs the seeds of each of them
        ps = [b[s] for b in books if b.get(s)]
        if not ps:
            continue
        per = [sum((p["per_seed"].get(m) or [0, 0])[i] for p in ps for m in methods) for i in (0, 1)]
        if not any(per):
            continue
        n = max(0, seeds - have) if s == scale else seeds
        total = [n * per[i] + (0 if s == scale else sum(p.get("once", [0, 0])[i] for p in ps)) for i in (0, 1)]
        what = f"{n} more at {s}" if s == scale else f"{s}"
        parts.append(f"{what}: {_money(total, ps[0]['unit'])}")
    return "; ".join(parts)


def pilot_text(c: Claim, prices: dict) -> str:
    """What a 3-seed pilot of the claim's suite costs at each scale (no run answers it yet)."""
    if c.price:
        book, entry, method = c.price
        p = (prices.get(book) or {}).get(entry)
        if p:
            return f"not run: a 3-seed pilot ({entry}, {method}): {_money([3 * x for x in p['per_seed'][method]], p['unit'])}"
    suite = c.tested[0][0] if c.tested else ""
    costs = []
    for part in suite.split("+"):  # a finding across suites needs each of them
        book = (prices.get("suites") or {}).get(part) or {}
        for scale in ("tiny", "cifar", "imagenet"):
            if p := book.get(scale):
                per = [sum(v[i] for v in p["per_seed"].values()) for i in (0, 1)]
                costs.append(f"{part + ' at ' if '+' in suite else ''}{scale}: "
                             f"{_money([3 * per[0] + p['once'][0], 3 * per[1] + p['once'][1]], p['unit'])}")
    return f"not run: a 3-seed pilot of {' and '.join(suite.split('+'))}: " + "; ".join(costs) if costs else "not run"


def scoreboard(findings: list[Finding], prices: Optional[dict] = None) -> list[Row]:
    """One row per claim from the findings the analysis made (every suite and scale it read)."""
    prices = load_prices() if prices is None else prices
    rows = []
    for c in CLAIMS:
        row = Row(c)
        if c.untested:
            row.verdict = "not tested"
            row.lines.append({"suite": "", "estimate": "", "verdict": "not tested", "resolve": c.untested})
        for suite, key in c.tested:
            for f in (x for x in findings if x.suite == suite and x.key == key):
                v = judge(f, c.sign)
                e = f.headline
                n = f.seeds_needed
                if v in (SUPPORTED, CONTRADICTED) and f.unresolved and n is not None and n <= 1000:
                    resolve = (f"resolved; still open: {f.unresolved}, about {n} seeds (delta {f.delta:g}, paired "
                               f"SD {e.sd:.2f}); " + cost_text(suite, f.methods, n, e.n, f.scale, prices))
                elif v in (SUPPORTED, CONTRADICTED):
                    resolve = "resolved"
                elif v == NOT_ANSWERABLE:
                    resolve = ("not by more seeds: a budget where the student trained alone learns under the strong "
                               "recipe (longer runs, or the cifar or imagenet scale)")
                elif n is None:
                    resolve = (f.answer or "a pilot with at least 2 seeds") if v == NOT_RUN else "no spread to plan from"
                else:
                    resolve = (f"about {n} seeds (delta {f.delta:g}, paired SD {e.sd:.2f}); "
                               + cost_text(suite, f.methods, n, e.n, f.scale, prices)) if n <= 1000 else \
                        "more than 1,000 seeds at this spread"
                row.lines.append({"suite": f"{suite} ({f.scale})", "finding": f.key,
                                  "estimate": f.summary or (e.text(True) if e is not None and e.mean is not None
                                                            else ""),
                                  "brief": f.brief or ((e.text(True) + (f" (inside ±{f.delta:g})" if f.verdict == EQUIVALENT
                                                                         else NOTE.get(v, ""))) if e is not None
                                                       and e.mean is not None else ""),
                                  "seeds_needed": n if v == UNRESOLVED else None,
                                  "seeds": e.n if e is not None else 0, "verdict": v, "answer": f.answer,
                                  "resolve": resolve})
        if not row.lines:
            row.lines.append({"suite": c.tested[0][0] if c.tested else "", "estimate": "", "verdict": NOT_RUN,
                              "resolve": pilot_text(c, prices)})
        verdicts = [l["verdict"] for l in row.lines]
        row.verdict = next((v for v in (SUPPORTED, CONTRADICTED) if v in verdicts), None) or \
            (UNRESOLVED if UNRESOLVED in verdicts else verdicts[0])
        if SUPPORTED in verdicts and CONTRADICTED in verdicts:
            row.verdict = "mixed"
        rows.append(row)
    return rows


def scoreboard_text(rows: list[Row]) -> str:
    """The scoreboard as plain text (``make_tables.py --claims``)."""
    out = []
    for r in rows:
        out.append(f"{r.claim.key}: {r.claim.text}")
        if r.claim.published:
            out.append(f"  paper: {r.claim.published}")
        for l in r.lines:
            est = f"{l['estimate']} ({l.get('seeds', 0)} seeds)" if l.get("estimate") else ""
            out.append(f"  {l['suite'] or '-'}: {est} -> {l['verdict']}; to resolve: {l['resolve']}".replace(
                ":  ->", ": ->"))
        out.append(f"  verdict: {r.verdict}")
    return "\n".join(out)


__all__ = ["CLAIMS", "Claim", "Row", "scoreboard", "scoreboard_text", "judge", "OPEN"]
