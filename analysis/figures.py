"""Figures (PNG and PDF) from the tidy frames, each sized for its content and shown at that size.

Every figure is drawn at its own width in inches and saved at 200 dpi; the pages show it at 100 px per inch
(``report.PX_PER_INCH``), so its smallest text, 8 pt, is 11 px on screen, never stretched or shrunk to a column.
A method has one colour everywhere (``frame.colour_of``); settings of one method differ by line style and marker.
Every line carries its 95% t band over seeds; axes of top-1 are clipped to [0, 100] and the caption says when a band
was clipped.  Temperature curves start at epoch 0, the method's starting temperatures (run.json).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.frame import (colour_of, label_of, learned, methods_in, role_of, roles_of, teacherless,  # noqa: E402
                            teachers_by_size)
from analysis.stats import by_seed, difference, paired, t_interval  # noqa: E402

DPI = 200
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
                     "ytick.labelsize": 8, "legend.fontsize": 8, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.spines.top": False, "axes.spines.right": False})


def save(fig, out: Path, stem: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ext in ("png", "pdf"):
        p = out / f"{stem}.{ext}"
        tmp = p.with_name(f".{p.name}.tmp")
        fig.savefig(tmp, dpi=DPI, format=ext)
        tmp.replace(p)
        paths[ext] = p
    plt.close(fig)
    return paths


def _figure(title: str, caption: str, fig, out: Path, stem: str) -> dict:
    width = fig.get_size_inches()[0]
    return {"title": title, "caption": caption, "paths": save(fig, out, stem), "width": width}


def _band(ax, x, lo, hi, colour) -> bool:
    """Draw a 95% band, clipped to [0, 100]; True when the clipping cut it."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    ok = ~np.isnan(lo)
    if not ok.any():
        return False
    clipped = bool((lo[ok] < 0).any() or (hi[ok] > 100).any())
    ax.fill_between(np.asarray(x, float)[ok], np.clip(lo[ok], 0, 100), np.clip(hi[ok], 0, 100), color=colour,
                    alpha=0.15, lw=0)
    return clipped


def _clip_note(clipped: bool) -> str:
    return (" The top-1 axis is clipped to [0, 100]; an interval that reaches beyond it (few seeds, a wide spread) "
            "is cut at the edge." if clipped else "")


# ---------------------------------------------------------------------------- per suite
def suite_figures(df: pd.DataFrame, curves: pd.DataFrame, steps: pd.DataFrame, out: Path, stem: str,
                  title: str) -> list[dict]:
    """The figures a suite's runs call for."""
    figs = []
    for make in (lambda: temperature_evolution(df, curves, out, f"{stem}_temperatures", title),
                 lambda: degradation_curves(df, out, f"{stem}_degradation", title),
                 lambda: fraction_curves(df, out, f"{stem}_fraction", title),
                 lambda: grid_heatmap(df, out, f"{stem}_grid", title)):
        f = make()
        if f:
            figs.append(f)
    return figs


def temperature_evolution(runs: pd.DataFrame, curves: pd.DataFrame, out: Path, stem: str, title: str):
    """tau_t and tau_s against the epoch, from epoch 0 (the starting temperatures) for every method that learns
    them: one colour per method, one line style per setting, the mean over seeds with its 95% band."""
    learn = learned(runs).drop_duplicates("run_id")
    if not len(learn) or not len(curves) or not {"tau_t", "tau_s"} <= set(curves.columns):
        return None
    setting_cols = [c for c in ("teacher", "augment", "fraction", "student") if c in learn and learn[c].nunique() > 1]
    settings = learn[setting_cols].drop_duplicates().to_dict("records") if setting_cols else [{}]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), sharex=True)
    for i, s in enumerate(settings):
        sub = learn
        for k, v in s.items():
            sub = sub[sub[k] == v]
        ls, marker = STYLES[i % len(STYLES)]
        for m, mr in sub.groupby("method", sort=False):
            c = curves[curves["run_id"].isin(mr["run_id"])][["run_id", "epoch", "tau_t", "tau_s"]]
            if not len(c):
                continue
            start = mr[["run_id", "initial_tau_t", "initial_tau_s"]].dropna() if "initial_tau_t" in mr else None
            if start is not None and len(start):  # epoch 0: where each run started
                c = pd.concat([c, start.rename(columns={"initial_tau_t": "tau_t", "initial_tau_s": "tau_s"})
                               .assign(epoch=0)], ignore_index=True)
            n = c["run_id"].nunique()
            colour = colour_of(m)
            label = f"{label_of(runs, m)}" + (f" ({', '.join(f'{k}={v}' for k, v in s.items())})" if s else "") \
                + f", {n} seed{'s' * (n > 1)}"
            for ax, key in zip(axes, ("tau_t", "tau_s")):
                g = c.groupby("epoch")[key].apply(lambda v: t_interval(list(v))).sort_index()
                ep = np.asarray(g.index, float)
                ax.plot(ep, [e.mean for e in g], ls=ls, marker=marker, markevery=max(1, len(ep) // 6), ms=4,
                        color=colour, label=label, lw=1.5)
                lo = [e.lo if e.lo is not None else np.nan for e in g]
                hi = [e.hi if e.hi is not None else np.nan for e in g]
                if not np.all(np.isnan(lo)):
                    ax.fill_between(ep, lo, hi, color=colour, alpha=0.15, lw=0)
    kd = runs[runs["method"] == role_of(runs, "reference")]
    for ax, key in zip(axes, ("tau_t", "tau_s")):
        fixed = kd[f"kd_{key}"].dropna().unique() if f"kd_{key}" in kd else []
        if len(fixed) == 1:  # the suite's KD runs share one fixed temperature: draw it for reference
            ax.axhline(float(fixed[0]), color=colour_of("kd"), ls=":", lw=1.2,
                       label=f"{label_of(runs, role_of(runs, 'reference'))} fixed ({float(fixed[0]):g})")
        ax.set_xlabel("epoch (0: the starting temperature)")
        ax.set_ylabel(key)
        ax.set_title({"tau_t": "teacher temperature", "tau_s": "student temperature"}[key])
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=min(3, len(uniq)), frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.08 + 0.045 * ((len(uniq) - 1) // 3), 1, 1))
    return _figure(f"{title}: learned temperatures", "Teacher and student temperatures against the epoch for each "
                   "method that learns them, from epoch 0 (where it starts); a colour per method, a line style per "
                   "setting; the mean over seeds with its 95% t band; dotted: KD's fixed temperature.", fig, out, stem)


def _mean_ci(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per value of ``by``: the mean final top-1 over seeds with its 95% t interval."""
    rows = {}
    for v, g in df.drop_duplicates("run_id").groupby(by):
        e = t_interval(list(g["final_top1"].astype(float)))
        rows[v] = {"mean": e.mean, "lo": e.lo if e.lo is not None else np.nan,
                   "hi": e.hi if e.hi is not None else np.nan}
    return pd.DataFrame.from_dict(rows, orient="index")


def degradation_curves(runs: pd.DataFrame, out: Path, stem: str, title: str):
    """Top-1 against the teacher's size per method, one panel per augmentation: lines with 95% bands; the
    student alone as a horizontal line with its band."""
    df = runs[runs["status"] == "done"].copy()
    if "teacher" not in df or "teacher_params" not in df or df["teacher_params"].isna().all() \
            or df["teacher"].nunique() < 2 or ("kd.tau_t" in df and df["kd.tau_t"].nunique() > 1):
        return None  # a curve needs a ladder of teachers (the grid's teachers are a setting)
    augs = [a for a in ["none", "weak", "medium", "strong"] if a in set(df["augment"])]
    fig, axes = plt.subplots(1, len(augs), figsize=(4.6 * len(augs) + 1.4, 3.9), sharey=True, squeeze=False)
    sizes = df.dropna(subset=["teacher_params"]).groupby("teacher")["teacher_params"].first()
    clipped = False
    alone = teacherless(df)
    for ax, a in zip(axes[0], augs):
        sub = df[df["augment"] == a]
        lo_x, hi_x = sizes.min() / 1.3, sizes.max() * 1.3
        for m in methods_in(sub):
            ms, colour = sub[sub["method"] == m], colour_of(m)
            if m in alone:  # trained without a teacher: one level across the ladder, with its band
                e = t_interval(list(ms.drop_duplicates("run_id")["final_top1"].astype(float)))
                ax.plot([lo_x, hi_x], [e.mean] * 2, color=colour, ls=":", lw=1.5, label=f"{label_of(df, m)} (no teacher)")
                if e.lo is not None:
                    clipped |= _band(ax, [lo_x, hi_x], [e.lo] * 2, [e.hi] * 2, colour)
                continue
            g = _mean_ci(ms, "teacher").join(sizes, how="inner").sort_values("teacher_params")
            ax.plot(g["teacher_params"], g["mean"], marker="o", ms=4, color=colour, lw=1.5, label=label_of(df, m))
            clipped |= _band(ax, g["teacher_params"], g["lo"], g["hi"], colour)
        tt = (df.dropna(subset=["teacher_top1", "teacher_params"]).groupby("teacher")[["teacher_params", "teacher_top1"]]
              .first().sort_values("teacher_params") if "teacher_top1" in df else pd.DataFrame())
        ax.set_xscale("log")
        if len(tt):  # label each teacher at its size: name, parameters, its own top-1
            ax.set_xticks(tt["teacher_params"], [f"{t}\n{_short(p)}\n({a1:.1f}%)" for t, p, a1 in
                                                 zip(tt.index, tt["teacher_params"], tt["teacher_top1"])])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlim(lo_x, hi_x)
        ax.set_xlabel("teacher (parameters, its top-1)")
        ax.set_title(f"augment={a}")
        ax.set_ylim(*_ylim(sub))
    axes[0][0].set_ylabel("student top-1 (%)")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    return _figure(f"{title}: student top-1 against the teacher's size", "Student top-1 against the teacher's size, "
                   "per method and augmentation: the mean over seeds with its 95% t band; the student alone needs "
                   "no teacher (dotted, with its band)." + _clip_note(clipped), fig, out, stem)


def _short(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _ylim(df: pd.DataFrame) -> tuple[float, float]:
    """The top-1 axis: the cells' range with a margin, inside [0, 100]."""
    v = df["final_top1"].astype(float)
    lo, hi = float(v.min()), float(v.max())
    pad = max(2.0, 0.15 * (hi - lo))
    return max(0.0, lo - 2 * pad), min(100.0, hi + pad)


def fraction_curves(runs: pd.DataFrame, out: Path, stem: str, title: str):
    df = runs[runs["status"] == "done"]
    if "fraction" not in df or df["fraction"].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.6, 3.9))
    clipped = False
    for m in methods_in(df):
        g = _mean_ci(df[df["method"] == m], "fraction")
        ax.plot(g.index, g["mean"], marker="o", ms=4, color=colour_of(m), lw=1.5, label=label_of(df, m))
        clipped |= _band(ax, g.index, g["lo"], g["hi"], colour_of(m))
    ax.set_xscale("log")
    ax.set_xticks(sorted(df["fraction"].unique()))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("fraction of the training set")
    ax.set_ylabel("student top-1 (%)")
    ax.set_ylim(*_ylim(df))
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    return _figure(f"{title}: student top-1 against the data fraction", "Student top-1 against the fraction of the "
                   "training set, per method: the mean over seeds with its 95% t band." + _clip_note(clipped),
                   fig, out, stem)


def grid_heatmap(runs: pd.DataFrame, out: Path, stem: str, title: str):
    """KD top-1 over the (tau_t, tau_s) grid per setting: the cell picked on the held-out split framed, KD's
    default circled, MKD's final learned temperatures starred."""
    from analysis.findings import best_cell

    ref = role_of(runs, "reference")
    kd = runs[(runs["method"] == ref) & (runs["status"] == "done")]
    if "kd.tau_t" not in kd or not len(kd) or kd["kd.tau_t"].nunique() < 2:
        return None
    settings = [c for c in ("teacher", "augment") if c in runs and runs[c].nunique() > 1] or ["teacher"]
    keys = kd[settings].drop_duplicates().to_dict("records")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.9 * len(keys), 4.3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        sub = kd
        mk = learned(runs)
        mk = mk[(mk["status"] == "done") & (mk["method"] != ref)]
        for k, v in key.items():
            sub, mk = sub[sub[k] == v], mk[mk[k] == v]
        piv = sub.drop_duplicates("run_id").pivot_table(index="kd.tau_t", columns="kd.tau_s", values="final_top1",
                                                        aggfunc="mean")
        im = ax.imshow(piv.values, origin="lower", cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(piv.values):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if v < np.nanmean(piv.values) else "black")
        ts_vals, tt_vals = list(piv.columns), list(piv.index)
        ax.set_xticks(range(len(ts_vals)), [f"{x:g}" for x in ts_vals])
        ax.set_yticks(range(len(tt_vals)), [f"{x:g}" for x in tt_vals])
        ax.grid(False)
        picked = best_cell(sub)
        if picked and picked[0] in tt_vals and picked[1] in ts_vals:
            ax.add_patch(plt.Rectangle((ts_vals.index(picked[1]) - 0.5, tt_vals.index(picked[0]) - 0.5), 1, 1,
                                       fill=False, ec="#0173B2", lw=2.5))
        if 4.0 in tt_vals and 4.0 in ts_vals:
            ax.plot(ts_vals.index(4.0), tt_vals.index(4.0), "o", mfc="none", mec="white", ms=22, mew=1.5)

        def pos(v, vals):  # position of v on the log-spaced categorical axis
            lv = [math.log(x) for x in vals]
            return float(np.interp(math.log(v), lv, np.arange(len(vals))))

        for _, r in mk.drop_duplicates("run_id").iterrows():
            if pd.notna(r["tau_t"]) and pd.notna(r["tau_s"]):
                ax.plot(pos(float(r["tau_s"]), ts_vals), pos(float(r["tau_t"]), tt_vals), marker="*", ms=11,
                        color=colour_of(r["method"]), mec="white", mew=0.8)
        ax.set_xlabel("tau_s (student)")
        ax.set_ylabel("tau_t (teacher)")
        ax.set_title(", ".join(f"{k}={v}" for k, v in key.items()))
        fig.colorbar(im, ax=ax, label="top-1 (%)", shrink=0.85)
    fig.tight_layout()
    return _figure(f"{title}: KD's temperature grid", "KD's top-1 over fixed (tau_t, tau_s), the mean over seeds; "
                   "framed: the cell with the best held-out top-1 (picked on a split of the training set); circled: "
                   "KD's default (4, 4); stars: MKD's final learned temperatures, one per seed.", fig, out, stem)


# ---------------------------------------------------------------------------- the index's forest plot
def forest_rows(students: pd.DataFrame) -> list[dict]:
    """Per suite and setting, each cure's paired difference to KD (mean over seeds and its 95% interval)."""
    rows = []
    for (suite, scale), df in students.groupby(["suite", "scale"], sort=True):
        kd = role_of(df, "reference")
        if kd is None or "seed" not in df:
            continue
        cures = roles_of(df, "subject") + roles_of(df, "rival")
        if "kd.tau_t" in df and df["kd.tau_t"].nunique() > 1:
            continue  # the grid: KD against itself
        keys = [k for k in ("teacher", "augment", "fraction") if k in df and df[k].nunique() > 0]
        order = teachers_by_size(df)
        settings = df[df["method"] == kd][keys].drop_duplicates().to_dict("records")
        settings.sort(key=lambda s: tuple(order.index(s[k]) if k == "teacher" and s[k] in order else str(s[k])
                                          for k in keys))
        delta = df["smallest_effect"].dropna().astype(float).max() if "smallest_effect" in df else None
        for s in settings:
            base = df[df["method"] == kd]
            for k, v in s.items():
                base = base[base[k] == v]
            for m in cures:
                sub = df[df["method"] == m]
                for k, v in s.items():
                    if not (k == "teacher" and m in teacherless(df)):
                        sub = sub[sub[k] == v]
                e = paired(difference(by_seed(sub), by_seed(base)))
                if e.mean is None:
                    continue
                rows.append({"suite": f"{suite} ({scale})", "setting": ", ".join(str(v) for v in s.values()),
                             "method": m, "label": label_of(df, m), "e": e,
                             "delta": None if delta is None or math.isnan(delta) else float(delta)})
    return rows


def forest(findings, students: pd.DataFrame, out: Path, stem: str) -> Optional[dict]:
    """Every cure's paired difference to KD, per suite and setting: a dot and its 95% interval, filled and in the
    method's colour where the interval excludes zero, hollow and pale where it does not; the ±delta band."""
    rows = forest_rows(students)
    if not rows:
        return None
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    heights = [sum(r["suite"] == s for r in rows) for s in suites]
    fig, axes = plt.subplots(len(suites), 1, figsize=(9.0, 0.9 + 0.24 * sum(heights) + 0.5 * len(suites)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, s in zip(axes[:, 0], suites):
        sub = [r for r in rows if r["suite"] == s]
        y = np.arange(len(sub))[::-1]
        d = next((r["delta"] for r in sub if r["delta"]), None)
        if d:
            ax.axvspan(-d, d, color="#eeeeee", zorder=0, label=f"±{d:g} (smallest effect of interest)")
        ax.axvline(0, color="#555", lw=1)
        for yi, r in zip(y, sub):
            e, colour = r["e"], colour_of(r["method"])
            resolved = e.resolved
            if e.lo is not None:
                ax.plot([e.lo, e.hi], [yi, yi], color=colour, lw=2.2 if resolved else 1.2, alpha=1 if resolved else 0.5)
            ax.plot(e.mean, yi, "o", ms=6, mfc=colour if resolved else "white", mec=colour, mew=1.5)
        ax.set_yticks(y, [f"{r['label']} · {r['setting']}" for r in sub])
        ax.set_title(f"{s}: minus KD, paired by seed (top-1 points)", loc="left")
        ax.grid(axis="y", alpha=0)
    axes[-1, 0].set_xlabel("difference to KD in top-1 points (mean over seeds, 95% paired-t interval)")
    handles = [plt.Line2D([], [], marker="o", ls="", mfc=colour_of(m), mec=colour_of(m), label=lab) for m, lab in
               dict((r["method"], r["label"]) for r in rows).items()]
    handles.append(plt.Line2D([], [], marker="o", ls="", mfc="white", mec="#555", label="interval spans zero"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _figure("Each cure minus KD, per setting", "Per suite and setting (teacher, augmentation, fraction), each "
                   "cure's top-1 minus KD's, paired by seed: the mean with its 95% interval; filled where the interval "
                   "excludes zero (a resolved difference), hollow where it does not; the grey band is ±the suite's "
                   "smallest effect of interest.", fig, out, stem)
