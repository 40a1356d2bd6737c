"""Tables of one suite at one scale, built from the tidy ``runs`` frame (rendering: ``report.py``).

A cell is the mean final top-1 over the seeds of its finished runs with its 95% Student-t interval over seeds when
there are two or more (``stats.py``), and, beside each method's cell, its paired difference to the reference
method (KD) with its own 95% paired-t interval.  Every cell keeps two faces: the full numbers (Markdown and LaTeX:
``66.91 [65.06, 68.76] (+0.04 [-2.01, +2.09])``) and the one a reader scans (HTML: the mean, the intervals on a
lighter second line, a resolved difference marked by its colour).  A suite whose matrix is wide is split into one
table per augmentation (or per setting).  A cell whose runs are not all finished says so; a cell whose method
ends below the student trained alone, or whose training loss never fell, is marked as a failed run of the protocol
(``failure``), and the findings name it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from analysis.frame import (colour_of, label_of, learned, methods_in, role_of, sorted_values as _sorted,  # noqa: F401
                            teacherless, teachers_by_size)
from analysis.stats import INTERVAL, PAIRED_INTERVAL, Estimate, by_seed, difference, paired, t_interval
from mkd.errors import UserError

DASH = "—"
AUG_ORDER = ["none", "weak", "medium", "strong"]
FAILED_MARK = "†"


@dataclass
class CellView:
    """One table cell: ``full`` for Markdown/LaTeX, ``main``/``sub``/``title``/``classes`` for HTML."""

    full: str
    main: str = ""
    sub: str = ""
    title: str = ""
    classes: tuple = ()
    colour: Optional[str] = None  # a method's colour (a header swatch), the same in every table and figure
    delta: str = ""  # HTML: the paired difference to the reference, a third short line (its interval on hover)

    def __str__(self) -> str:
        return self.full


def plain(text) -> CellView:
    return CellView(str(text), str(text))


@dataclass
class Table:
    name: str  # file stem
    title: str
    header: list[list]  # header rows of str or CellView (spans expanded: repeated labels merge in html/tex)
    rows: list[list]  # rows of CellView (or str)
    notes: list[str] = field(default_factory=list)
    values: Optional[pd.DataFrame] = None  # numbers behind the cells (the per-cell csv)
    findings: list[str] = field(default_factory=list)  # the study's questions answered (findings.py), Markdown
    provenance: list[str] = field(default_factory=list)  # which runs, commit, environment, dates (``provenance``)

    @property
    def finding_groups(self) -> list[dict]:
        """The findings as a reader takes them: each headline with its per-setting lines, then the footnote."""
        groups: list[dict] = []
        for line in self.findings:
            if line.startswith("- ") and groups:
                groups[-1]["items"].append(line)
            else:
                groups.append({"head": line, "items": []})
        return groups


def provenance(df: pd.DataFrame, suite: str, scale: str) -> list[str]:
    """One sentence naming the runs behind a table: how many, their seeds, the commit(s) and environment(s)
    they were made with, and when they finished (from their results: the same runs give the same words)."""
    done = df[df["status"] == "done"].drop_duplicates("run_id")
    seeds = sorted({int(s) for s in done["seed"].dropna()}) if "seed" in done else []

    def listed(col: str) -> str:
        vals = sorted({str(v) for v in done[col].dropna()}) if col in done else []
        return ", ".join(vals) or "unknown"

    dates = sorted(str(v)[:10] for v in done["finished_at"].dropna()) if "finished_at" in done else []
    when = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else "unknown"
    return [f"Suite {suite}, scale {scale}: {len(done)} finished runs"
            + (f" (seeds {', '.join(map(str, seeds))})" if seeds else "")
            + f"; commit {listed('git_commit')}; {listed('environment')}; finished {when}."]


def tuning_notes(df: pd.DataFrame) -> list[str]:
    """How each method's setting was chosen where the suite tunes (``mkd/tuning.py``), and what was chosen, per
    method and setting (run.json's ``tuned``)."""
    if "tuning" in df and df["tuning"].dropna().str.startswith("not tuned").any():
        return [f"Tuning: {df['tuning'].dropna().iloc[0]}, though the suite tunes at this scale."]
    if "tuned_setting" not in df or df["tuned_setting"].isna().all():
        taught = [m for m in methods_in(df) if m not in teacherless(df)]
        if len(taught) < 2:
            return []
        return ["Not tuned: every method runs this scale's one recipe (learning rate, temperatures as configured), "
                "so a difference between methods may be the recipe's rather than the method's; the equal tuning "
                "budget (the suite file's `tuning:` section, mkd/tuning.py) does not cover this scale."]
    done = df.drop_duplicates("run_id")
    how = done["tuning"].dropna().iloc[0]
    axes = [c for c in ("student", "teacher", "augment", "fraction") if c in df and df[c].nunique() > 1]
    parts = []
    for m in methods_in(df):
        sub = df[(df["method"] == m) & df["tuned_setting"].notna()]
        if not len(sub):
            continue
        if m in teacherless(df):
            sub = sub.drop_duplicates([a for a in axes if a != "teacher"] + ["tuned_setting"])
        by = sub.groupby("tuned_setting", sort=False)
        picks = []
        for setting, g in by:
            where = sorted({", ".join(str(r[a]) for a in axes if not (a == "teacher" and m in teacherless(df)))
                            for _, r in g.iterrows()} - {""})
            picks.append(setting + (f" ({'; '.join(where)})" if where and by.ngroups > 1 else ""))
        parts.append(f"{label_of(df, m)}: {' | '.join(picks)}")
    per = f", chosen per {', '.join(axes)}" if axes else ""
    return [f"Tuning: {how}{per}; the validation set this table reports plays no part. Chosen settings: "
            + "; ".join(parts) + "."]


# ---------------------------------------------------------------------------- cells
@dataclass
class Cell:
    mean: Optional[float]
    std: Optional[float]
    n: int
    states: dict
    lo: Optional[float] = None  # 95% t interval over seeds (two or more seeds)
    hi: Optional[float] = None

    def pending(self) -> dict:
        return {k: v for k, v in self.states.items() if k != "done" and v}

    def text(self, digits: int = 2) -> str:
        pending = self.pending()
        if self.mean is None:
            if not pending:
                return DASH
            return ", ".join(f"{k}" if v == sum(pending.values()) and len(pending) == 1 else f"{v} {k}"
                             for k, v in pending.items())
        s = f"{self.mean:.{digits}f}"
        if self.lo is not None:
            s += f" [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"
        if pending:
            s += " (" + ", ".join(f"{v} {k}" for k, v in pending.items()) + ")"
        return s


def cell(df: pd.DataFrame, metric: str = "final_top1") -> Cell:
    """Aggregate the runs of one cell; one run per seed (duplicated rows of one run count once)."""
    df = df.drop_duplicates("run_id")
    states = df["status"].value_counts().to_dict()
    done = df[df["status"] == "done"][metric].dropna().astype(float)
    if len(done) == 0:
        return Cell(None, None, 0, states)
    std = float(done.std(ddof=1)) if len(done) > 1 else None
    e = t_interval(list(done))
    return Cell(float(done.mean()), std, len(done), states, e.lo, e.hi)


def failure(runs: pd.DataFrame, c: Cell, alone: Optional[Cell], alone_label: str,
            vs_alone: Optional[Estimate] = None) -> Optional[str]:
    """Why a cell is a failed run of the protocol (None when it is not): its mean ends below the student trained
    alone in the same setting (with the paired interval of the difference), or its training loss never fell (its
    last epoch's loss not below its first) in most of its runs.  The loss test is for methods whose loss keeps its
    scale: one that learns its temperatures reweights its own loss as they move (MKD's KD term is weighted by
    tau_t x tau_s), so its loss is no measure of progress."""
    why = []
    if c.mean is not None and alone is not None and alone.mean is not None and c.mean < alone.mean:
        how = (f"; paired difference {vs_alone.text(True)}" + ("" if vs_alone.resolved else ", not resolved")
               if vs_alone is not None and vs_alone.lo is not None else "")
        why.append(f"ends below the student alone ({c.mean:.2f} vs {alone_label} {alone.mean:.2f}{how})")
    learns = "learns_temperature" in runs and runs["learns_temperature"].fillna(False).astype(bool).any()
    if "loss_fell" in runs and not learns:
        fell = runs.drop_duplicates("run_id")["loss_fell"].dropna()
        if len(fell) and (~fell.astype(bool)).sum() * 2 > len(fell):
            why.append(f"its training loss never fell in {int((~fell.astype(bool)).sum())} of {len(fell)} runs")
    return "; ".join(why) or None


def view(c: Cell, d: Optional[Estimate], ref_label: str, failed: Optional[str] = None,
         is_ref: bool = False) -> CellView:
    """A method's cell: the mean first; the interval and the paired difference to the reference after it."""
    diff = f" ({d.text(True)})" if d is not None and d.mean is not None else ""
    mark = f" {FAILED_MARK}" if failed else ""
    full = c.text() + diff + mark
    if c.mean is None:
        return CellView(full, c.text(), classes=("pending",))
    pending = c.pending()
    main = f"{c.mean:.2f}" + (" " + ", ".join(f"{v} {k}" for k, v in pending.items()) if pending else "") + mark
    sub = f"[{c.lo:.2f}, {c.hi:.2f}]" if c.lo is not None else f"{c.n} seed"
    classes = ["ref"] if is_ref else []
    title = f"mean of {c.n} seeds" + (f", 95% interval {c.lo:.2f} to {c.hi:.2f}" if c.lo is not None else "")
    delta = ""
    if d is not None and d.mean is not None:
        delta = f"{d.mean:+.2f} vs {ref_label}" + ("*" if d.resolved else "")
        title += f"; minus {ref_label}, paired by seed: {d.text(True)}"
        if d.resolved:
            classes.append("better" if d.mean > 0 else "worse")
            title += " (resolved)"
    if failed:
        classes.append("failed")
        title += f"; failed run of this protocol: {failed}"
    return CellView(full, main, sub, title, tuple(classes), delta=delta)


def _params(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return DASH
    n = float(n)
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _pct(x) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.2f}"


def _filter(df: pd.DataFrame, **kw) -> pd.DataFrame:
    for k, v in kw.items():
        df = df[df[k] == v] if k in df.columns else df.iloc[0:0]
    return df


def teacher_info(df: pd.DataFrame, label, reference: Optional[pd.DataFrame] = None) -> tuple[str, str, str]:
    """(model, parameters, top-1: ours, and the published one beside it where tables/paper_reference.csv has it)."""
    t = df[(df.get("teacher") == label) & df["teacher_model"].notna()] if "teacher" in df else df.iloc[0:0]
    if not len(t):
        return DASH, DASH, DASH
    r = t.iloc[0]
    tt = t["teacher_top1"].dropna() if "teacher_top1" in t else pd.Series(dtype=float)
    tp = t["teacher_params"].dropna() if "teacher_params" in t else pd.Series(dtype=float)
    top1 = _pct(tt.iloc[0] if len(tt) else None)
    if reference is not None and len(reference):
        pub = reference[(reference["method"] == "teacher") & (reference["model"] == r["teacher_model"])]
        if len(pub):
            top1 += f" (published {float(pub['top1'].iloc[0]):g})"
    return str(r["teacher_model"]), _params(tp.iloc[0] if len(tp) else None), top1


def method_header(df: pd.DataFrame, m) -> CellView:
    return CellView(label_of(df, m), label_of(df, m), colour=colour_of(m))


# ---------------------------------------------------------------------------- table kinds
def degradation(df: pd.DataFrame, suite: str, scale: str, reference: Optional[pd.DataFrame] = None) -> list[Table]:
    """One table per augmentation: rows = teacher (model, size, top-1), columns = methods; each method's cell with
    its paired difference to KD."""
    teachers = teachers_by_size(df)
    augs = _sorted(df["augment"], AUG_ORDER) if "augment" in df else [None]
    methods = methods_in(df)
    ref, alone = role_of(df, "reference"), teacherless(df)
    base = role_of(df, "baseline")
    ref_label = label_of(df, ref) if ref else "the reference method"
    tables = []
    for a in augs:
        sub = _filter(df, augment=a) if a is not None else df
        header = ["teacher", "model", "params", "teacher top-1"] + [method_header(df, m) for m in methods]
        rows, vals, failed = [], [], []
        alone_cell = cell(sub[sub["method"] == base]) if base is not None else None
        for t in teachers:
            model, size, top1 = teacher_info(df, t, reference)
            row = [plain(t), plain(model), plain(size), plain(top1)]
            runs = {m: sub[(sub["method"] == m) & ((sub["teacher"] == t) | (m in alone))] for m in methods}
            for m in methods:
                c = cell(runs[m])
                d = paired(difference(by_seed(runs[m]), by_seed(runs[ref]))) if ref in runs and m != ref else None
                vs = paired(difference(by_seed(runs[m]), by_seed(sub[sub["method"] == base]))) \
                    if base is not None and m != base else None
                why = failure(runs[m], c, alone_cell, label_of(df, base), vs) if vs is not None else None
                if why:
                    failed.append(f"{label_of(df, m)} with teacher {t}" + (f" under {a} augmentation" if a else "")
                                  + f": {why}")
                row.append(view(c, d, ref_label, why, m == ref))
                vals.append({"teacher": t, "augment": a, "method": m, "top1_mean": c.mean, "top1_lo": c.lo,
                             "top1_hi": c.hi, "top1_std": c.std, "n": c.n,
                             "minus_kd": d.mean if d else None, "minus_kd_lo": d.lo if d else None,
                             "minus_kd_hi": d.hi if d else None, "p_improve_over_kd": d.p_improve if d else None,
                             "failed": why})
            rows.append(row)
        notes = [f"Cells: final top-1 (%) on the validation set, mean over seeds [{INTERVAL}]; then the paired "
                 f"difference to {ref_label} with the same teacher, augmentation and seed [{PAIRED_INTERVAL}], * (in "
                 "colour in HTML) when it excludes zero."]
        notes += [f"{label_of(df, m)} trains without a teacher: its cell repeats in every teacher row." for m in methods
                  if m in alone]
        if failed:
            notes.append(f"{FAILED_MARK} A failed run of this protocol (not a measure of the method): "
                         + "; ".join(failed) + ".")
        what = f"augment={a}" if a is not None else "all runs"
        tables.append(Table(f"{suite}_{scale}" + (f"_{a}" if len(augs) > 1 else ""),
                            f"{suite} ({scale}), {what}: student top-1 by teacher", [header], rows, notes,
                            pd.DataFrame(vals)))
    return tables


def gap_ladder(df: pd.DataFrame, suite: str, scale: str, reference: pd.DataFrame) -> list[Table]:
    """The degradation tables of a teacher ladder, each published number (tables/paper_reference.csv, matched
    by suite, scale, method and the teacher's model) in a column beside its method, with ours minus published
    when the runs are like for like (architecture and epochs; ``n/c`` otherwise, and a note says why)."""
    tables = degradation(df, suite, scale, reference)
    ref = reference
    if len(ref):
        ref = ref[(ref["suite"] == suite) & (ref.get("scale", pd.Series(scale, index=ref.index)).fillna(scale) == scale)
                  & (ref["method"] != "teacher")]
    methods = methods_in(df)
    with_pub = [m for m in methods if len(ref) and (ref["method"] == m).any()]
    if not with_pub:
        return tables
    alone = teacherless(df)
    out = []
    for table in tables:
        header = table.header[0][:4]
        for m in methods:
            header.append(method_header(df, m))
            if m in with_pub:
                header.append(plain(f"{label_of(df, m)} published"))
        sources: dict = {}
        rows, unlike = [], []
        for row in table.rows:
            t, t_model = row[0].full, row[1].full
            new = row[:4]
            for i, m in enumerate(methods):
                new.append(row[4 + i])
                if m not in with_pub:
                    continue
                pub = ref[(ref["method"] == m) & ((ref["teacher"].fillna("") == ("" if m in alone else t_model))
                                                 if "teacher" in ref else True)]
                if not len(pub):
                    new.append(plain(DASH))
                    continue
                p = pub.iloc[0]
                k = sources.setdefault(str(p["source"]), len(sources) + 1)
                runs = df[(df["method"] == m) & ((df["teacher"] == t) | (m in alone))]
                c = cell(runs)
                why = _unlike(runs, p) if c.mean is not None else None
                diff = "" if c.mean is None else (f" ({c.mean - float(p['top1']):+.2f})" if why is None else " (n/c)")
                if why:
                    unlike.append(f"{t} {label_of(df, m)}: not compared ({why}).")
                new.append(CellView(f"{float(p['top1']):.2f} [{k}]{diff}", f"{float(p['top1']):.2f} [{k}]",
                                    diff.strip(" ()"), classes=("published",)))
            rows.append(new)
        notes = table.notes + [f"[{i}] {src}" for src, i in sources.items()]
        notes += [f"{label_of(df, r['method'])} published ({r['teacher'] or 'no teacher'}): {r['note']}."
                  for _, r in ref[ref["method"].isin(with_pub)].iterrows()
                  if isinstance(r.get("note"), str) and r["note"]]
        notes += sorted(set(unlike)) + ["Published cells come only from tables/paper_reference.csv "
                                        "(docs/published.md); in brackets ours minus published, only against runs of "
                                        "the published architecture and epochs (n/c otherwise)."]
        out.append(Table(table.name, table.title.replace("by teacher", "along the teacher ladder"), [header], rows,
                         notes, table.values))
    return out


def data_fraction(df: pd.DataFrame, suite: str, scale: str) -> list[Table]:
    """Rows = training-set fraction, columns = methods, each with its paired difference to KD."""
    fracs = _sorted(df["fraction"])
    methods = methods_in(df)
    augs = _sorted(df["augment"], AUG_ORDER) if "augment" in df else [None]
    ref, base = role_of(df, "reference"), role_of(df, "baseline")
    ref_label = label_of(df, ref) if ref else "the reference method"
    tables = []
    for a in augs:
        rows, vals, failed = [], [], []
        for f in fracs:
            row = [plain(f"{f:g}")]
            sub = _filter(df, fraction=f, **({"augment": a} if a is not None else {}))
            alone_cell = cell(sub[sub["method"] == base]) if base is not None else None
            for m in methods:
                runs = sub[sub["method"] == m]
                c = cell(runs)
                d = paired(difference(by_seed(runs), by_seed(sub[sub["method"] == ref]))) \
                    if ref is not None and m != ref else None
                vs = paired(difference(by_seed(runs), by_seed(sub[sub["method"] == base]))) \
                    if base is not None and m != base else None
                why = failure(runs, c, alone_cell, label_of(df, base), vs) if vs is not None else None
                if why:
                    failed.append(f"{label_of(df, m)} at fraction {f:g}: {why}")
                row.append(view(c, d, ref_label, why, m == ref))
                vals.append({"fraction": f, "augment": a, "method": m, "top1_mean": c.mean, "top1_lo": c.lo,
                             "top1_hi": c.hi, "top1_std": c.std, "n": c.n, "minus_kd": d.mean if d else None,
                             "minus_kd_lo": d.lo if d else None, "minus_kd_hi": d.hi if d else None, "failed": why})
            rows.append(row)
        notes = [f"Cells: final top-1 (%), mean over seeds [{INTERVAL}]; then the paired difference to {ref_label} "
                 f"[{PAIRED_INTERVAL}]. Subsets are class-balanced and nested.", *fraction_notes(df)]
        if failed:
            notes.append(f"{FAILED_MARK} A failed run of this protocol: " + "; ".join(failed) + ".")
        tables.append(Table(f"{suite}_{scale}" + (f"_{a}" if len(augs) > 1 else ""),
                            f"{suite} ({scale}): student top-1 by training-set fraction"
                            + (f", augment={a}" if a is not None else ""),
                            [["fraction"] + [method_header(df, m) for m in methods]], rows, notes, pd.DataFrame(vals)))
    return tables


def fraction_notes(df: pd.DataFrame) -> list[str]:
    """How the fractions were budgeted: equal epochs (each fraction fewer steps) or equal optimizer steps."""
    if "epochs" not in df or "fraction" not in df:
        return []
    e = df.drop_duplicates("fraction").set_index("fraction")["epochs"].dropna()
    if e.nunique() > 1:
        return ["Budget: equal optimizer steps per fraction (epochs scaled by 1/fraction: "
                + ", ".join(f"{f:g}: {int(n)} epochs" for f, n in e.sort_index().items()) + ")."]
    return ["Budget: equal epochs per fraction, so a smaller fraction also trains for fewer optimizer steps."]


def temperature_grid(df: pd.DataFrame, suite: str, scale: str) -> list[Table]:
    """Per setting, KD's top-1 over the grid of fixed (tau_t, tau_s): the cell picked on the held-out split and
    KD's default marked, MKD in the same setting in the notes."""
    from analysis.findings import best_cell

    tables = []
    settings = [c for c in ("teacher", "augment") if c in df and df[c].nunique() > 1] or ["teacher"]
    keys = df[settings].drop_duplicates().to_dict("records")
    for key in keys:
        sub = _filter(df, **key)
        kd = sub[sub["method"] == role_of(sub, "reference")]
        tts, tss = _sorted(kd["kd.tau_t"]), _sorted(kd["kd.tau_s"])
        picked = best_cell(kd)
        rows, vals = [], []
        for tt in tts:
            row = [plain(f"{tt:g}")]
            for ts in tss:
                runs = kd[(kd["kd.tau_t"] == tt) & (kd["kd.tau_s"] == ts)]
                c = cell(runs)
                h = cell(runs, "heldout_top1") if "heldout_top1" in runs else Cell(None, None, 0, {})
                is_best = picked is not None and (float(tt), float(ts)) == picked
                is_default = (float(tt), float(ts)) == (4.0, 4.0)
                v = view(c, None, "")
                marks = ("best held-out" if is_best else "") + (" default" if is_default else "")
                v.full += (" ◆" if is_best else "") + (" ○" if is_default else "")
                v.classes += tuple(x for x, on in (("picked", is_best), ("default", is_default)) if on)
                v.title += f"; held-out top-1 {h.mean:.2f}" if h.mean is not None else ""
                v.sub = (v.sub + (f" · {marks.strip()}" if marks else "")).strip(" ·")
                row.append(v)
                vals.append({**key, "tau_t": tt, "tau_s": ts, "top1_mean": c.mean, "top1_lo": c.lo, "top1_hi": c.hi,
                             "top1_std": c.std, "n": c.n, "heldout_mean": h.mean, "picked": is_best})
            rows.append(row)
        label = ", ".join(f"{k}={v}" for k, v in key.items())
        model, size, top1 = teacher_info(df, key.get("teacher")) if "teacher" in key else (DASH, DASH, DASH)
        notes = [f"KD with fixed temperatures; rows tau_t, columns tau_s; final top-1 on the validation set, mean "
                 f"over seeds [{INTERVAL}]. Teacher {model} ({size}, top-1 {top1})."]
        if picked:
            notes.append(f"◆ the cell with the best held-out top-1 (tau_t={picked[0]:g}, tau_s={picked[1]:g}): picked "
                         "on a split of the training set, so its validation top-1 is not the number it was picked by; "
                         "○ KD's default (4, 4).")
        for m, runs in learned(sub).groupby("method", sort=True):
            done = runs[runs["status"] == "done"]
            temps = (f", learned tau_t={done['tau_t'].astype(float).mean():.2f}, tau_s="
                     f"{done['tau_s'].astype(float).mean():.2f}" if len(done) else "")
            notes.append(f"{runs['method_label'].iloc[0] if 'method_label' in runs else m} in the same setting: "
                         f"{cell(runs).text()}{temps}.")
        stem = f"{suite}_{scale}_" + "_".join(str(v) for v in key.values())
        tables.append(Table(stem, f"{suite} ({scale}), {label}: KD top-1 over (tau_t, tau_s)",
                            [["tau_t \\ tau_s"] + [f"{t:g}" for t in tss]], rows, notes, pd.DataFrame(vals)))
    return tables


def _unlike(runs: pd.DataFrame, pub: pd.Series) -> Optional[str]:
    """Why the finished runs of a cell are not the published configuration (None when they are like for like)."""
    done = runs[runs["status"] == "done"]
    ours = sorted({str(v) for v in done.get("student_model", pd.Series(dtype=object)).dropna()})
    epochs = sorted({int(v) for v in done.get("epochs", pd.Series(dtype=float)).dropna()})
    model = pub.get("model")
    why = []
    if isinstance(model, str) and model and ours != [model]:
        why.append(f"architecture: ours {', '.join(ours) or 'unknown'}, published {model}")
    if not pd.isna(pub.get("epochs")) and epochs != [int(pub["epochs"])]:
        why.append(f"epochs: ours {', '.join(map(str, epochs)) or 'unknown'}, published {int(pub['epochs'])}")
    return "; ".join(why) or None


def imagenet_main(df: pd.DataFrame, suite: str, scale: str, reference: pd.DataFrame) -> list[Table]:
    """Students x methods: reproduced, published (tables/paper_reference.csv) and reproduced minus published.

    The difference is shown only like for like (same architecture where the source fixes it, same epochs);
    otherwise the cell reads ``n/c`` and a note says what differs."""
    students = _sorted(df["student"], ["ViT-T", "ViT-S", "ViT-B", "ViT-L"])
    methods = methods_in(df)
    ref = reference[(reference["suite"] == suite) & (reference["method"] != "teacher")] if len(reference) else reference
    h1 = ["student"] + [m for m in methods for _ in range(3)]
    h2 = [""] + ["reproduced", "published", "diff"] * len(methods)
    rows, vals, sources, unlike = [], [], {}, []
    for s in students:
        row = [str(s)]
        for m in methods:
            runs = _filter(df, student=s, method=m)
            c = cell(runs)
            pub = ref[(ref["student"] == s) & (ref["method"] == m)] if len(ref) else ref
            p = float(pub["top1"].iloc[0]) if len(pub) and not pd.isna(pub["top1"].iloc[0]) else None
            diff, why = DASH, None
            if p is not None:
                src = str(pub["source"].iloc[0])
                sources.setdefault(src, len(sources) + 1)
                if c.mean is not None:
                    why = _unlike(runs, pub.iloc[0])
                    diff = f"{c.mean - p:+.2f}" if why is None else "n/c"
                    if why:
                        unlike.append(f"{s} {m}: not compared ({why}).")
            row += [c.text(), f"{p:.1f} [{sources[src]}]" if p is not None else DASH, diff]
            vals.append({"student": s, "method": m, "top1_mean": c.mean, "top1_std": c.std, "n": c.n, "published": p,
                         "comparable": None if p is None or c.mean is None else why is None})
        rows.append(row)
    notes = [f"[{i}] {src}" for src, i in sources.items()] + unlike
    extra = ref[~ref["method"].isin(methods)] if len(ref) else ref
    for _, r in extra.iterrows():
        notes.append(f"Also published, not a method of this suite: {r['student']} {r['method']} {r['top1']:.1f} "
                     f"({r.get('note', '')}; {r['source']}).")
    used = ref[ref["method"].isin(methods)] if len(ref) else ref
    for _, r in used.iterrows():
        if isinstance(r.get("note"), str) and r["note"]:
            notes.append(f"{r['student']} {r['method']} published: {r['note']}.")
    notes.append("Published cells come only from tables/paper_reference.csv (docs/published.md); unknown ones stay —. "
                 "A difference is shown only against runs of the published architecture and epochs (n/c otherwise).")
    return [Table(f"{suite}_{scale}", f"{suite} ({scale}): reproduced vs published top-1", [h1, h2], rows, notes,
                  pd.DataFrame(vals))]


def generic(df: pd.DataFrame, suite: str, scale: str, axes: list[str]) -> list[Table]:
    """Fallback for user suites: one row per combination of the varying axes."""
    axes = [a for a in axes if a in df and df[a].nunique(dropna=False) > 1 and a != "seed"] or ["method"]
    rows, vals = [], []
    for key, sub in df.groupby(axes, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        c = cell(sub)
        rows.append([str(k) for k in key] + [c.text()])
        vals.append({**dict(zip(axes, key)), "top1_mean": c.mean, "top1_std": c.std, "n": c.n})
    return [Table(f"{suite}_{scale}", f"{suite} ({scale})", [axes + ["top-1"]], rows, [], pd.DataFrame(vals))]


KINDS = ("degradation", "gap_ladder", "data_fraction", "temperature_grid", "imagenet_main", "generic")


SHOWN = {  # the axes each kind of table lays out (seeds are pooled into intervals); any other must not vary in a cell
    "degradation": ("teacher", "augment", "method"), "gap_ladder": ("teacher", "augment", "method"),
    "data_fraction": ("fraction", "augment", "method"), "temperature_grid": ("teacher", "augment", "method",
                                                                           "kd.tau_t", "kd.tau_s"),
    "imagenet_main": ("student", "method")}


def refuse_hidden_axes(df: pd.DataFrame, kind: str, axes: list[str], suite: str, scale: str) -> None:
    """A table that does not show an axis may not average over it: when an axis the kind does not lay out takes
    several values inside one of its cells, say so in one line (the fix: ``--filter AXIS=VALUE``, one table per
    value, or the generic table, which shows every axis), rather than pool, e.g., two students into one mean."""
    shown = [a for a in SHOWN.get(kind, axes) if a in df]
    for a in axes:
        if a in shown or a == "seed":
            continue
        vals = df[[*shown, "seed", a]].dropna(subset=[a]) if "seed" in df else df[[*shown, a]].dropna(subset=[a])
        keys = [*shown, "seed"] if "seed" in df else shown
        spread = vals.groupby(keys, dropna=False)[a].nunique() if keys else pd.Series([vals[a].nunique()])
        if len(spread) and spread.max() > 1:
            values = ", ".join(sorted(map(str, df[a].dropna().unique())))
            raise UserError(f"{suite} ({scale}): the {kind} table does not show the axis '{a}', which varies inside "
                            f"its cells ({values}): pass --filter {a}=VALUE for one table per value, or set "
                            f"'table: generic' in the suite file for a table that shows every axis")


def table_kind(df: pd.DataFrame, suite: str, scale: str) -> str:
    """The table the suite asks for (``table:`` in its YAML), else the one its varying axes call for; a table
    that would average over an axis it does not show is refused (``refuse_hidden_axes``)."""
    axes = table_axes(df)
    asked = next((t for t in df["table"].dropna().unique()), None) if "table" in df else None
    if asked is None:
        if "kd.tau_t" in df and "kd.tau_s" in df and df["kd.tau_t"].nunique() > 1:
            asked = "temperature_grid"
        elif "student" in df and df["student"].nunique() > 1:
            asked = "imagenet_main"
        elif "fraction" in df and df["fraction"].nunique() > 1:
            asked = "data_fraction"
        elif "teacher" in df and df["teacher"].notna().any():
            asked = "degradation"
        else:
            asked = "generic"
    refuse_hidden_axes(df, asked, axes, suite, scale)
    return asked


def table_axes(df: pd.DataFrame) -> list[str]:
    """The axes of a frame: the abstract ones, and any dotted key of a method's option section (kd.tau_t, ...)."""
    return [c for c in df.columns if c in ("teacher", "student", "augment", "method", "fraction", "seed") or "." in c]


def tables_for(df: pd.DataFrame, suite: str, scale: str, reference: pd.DataFrame,
               kind: Optional[str] = None) -> list[Table]:
    """The tables of one suite at one scale, of the kind ``table_kind`` chooses."""
    kind = kind or table_kind(df, suite, scale)
    if kind == "temperature_grid":
        return temperature_grid(df, suite, scale)
    if kind == "imagenet_main":
        return imagenet_main(df, suite, scale, reference)
    if kind == "data_fraction":
        return data_fraction(df, suite, scale)
    if kind == "degradation":
        return degradation(df, suite, scale, reference)
    if kind == "gap_ladder":
        return gap_ladder(df, suite, scale, reference)
    return generic(df, suite, scale, table_axes(df))
