"""Tables of one suite at one scale, from the tidy ``runs`` frame; rendered through jinja2 templates.

A cell is the mean final top-1 over the seeds of its finished runs with its 95% Student-t interval over seeds
when there are two or more (``stats.py``).  Differences between methods are paired by seed (same data stream,
same initialisation) and carry their own 95% paired-t interval; a ``*`` marks one that excludes zero.  A cell
whose runs are not all finished says so: ``running``, ``pending`` or ``failed`` alone when none finished,
appended otherwise (``45.1 (1 failed)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import jinja2
import pandas as pd

from mkd.errors import UserError
from analysis.frame import (label_of, learned, methods_in, role_of, roles_of, sorted_values as _sorted,  # noqa: F401
                            teacherless, teachers_by_size)
from analysis.stats import INTERVAL, PAIRED_INTERVAL, by_seed, difference, paired, t_interval

TEMPLATES = Path(__file__).resolve().parent / "templates"
DASH = "—"


@dataclass
class Table:
    name: str  # file stem
    title: str
    header: list[list[str]]  # one or more header rows (spans expanded: repeated labels merge in html/tex)
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    values: Optional[pd.DataFrame] = None  # numbers behind the cells (csv)
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


def tuning_notes(df: pd.DataFrame) -> list[str]:
    """How each method's setting was chosen where the suite tunes (``mkd/tuning.py``), and what was chosen, per
    method and setting (run.json's ``tuned``)."""
    if "tuned_setting" not in df or df["tuned_setting"].isna().all():
        return []
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


@dataclass
class Cell:
    mean: Optional[float]
    std: Optional[float]
    n: int
    states: dict
    lo: Optional[float] = None  # 95% t interval over seeds (two or more seeds)
    hi: Optional[float] = None

    def text(self, digits: int = 2) -> str:
        pending = {k: v for k, v in self.states.items() if k != "done" and v}
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


def _diff(a: Cell, b: Cell) -> str:
    if a.mean is None or b.mean is None:
        return DASH
    return f"{a.mean - b.mean:+.2f}"


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


def teacher_info(df: pd.DataFrame, label) -> tuple[str, str, str]:
    t = df[(df.get("teacher") == label) & df["teacher_model"].notna()] if "teacher" in df else df.iloc[0:0]
    if not len(t):
        return DASH, DASH, DASH
    r = t.iloc[0]
    tt = t["teacher_top1"].dropna()
    tp = t["teacher_params"].dropna()
    return str(r["teacher_model"]), _params(tp.iloc[0] if len(tp) else None), _pct(tt.iloc[0] if len(tt) else None)


# ---------------------------------------------------------------------------- table kinds
def degradation(df: pd.DataFrame, suite: str, scale: str) -> list[Table]:
    """Rows = teacher (model, size, top-1); columns = methods per augmentation, then each method minus KD."""
    teachers = teachers_by_size(df)
    augs = _sorted(df["augment"], ["none", "weak", "medium", "strong"]) if "augment" in df else [None]
    methods = methods_in(df)
    ref, alone = role_of(df, "reference"), teacherless(df)
    h1 = ["teacher", "model", "params", "teacher top-1"]
    h2 = ["", "", "", ""]
    for a in augs:
        h1 += [f"augment={a}"] * len(methods)
        h2 += [label_of(df, m) for m in methods]
    rows, vals = [], []
    for t in teachers:
        model, size, top1 = teacher_info(df, t)
        row = [str(t), model, size, top1]
        for a in augs:
            sub = _filter(df, augment=a) if a is not None else df
            runs = {m: sub[(sub["method"] == m) & ((sub["teacher"] == t) | (m in alone))] for m in methods}
            for m in methods:
                c = cell(runs[m])
                d = paired(difference(by_seed(runs[m]), by_seed(runs[ref]))) if ref in runs and m != ref else None
                row.append(c.text() + (f" ({d.text(True)})" if d is not None and d.mean is not None else ""))
                vals.append({"teacher": t, "augment": a, "method": m, "top1_mean": c.mean, "top1_lo": c.lo,
                             "top1_hi": c.hi, "top1_std": c.std, "n": c.n,
                             "minus_kd": d.mean if d else None, "minus_kd_lo": d.lo if d else None,
                             "minus_kd_hi": d.hi if d else None, "p_improve_over_kd": d.p_improve if d else None})
        rows.append(row)
    ref_label = label_of(df, ref) if ref else "the reference method"
    notes = [f"Cells: final top-1 (%) on the validation set, mean over seeds [{INTERVAL}; none with one seed]; "
             f"in brackets the paired difference to {ref_label} with the same teacher, augmentation and seed "
             f"[{PAIRED_INTERVAL}], * when it excludes zero."]
    notes += [f"{label_of(df, m)} trains without a teacher: its cell repeats in every teacher row." for m in methods
              if m in alone]
    return [Table(f"{suite}_{scale}", f"{suite} ({scale}): student top-1 by teacher and augmentation", [h1, h2], rows,
                  notes, pd.DataFrame(vals))]


def gap_ladder(df: pd.DataFrame, suite: str, scale: str, reference: pd.DataFrame) -> list[Table]:
    """The degradation table of a teacher ladder, each published number (tables/paper_reference.csv, matched
    by suite, scale, method and the teacher's model) in a column beside its method, with ours minus published
    when the runs are like for like (architecture and epochs; ``n/c`` otherwise, and a note says why)."""
    table = degradation(df, suite, scale)[0]
    ref = reference
    if len(ref):
        ref = ref[(ref["suite"] == suite) & (ref.get("scale", pd.Series(scale, index=ref.index)).fillna(scale) == scale)]
    methods = methods_in(df)
    with_pub = [m for m in methods if len(ref) and (ref["method"] == m).any()]
    if not with_pub:
        return [table]
    teachers = [r[0] for r in table.rows]
    alone = teacherless(df)
    h1, h2 = table.header[0][:4], table.header[1][:4]
    for m in methods:
        h1.append(table.header[0][4 + methods.index(m)])
        h2.append(label_of(df, m))
        if m in with_pub:
            h1.append(table.header[0][4 + methods.index(m)])
            h2.append(f"{label_of(df, m)} published")
    sources: dict = {}
    rows, unlike = [], []
    for t, row in zip(teachers, table.rows):
        out = row[:4]
        t_model = row[1]
        for i, m in enumerate(methods):
            out.append(row[4 + i])
            if m not in with_pub:
                continue
            pub = ref[(ref["method"] == m) & ((ref["teacher"].fillna("") == ("" if m in alone else t_model))
                                             if "teacher" in ref else True)]
            if not len(pub):
                out.append(DASH)
                continue
            p = pub.iloc[0]
            k = sources.setdefault(str(p["source"]), len(sources) + 1)
            runs = df[(df["method"] == m) & ((df["teacher"] == t) | (m in alone))]
            c = cell(runs)
            why = _unlike(runs, p) if c.mean is not None else None
            diff = "" if c.mean is None else (f" ({c.mean - float(p['top1']):+.2f})" if why is None else " (n/c)")
            if why:
                unlike.append(f"{t} {label_of(df, m)}: not compared ({why}).")
            out.append(f"{float(p['top1']):.2f} [{k}]{diff}")
        rows.append(out)
    notes = table.notes + [f"[{i}] {src}" for src, i in sources.items()]
    notes += [f"{label_of(df, r['method'])} published ({r['teacher'] or 'no teacher'}): {r['note']}."
              for _, r in ref[ref["method"].isin(with_pub)].iterrows() if isinstance(r.get("note"), str) and r["note"]]
    notes += sorted(set(unlike)) + ["Published cells come only from tables/paper_reference.csv (docs/published.md); "
                                    "in brackets ours minus published, only against runs of the published "
                                    "architecture and epochs (n/c otherwise)."]
    return [Table(table.name, f"{suite} ({scale}): student top-1 along the teacher ladder", [h1, h2], rows, notes,
                  table.values, table.findings)]


def data_fraction(df: pd.DataFrame, suite: str, scale: str) -> list[Table]:
    fracs = _sorted(df["fraction"])
    methods = methods_in(df)
    augs = _sorted(df["augment"], ["none", "weak", "medium", "strong"]) if "augment" in df else [None]
    h1, h2 = ["fraction"], [""]
    for a in augs:
        h1 += [f"augment={a}"] * len(methods)
        h2 += methods
    rows, vals = [], []
    for f in fracs:
        row = [f"{f:g}"]
        for a in augs:
            for m in methods:
                c = cell(_filter(df, fraction=f, method=m, **({"augment": a} if a is not None else {})))
                row.append(c.text())
                vals.append({"fraction": f, "augment": a, "method": m, "top1_mean": c.mean, "top1_std": c.std, "n": c.n})
        rows.append(row)
    return [Table(f"{suite}_{scale}", f"{suite} ({scale}): student top-1 by training-set fraction", [h1, h2], rows,
                  [f"Cells: final top-1 (%), mean over seeds [{INTERVAL}]. Subsets are class-balanced and nested.",
                   *fraction_notes(df)],
                  pd.DataFrame(vals))]


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
    tables = []
    settings = [c for c in ("teacher", "augment") if c in df and df[c].nunique() > 1] or ["teacher"]
    keys = df[settings].drop_duplicates().to_dict("records")
    for key in keys:
        sub = _filter(df, **key)
        kd = sub[sub["method"] == role_of(sub, "reference")]
        tts, tss = _sorted(kd["kd.tau_t"]), _sorted(kd["kd.tau_s"])
        rows, vals = [], []
        best = None
        for tt in tts:
            row = [f"{tt:g}"]
            for ts in tss:
                c = cell(kd[(kd["kd.tau_t"] == tt) & (kd["kd.tau_s"] == ts)])
                row.append(c.text())
                vals.append({**key, "tau_t": tt, "tau_s": ts, "top1_mean": c.mean, "top1_std": c.std, "n": c.n})
                if c.mean is not None and (best is None or c.mean > best[0]):
                    best = (c.mean, tt, ts)
            rows.append(row)
        label = ", ".join(f"{k}={v}" for k, v in key.items())
        model, size, top1 = teacher_info(df, key.get("teacher")) if "teacher" in key else (DASH, DASH, DASH)
        notes = [f"KD with fixed temperatures; rows tau_t, columns tau_s. Teacher {model} ({size}, top-1 {top1})."]
        if best:
            notes.append(f"Best grid cell: {best[0]:.2f} at tau_t={best[1]:g}, tau_s={best[2]:g}.")
        for m, runs in learned(sub).groupby("method", sort=True):
            done = runs[runs["status"] == "done"]
            temps = (f", learned tau_t={done['tau_t'].astype(float).mean():.2f}, tau_s={done['tau_s'].astype(float).mean():.2f}"
                     if len(done) else "")
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
    ref = reference[(reference["suite"] == suite)] if len(reference) else reference
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
        return degradation(df, suite, scale)
    if kind == "gap_ladder":
        return gap_ladder(df, suite, scale, reference)
    return generic(df, suite, scale, table_axes(df))


# ---------------------------------------------------------------------------- rendering
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=jinja2.select_autoescape(["html"]),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["tex"] = lambda s: (str(s).replace("\\", "\\textbackslash{}").replace("&", "\\&").replace("%", "\\%")
                                    .replace("_", "\\_").replace("#", "\\#").replace("±", "$\\pm$")
                                    .replace("—", "---").replace("−", "$-$"))
    env.globals["spans"] = spans
    env.filters["mdinline"] = _md_inline
    return env


def _md_inline(line: str):
    """A findings line (Markdown: **bold**, leading '- ') as HTML, escaped."""
    import re

    from markupsafe import Markup, escape

    text = str(escape(line.removeprefix("- ")))
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return Markup(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text))


def spans(row: list[str]) -> list[tuple[str, int]]:
    """Merge runs of equal neighbouring labels of a header row: [(label, colspan)]."""
    out: list[list] = []
    for label in row:
        if out and out[-1][0] == label and label:
            out[-1][1] += 1
        else:
            out.append([label, 1])
    return [(a, b) for a, b in out]


def render(table: Table, fmt: str) -> str:
    return _env().get_template(f"table.{fmt}.j2").render(t=table, ncols=len(table.header[-1]))


def render_index(entries: list[dict], figures: list[dict], generated: str, provenance: list[str] = (),
                 board: list = ()) -> str:
    return _env().get_template("index.html.j2").render(entries=entries, figures=figures, generated=generated,
                                                        provenance=list(provenance), board=list(board))


def render_claims(board: list, fmt: str = "md") -> str:
    """The claims scoreboard (``claims.py``) as Markdown."""
    return _env().get_template(f"claims.{fmt}.j2").render(board=board)
