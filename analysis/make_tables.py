#!/usr/bin/env python
"""Rebuild the paper's tables and figures from a results folder: ``python analysis/make_tables.py``.

Reads every run's ``run.json``, ``config.yaml``, ``result.json`` and ``metrics.jsonl`` under ``--results``
(layout: mkd/rundir.py) and writes, per suite and scale, a page (HTML, and Markdown with the full numbers), each
table in LaTeX (booktabs), the results files (one row per run, one per cell: docs/results.md) and the figures (PNG
+ PDF); then the claims scoreboard (claims.md) and ``index.html``, which opens with it.
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
    """Write every suite's page, tables, results files and figures, the claims scoreboard and the index; returns
    {'tables': [...], 'figures': [...], 'findings': [...], 'scoreboard': [...], 'index': path}."""
    from analysis import export as E
    from analysis import figures as F
    from analysis import findings as Q
    from analysis import report as R
    from analysis import tables as T
    from analysis.claims import scoreboard
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
    written = {"tables": [], "figures": [], "findings": [], "pages": []}
    pages, ladders = [], {}
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
        if kind in ("degradation", "gap_ladder"):
            ladders.setdefault(scale, {})[suite] = df
        tables = T.tables_for(df, suite, scale, ref, kind)
        notes = T.tuning_notes(df) + ([f"Warning: {mixed}."] if mixed else [])
        if tables:
            tables[-1].notes += notes
        stem = f"{suite}_{scale}"
        page = {"title": f"{suite} ({scale})", "suite": suite, "scale": scale, "tables": tables,
                "findings": Q.findings_lines(found + Q.failed_findings(tables, suite, scale)),
                "provenance": T.provenance(df, suite, scale), "figures": [], "files": [], "href": f"{stem}.html",
                "description": _description(df)}
        page["finding_groups"] = T.Table("", "", [], [], findings=page["findings"]).finding_groups
        page["headlines"] = [g["head"] for g in page["finding_groups"] if g["items"]] or \
            [f"{len(df.drop_duplicates('run_id'))} runs; no finding for this kind of table"]
        page["runs"] = page["provenance"][0] if page["provenance"] else ""
        for fig in (F.suite_figures(df, c, st, out, stem, page["title"]) if figures else []):
            written["figures"] += [fig["paths"]["png"], fig["paths"]["pdf"]]
            page["figures"].append(R.figure_entry(fig["title"], fig["caption"], fig["paths"], fig["width"]))
        if "csv" in formats:
            for name, frame in ((f"{stem}_runs.csv", E.runs_table(df)), (f"{stem}_cells.csv", E.cells_table(tables))):
                atomic.write_text(out / name, frame.to_csv(index=False))
                page["files"].append(("csv", name))
                written["tables"].append(out / name)
        if "tex" in formats:
            for t in tables:
                atomic.write_text(out / f"{t.name}.tex", R.render_table(t, "tex"))
                page["files"].append(("tex", f"{t.name}.tex"))
                written["tables"].append(out / f"{t.name}.tex")
        for fmt in ("md", "html"):
            if fmt in formats:
                atomic.write_text(out / f"{stem}.{fmt}", R.render_suite(page, fmt))
                page["files"].insert(0, (fmt, f"{stem}.{fmt}"))
                written["tables"].append(out / f"{stem}.{fmt}")
        pages.append(page)
        written["pages"].append(page)
    if not pages:
        raise UserError(f"no results for suites {', '.join(suites)} under {results}")
    for scale, by_suite in ladders.items():  # across suites: the same cure on other architectures
        deltas = [Q.smallest_effect(d)[0] for d in by_suite.values()]
        written["findings"] += Q.architecture_findings(by_suite, max((x for x in deltas if x), default=None), scale)
    board = scoreboard(written["findings"])
    written["scoreboard"] = board
    across = Q.findings_lines([f for f in written["findings"] if "+" in f.suite])  # no suite page holds these
    if "md" in formats:
        atomic.write_text(out / "claims.md", R.render_claims(board, "md", across))
        written["tables"].append(out / "claims.md")
    forest = None
    if figures:
        fp = F.forest(written["findings"], students, out, "forest")
        if fp:
            written["figures"] += [fp["paths"]["png"], fp["paths"]["pdf"]]
            forest = R.figure_entry(fp["title"], fp["caption"], fp["paths"], fp["width"])
    index = out / "index.html"
    if "html" in formats:
        atomic.write_text(index, R.render_index(pages, board, forest, time.strftime("%Y-%m-%d %H:%M"), across))
    written["index"] = index
    return written


def _description(df: pd.DataFrame) -> str:
    """What the suite asks: its file's description (read as data; a suite of the results may have no file here)."""
    import yaml

    path = HERE.parent / "benchmarks" / "suites" / f"{df['suite'].iloc[0]}.yaml" if len(df) else None
    try:
        return " ".join(str((yaml.safe_load(path.read_text()) or {}).get("description", "")).split())
    except (OSError, AttributeError, yaml.YAMLError):
        return ""


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
    ap.add_argument("--tensorboard", metavar="DIR", help="also write every run's per-epoch records as TensorBoard "
                                                         "event files under DIR/<suite>/<scale>/<run_id>")
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
    if args.tensorboard:
        from analysis.collect import collect
        from analysis.export import tensorboard

        runs, curves, _ = collect(Path(args.results))
        n = tensorboard(curves, runs[runs["kind"] == "student"], Path(args.tensorboard))
        print(f"wrote the per-epoch records of {n} runs for TensorBoard: tensorboard --logdir {args.tensorboard}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
