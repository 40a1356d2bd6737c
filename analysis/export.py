"""Results files with a schema (docs/results.md): one row per run, one row per table cell, and optionally the
per-epoch records as TensorBoard event files.

- ``<suite>_<scale>_runs.csv``: one row per run, whatever the number of suite rows it serves (the student trained
  alone serves every teacher of its augmentation and seed: its ``teacher`` is empty and ``rows`` lists them);
  ``RUN_COLUMNS`` first, in that order, then the suite's dotted axes (``kd.tau_t`` ...); seeds are integers.
- ``<suite>_<scale>_cells.csv``: one row per table cell: the table, the cell's setting, the method, the number of
  finished seeds, the mean with its 95% interval, the paired difference to KD with its interval, and whether
  the cell is a failed run of the protocol.
- ``--tensorboard DIR``: ``DIR/<suite>/<scale>/<run_id>/events.out.tfevents.*`` with each epoch's loss, top-1 and
  temperatures (tensorboardX writes them; no torch is imported).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

RUN_COLUMNS = ("run_id", "suite", "scale", "status", "method", "method_label", "student_model", "teacher",
               "teacher_model", "augment", "fraction", "seed", "epochs", "final_top1", "final_top5", "best_top1",
               "heldout_top1", "tau_t", "tau_s", "teacher_top1", "teacher_params", "student_params", "tuned_setting",
               "loss_fell", "wall_time_s", "finished_at", "git_commit", "environment", "reason", "rows")
CELL_COLUMNS = ("table", "teacher", "student", "augment", "fraction", "tau_t", "tau_s", "method", "n", "top1_mean",
                "top1_lo", "top1_hi", "top1_std", "minus_kd", "minus_kd_lo", "minus_kd_hi", "p_improve_over_kd",
                "heldout_mean", "picked", "published", "comparable", "failed")


def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (``RUN_COLUMNS``, then the dotted axes): the rows a run serves joined in ``rows``."""
    axes = [c for c in ("teacher", "student", "augment", "fraction", "seed", "method") if c in df] + \
        sorted(c for c in df.columns if "." in c)
    out = []
    for run_id, g in df.groupby("run_id", sort=False):
        first = g.iloc[0]
        rec = {c: first[c] if c in g else None for c in RUN_COLUMNS}
        rows = [" ".join(f"{a}={r[a]}" for a in axes if a in r and pd.notna(r[a])) for _, r in g.iterrows()]
        rec["rows"] = "; ".join(rows)
        if "teacher" in g and g["teacher"].nunique(dropna=True) > 1:
            rec["teacher"] = None  # trains without a teacher: it serves every teacher row (see rows)
        for c in sorted(c for c in df.columns if "." in c):
            rec[c] = first[c]
        out.append(rec)
    t = pd.DataFrame(out, columns=list(RUN_COLUMNS) + sorted(c for c in df.columns if "." in c))
    if "seed" in t:
        t["seed"] = t["seed"].astype("Int64")
    return t


def cells_table(tables: list) -> pd.DataFrame:
    """One row per cell of every table of a suite (``CELL_COLUMNS``)."""
    frames = []
    for t in tables:
        if t.values is None or not len(t.values):
            continue
        v = t.values.copy()
        v.insert(0, "table", t.name)
        frames.append(v)
    cells = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return cells.reindex(columns=list(CELL_COLUMNS)).astype({"n": "Int64"}) if len(cells) else \
        pd.DataFrame(columns=list(CELL_COLUMNS))


def tensorboard(curves: pd.DataFrame, runs: pd.DataFrame, out: Path) -> int:
    """Each run's per-epoch records as TensorBoard scalars under ``out/<suite>/<scale>/<run_id>``; returns the
    number of runs written."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        from mkd.errors import UserError

        raise UserError("--tensorboard needs the tensorboardX package: pip install tensorboardX") from None
    n = 0
    info = runs.drop_duplicates("run_id").set_index("run_id")
    for run_id, c in curves.groupby("run_id"):
        if run_id not in info.index:
            continue
        r = info.loc[run_id]
        w = SummaryWriter(str(out / str(r["suite"]) / str(r["scale"]) / run_id))
        for _, rec in c.sort_values("epoch").iterrows():
            for k in ("train_loss", "top1", "top5", "tau_t", "tau_s", "lr"):
                if k in rec and pd.notna(rec[k]):
                    w.add_scalar(k, float(rec[k]), int(rec["epoch"]))
        w.close()
        n += 1
    return n
