#!/usr/bin/env python
"""Rebuild the paper's tables and figures from a results folder: ``python analysis/make_tables.py``.

Reads every run's ``run.json``, ``config.yaml``, ``result.json`` and ``metrics.jsonl`` under ``--results``
(layout: mkd/rundir.py), writes per suite and scale a table in Markdown, LaTeX (booktabs) and HTML,
the tidy CSV behind it, the figures (PNG + PDF) and ``index.html`` linking everything.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import pandas as pd  # noqa: E402
from typing import Optional  # noqa: E402

from mkd import atomic  # noqa: E402
from mkd.errors import UserError, cli  # noqa: E402
from mkd.rundir import mixed_environments  # noqa: E402

FORMATS = ("md", "tex", "html", "csv")
CAPTIONS = {  # what a reader sees in each figure
    "temperatures": "Learned temperatures (tau_t, tau_s) against the epoch, per method that learns them: the mean "
                    "over seeds with its 95% t band; dotted lines: KD's fixed temperatures.",
    "degradation": "Student top-1 against the teacher's size, per method and augmentation: the mean over seeds "
                   "with its 95% t interval; the student alone (ce) needs no teacher and repeats at every size.",
    "fraction": "Student top-1 against the fraction of the training set, per method: the mean over seeds with its "
                "95% t interval.",
    "grid": "KD's top-1 over fixed (tau_t, tau_s), mean over seeds; the marker: MKD's final learned temperatures.",
}
REFERENCE = HERE.parent / "tables" / "paper_reference.csv"


def load_reference(path: Path = REFERENCE) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=["suite", "scale", "student", "method", "epochs", "top1", "source", "note"])
    ref = pd.read_csv(path)
    missing = {"suite", "student", "method", "top1", "source"} - set(ref.columns)
    if missing:
        raise UserError(f"{path}: missing columns {sorted(missing)}; see tables/README.md")
    if ref["source"].isna().any():
        raise UserError(f"{path}: every published number needs a source (row {int(ref['source'].isna().idxmax()) + 2})")
    return ref


def build(results: Path, out: Path, suites: list[str] | None = None, formats: tuple[str, ...] = FORMATS,
          reference: Path = REFERENCE, filters: Optional[list[str]] = None, figures: bool = True) -> dict:
    """Write tables, figures and index; returns {'tables': [...], 'figures': [...]} of written paths."""
    from analysis import figures as F
    from analysis import findings as Q
    from analysis import tables as T
    from analysis.collect import collect

    if not results.is_dir():
        raise UserError(f"results folder {results} not found: run python benchmarks/run.py --suite NAME first "
                        "or pass --results DIR")
    runs, curves, steps = collect(results)
    if not len(runs) or not len(runs[runs["kind"] == "student"]):
        raise UserError(f"no runs under {results}: run python benchmarks/run.py --suite NAME first or pass --results DIR")
    ref = load_reference(reference)
    cut = runs.drop_duplicates("run_id")
    cut = cut[cut["unreadable_lines"] > 0] if "unreadable_lines" in cut else cut.iloc[0:0]
    for _, r in cut.iterrows():
        print(f"warning: skipped {int(r['unreadable_lines'])} unreadable line(s) of {r['path']}/metrics.jsonl "
              "(cut short by a copy?); its other lines are used", file=sys.stderr)
    students = _filtered(runs[runs["kind"] == "student"], filters or [])
    known = sorted(students["suite"].unique())
    for s in suites or []:
        if s not in known:
            from mkd.errors import suggest

            raise UserError(f"--suite {s}: no results for it{suggest(s, known)}; suites with results: {', '.join(known)}")
    out.mkdir(parents=True, exist_ok=True)
    written = {"tables": [], "figures": [], "findings": []}
    entries, figs, frames = [], [], {}
    for (suite, scale), df in students.groupby(["suite", "scale"], sort=True):
        if suites and suite not in suites:
            continue
        df = df.dropna(axis=1, how="all")
        run_ids = set(df["run_id"])
        c = curves[curves["run_id"].isin(run_ids)] if len(curves) else curves
        st = steps[steps["run_id"].isin(run_ids)] if len(steps) else steps
        mixed = mixed_environments(list(df.drop_duplicates("run_id")["environment"])) if "environment" in df else None
        if mixed:
            print(f"warning: {suite} ({scale}): {mixed}", file=sys.stderr)
        kind = T.table_kind(df, suite, scale)
        found = Q.findings_for(df, kind, suite, scale)
        written["findings"] += found
        frames.setdefault(scale, {})[suite] = df if kind in ("degradation", "gap_ladder") else None
        for i, table in enumerate(T.tables_for(df, suite, scale, ref, kind)):
            table.provenance = T.provenance(df, suite, scale)
            table.notes += T.tuning_notes(df)
            if i == 0:
                table.findings = Q.findings_lines(found)
            if mixed:
                table.notes.append(f"Warning: {mixed}.")
            files = []
            for fmt in formats:
                p = out / f"{table.name}.{fmt}"
                if fmt == "csv":
                    tidy = df.drop(columns=["path"], errors="ignore")
                    atomic.write_text(p, tidy.to_csv(index=False))
                else:
                    atomic.write_text(p, T.render(table, fmt))
                files.append((fmt, p.name))
                written["tables"].append(p)
            entries.append({"title": table.title, "files": files, "html": T.render(table, "html"),
                            "provenance": table.provenance})
        title = f"{suite} ({scale})"
        for fn, stem in ((lambda: F.temperature_evolution(df, c, st, out, f"{suite}_{scale}_temperatures",
                                                          f"{title}: learned temperatures"), "temperatures"),
                         (lambda: F.degradation_curves(df, out, f"{suite}_{scale}_degradation",
                                                       f"{title}: student top-1 vs teacher size"), "degradation"),
                         (lambda: F.fraction_curves(df, out, f"{suite}_{scale}_fraction",
                                                    f"{title}: top-1 vs data fraction"), "fraction"),
                         (lambda: F.grid_heatmap(df, out, f"{suite}_{scale}_grid",
                                                 f"{title}: KD temperature grid, MKD marked"), "grid")):
            if not figures or (stem == "degradation" and "kd.tau_t" in df and df["kd.tau_t"].nunique() > 1):
                continue  # the grid suite's teachers are a setting, not a ladder
            paths = fn()
            if paths:
                written["figures"] += [paths["png"], paths["pdf"]]
                figs.append({"title": f"{title}: {stem}", "caption": CAPTIONS[stem], "png": paths["png"].name,
                             "pdf": paths["pdf"].name})
    if not entries:
        raise UserError(f"no results for suites {', '.join(suites)} under {results}")
    for scale, by_suite in frames.items():  # across suites: the same cure on other architectures
        ladders = {s: d for s, d in by_suite.items() if d is not None}
        deltas = [Q.smallest_effect(d)[0] for d in ladders.values()]
        written["findings"] += Q.architecture_findings(ladders, max((x for x in deltas if x), default=None), scale)
    from analysis.claims import scoreboard

    board = scoreboard(written["findings"])
    written["scoreboard"] = board
    if "md" in formats:
        p = out / "claims.md"
        atomic.write_text(p, T.render_claims(board, "md"))
        written["tables"].append(p)
    index = out / "index.html"
    atomic.write_text(index, T.render_index(entries, figs, time.strftime("%Y-%m-%d %H:%M"),
                                            [p for e in entries for p in e["provenance"]], board))
    written["index"] = index
    return written


def _filtered(students: pd.DataFrame, filters: list[str]) -> pd.DataFrame:
    """Only the runs whose axis ``AXIS`` has one of the values of ``--filter AXIS=V1,V2``."""
    for f in filters:
        key, sep, values = f.partition("=")
        if not sep or not values:
            raise UserError(f"--filter {f}: expected AXIS=VALUE[,VALUE...] (e.g. --filter student=resnet18)")
        if key not in students:
            axes = [c for c in students.columns if c in ("teacher", "student", "augment", "method", "fraction", "seed")
                    or "." in c]
            raise UserError(f"--filter {f}: no axis '{key}' in these results; axes: {', '.join(axes)}")
        kept = students[students[key].astype(str).isin(values.split(","))]
        if not len(kept):
            raise UserError(f"--filter {f}: no run has that value; values: "
                            f"{', '.join(sorted(map(str, students[key].dropna().unique())))}")
        students = kept
    return students


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python analysis/make_tables.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="results root (default results/)")
    ap.add_argument("--out", default=str(HERE.parent / "tables"), help="output folder (default tables/)")
    ap.add_argument("--suite", nargs="+", help="only these suites")
    ap.add_argument("--format", default=",".join(FORMATS), help=f"comma list of {','.join(FORMATS)}")
    ap.add_argument("--claims", action="store_true",
                    help="print the claims scoreboard (one row per claim of the paper: its number, this study's "
                         "estimate and interval, the verdict, what resolving it costs) as text, and write nothing")
    ap.add_argument("--filter", action="append", default=[], metavar="AXIS=V[,V]",
                    help="only runs with these axis values (repeatable); a table refuses to average over an axis "
                         "it does not show, so e.g. a suite with a student axis needs --filter student=NAME")
    args = ap.parse_args(argv)
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    for f in formats:
        if f not in FORMATS:
            raise UserError(f"--format {f} is unknown; allowed: {', '.join(FORMATS)}")
    if args.claims:
        import tempfile

        from analysis.claims import scoreboard_text

        with tempfile.TemporaryDirectory() as tmp:
            written = build(Path(args.results), Path(tmp), args.suite, ("md",), filters=args.filter, figures=False)
        print(scoreboard_text(written["scoreboard"]))
        return 0
    written = build(Path(args.results), Path(args.out), args.suite, formats, filters=args.filter)
    print(f"wrote {len(written['tables'])} table files and {len(written['figures'])} figure files; "
          f"open {written['index']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
