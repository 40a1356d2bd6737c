"""Results folder -> tidy pandas frames.

``runs``: one row per (run, suite row it serves): suite, scale, run_id, kind, status, the row's axis values,
final/best top-1/top-5, final temperatures, teacher size and top-1, wall time.  A run that serves several rows
(CE ignores the teacher axis) appears once per row.  Runs without a result are ``pending`` or ``running``
(their lock is held); runs whose ``result.json`` says so are ``failed``.
``curves``: one row per (run, epoch) from ``metrics.jsonl``; ``steps``: step-level temperature samples.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from mkd.results import MetricsLine, Result  # the results contract; torch-free
from mkd.rundir import RunDir, environment_of  # no torch: the analysis imports no training code

RESULT_FIELDS = ("final_top1", "final_top5", "best_top1", "best_top5", "heldout_top1", "tau_t", "tau_s", "teacher_top1",
                 "teacher_params", "student_params", "wall_time_s", "reason", "finished_at")


def _jsonl(path: Path) -> tuple[list[dict], int]:
    """Every readable line, and how many were not (a line cut short by a copy or a full disk)."""
    rows, bad = [], 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return rows, bad


def collect(results: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    results = Path(results)
    rows, curves, steps = [], [], []
    for info_path in sorted(results.glob("*/*/*/run.json")):
        run = RunDir(info_path.parent)
        run_dir = run.path
        info = run.run_info()
        raw = run.read_result()  # a damaged one reads as failed, with the reason
        res = run.outcome() or Result("pending")
        cfg = yaml.safe_load(run.config.read_text()) if run.config.exists() else {}
        status = run.state()
        base = {"suite": info.suite or run_dir.parent.parent.name, "scale": info.scale or run_dir.parent.name,
                "run_id": run_dir.name, "kind": info.kind, "status": status, "method": cfg.get("method"),
                "student_model": cfg.get("student"), "epochs": cfg.get("epochs"), "teacher_model": cfg.get("teacher"),
                "teacher_run": info.teacher_run, "path": str(run_dir),
                "kd_tau_t": (cfg.get("kd") or {}).get("tau_t"), "kd_tau_s": (cfg.get("kd") or {}).get("tau_s")}
        for k in RESULT_FIELDS:
            base[k] = getattr(res, k)
        records, bad = _jsonl(run.metrics)
        losses = [r.get("train_loss") for r in records if r.get("train_loss") is not None]
        base["loss_fell"] = (losses[-1] < losses[0]) if len(losses) > 1 else None
        decl = info.method  # the method's declarations, written by the launcher (no import here)
        done = status == "done"
        base.update(method_label=decl.get("label", base["method"]), method_order=decl.get("order"),
                    method_role=decl.get("role"), needs_teacher=decl.get("needs_teacher"),
                    learns_temperature=decl.get("learns_temperature", any("temps" in r for r in records)),
                    initial_tau_t=(decl.get("initial_temperatures") or {}).get("tau_t"),
                    initial_tau_s=(decl.get("initial_temperatures") or {}).get("tau_s"),
                    table=info.table, environment=environment_of(raw) if done else None,
                    tuned_setting=_setting_text(info.tuned), tuning=_tuning_text(info.tuned),
                    smallest_effect=(info.smallest_effect or {}).get("points"),
                    smallest_effect_rule=(info.smallest_effect or {}).get("rule"),
                    git_commit=(res.environment or {}).get("git_commit") if done else None, unreadable_lines=bad)
        for r in info.rows or [{}]:
            rows.append({**base, **{f"axis:{k}": v for k, v in r.items()}})
        for line in map(MetricsLine.from_dict, records):
            curves.append({"run_id": run_dir.name, "suite": base["suite"], "scale": base["scale"],
                           **{k: v for k, v in line.to_dict().items() if k != "temps"}})
            for s, tt, ts in line.temps or []:
                steps.append({"run_id": run_dir.name, "suite": base["suite"], "scale": base["scale"],
                              "epoch": line.epoch, "step": s, "tau_t": tt, "tau_s": ts})
    runs = pd.DataFrame(rows)
    if len(runs):
        runs.columns = [c.removeprefix("axis:") if c.startswith("axis:") and c[5:] not in runs.columns else c
                        for c in runs.columns]
        _fill_teacher_info(runs)
    return runs, pd.DataFrame(curves), pd.DataFrame(steps)


def _setting_text(tuned) -> "str | None":
    """The setting a final run's tuning chose ('lr 0.002, kd.tau 4'), None for an untuned run."""
    if not tuned or tuned.get("setting") is None:
        return None
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in tuned["setting"].items()) \
        or "the suite's own"


def _tuning_text(tuned) -> "str | None":
    """How it was chosen: the trials, their held-out scores (or that the suite's tuning was skipped)."""
    if not tuned:
        return None
    if tuned.get("skipped"):
        return str(tuned["skipped"])
    trials = tuned.get("trials") or []
    seeds = ", ".join(map(str, tuned.get("seeds") or []))
    return (f"{len(trials)} trials scored by top-1 on a held-out {tuned.get('holdout', 0):.0%} of the training set "
            f"(seed{'s' if len(tuned.get('seeds') or []) > 1 else ''} {seeds})")


def _fill_teacher_info(runs: pd.DataFrame) -> None:
    """Teacher size and top-1 for rows whose own result lacks them (running / failed students)."""
    for i, r in runs[runs["teacher_run"].notna()].iterrows():
        if pd.isna(r.get("teacher_top1")) or pd.isna(r.get("teacher_params")):
            tres = RunDir(r["teacher_run"]).outcome() or Result("pending")
            if pd.isna(r.get("teacher_top1")):
                runs.at[i, "teacher_top1"] = tres.final_top1
            if pd.isna(r.get("teacher_params")):
                runs.at[i, "teacher_params"] = tres.student_params
