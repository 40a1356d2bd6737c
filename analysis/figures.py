"""Figures (PNG and PDF) from the tidy frames: temperature evolution, degradation curves, data-fraction
curves and the temperature-grid heatmap with MKD's learned temperatures marked."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.frame import learned, methods_in, role_of  # noqa: E402
from analysis.stats import t_interval  # noqa: E402

sns.set_theme(style="whitegrid", context="paper")


def save(fig, out: Path, stem: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ext in ("png", "pdf"):
        p = out / f"{stem}.{ext}"
        tmp = p.with_name(f".{p.name}.tmp")
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=ext)
        tmp.replace(p)
        paths[ext] = p
    plt.close(fig)
    return paths


def temperature_evolution(runs: pd.DataFrame, curves: pd.DataFrame, steps: pd.DataFrame, out: Path, stem: str,
                          title: str):
    """tau_t and tau_s against epoch for MKD and CTKD runs: the mean over seeds with a 95% t band; dotted: KD's
    fixed temperature."""
    learn = learned(runs).drop_duplicates("run_id")
    if not len(learn) or not len(curves):
        return None
    setting_cols = [c for c in ("teacher", "augment", "fraction", "student") if c in learn and learn[c].nunique() > 1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    palette = sns.color_palette("tab10", n_colors=max(1, learn[setting_cols].drop_duplicates().shape[0] if setting_cols else 1))
    settings = learn[setting_cols].drop_duplicates().to_dict("records") if setting_cols else [{}]
    for i, s in enumerate(settings):
        sub = learn
        for k, v in s.items():
            sub = sub[sub[k] == v]
        for m, mr in sub.groupby("method", sort=False):  # one line per method: mean over seeds, 95% band
            c = curves[curves["run_id"].isin(mr["run_id"])]
            if not len(c):
                continue
            ls = ["-", "--", "-.", ":"][methods_in(learn).index(m) % 4]
            n = c["run_id"].nunique()
            label = f"{mr['method_label'].iloc[0] if 'method_label' in mr else m}" \
                + (f" ({', '.join(f'{k}={v}' for k, v in s.items())})" if s else "") + f", {n} seed{'s' * (n > 1)}"
            for ax, key in zip(axes, ("tau_t", "tau_s")):
                g = c.groupby("epoch")[key].apply(lambda v: t_interval(list(v)))
                ep = np.asarray(g.index, float)
                mean = np.array([e.mean for e in g])
                color = palette[i % len(palette)]
                ax.plot(ep, mean, ls, color=color, label=label, lw=1.4)
                if n > 1:
                    ax.fill_between(ep, [e.lo for e in g], [e.hi for e in g], color=color, alpha=0.2, lw=0)
    kd = runs[runs["method"] == role_of(runs, "reference")]
    for ax, key in zip(axes, ("tau_t", "tau_s")):
        fixed = kd[f"kd_{key}"].dropna().unique() if f"kd_{key}" in kd else []
        if len(fixed) == 1:  # the suite's KD runs share one fixed temperature: draw it for reference
            ax.axhline(float(fixed[0]), color="grey", ls=":", lw=1.2, label=f"KD fixed temperature ({float(fixed[0]):g})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title({"tau_t": "teacher temperature", "tau_s": "student temperature"}[key])
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, out, stem)


def _mean_ci(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per value of ``by``: mean final top-1 over seeds and the half-width of its 95% t interval (0 with one seed)."""
    rows = {}
    for v, g in df.drop_duplicates("run_id").groupby(by):
        e = t_interval(list(g["final_top1"].astype(float)))
        rows[v] = {"mean": e.mean, "half": 0.0 if e.lo is None else e.mean - e.lo}
    return pd.DataFrame.from_dict(rows, orient="index")


def degradation_curves(runs: pd.DataFrame, out: Path, stem: str, title: str):
    """Top-1 against teacher size per method (mean over seeds, 95% t error bars), one panel per augmentation
    (CE as a horizontal line)."""
    df = runs[(runs["status"] == "done")].copy()
    if "teacher" not in df or "teacher_params" not in df or df["teacher_params"].isna().all() \
            or df["teacher"].nunique() < 2:  # a curve needs a ladder of teachers
        return None
    augs = [a for a in ["none", "weak", "medium", "strong"] if a in set(df["augment"])]
    fig, axes = plt.subplots(1, len(augs), figsize=(5 * len(augs), 4), sharey=True, squeeze=False)
    sizes = df.dropna(subset=["teacher_params"]).groupby("teacher")["teacher_params"].first()
    for ax, a in zip(axes[0], augs):
        sub = df[df["augment"] == a]
        for m in methods_in(sub):
            ms = sub[sub["method"] == m]
            if "teacher_model" not in ms or ms["teacher_model"].isna().all():  # trained without a teacher: one line across the ladder
                ax.axhline(ms.drop_duplicates("run_id")["final_top1"].mean(), color="k", ls=":", label=f"{m} (no teacher)")
                continue
            g = _mean_ci(ms, "teacher").join(sizes, how="inner").sort_values("teacher_params")
            ax.errorbar(g["teacher_params"], g["mean"], yerr=g["half"], marker="o", capsize=3, label=m)
        tt = (df.dropna(subset=["teacher_top1", "teacher_params"]).groupby("teacher")[["teacher_params", "teacher_top1"]]
              .first().sort_values("teacher_params") if "teacher_top1" in df else pd.DataFrame())
        ax.set_xscale("log")
        if len(tt):  # label each teacher at its size: name, parameters, its own top-1
            ax.set_xticks(tt["teacher_params"], [f"{t}\n{p / 1e3:.0f}k\n({a1:.1f}%)" for t, p, a1 in
                                                 zip(tt.index, tt["teacher_params"], tt["teacher_top1"])])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("teacher (parameters, teacher top-1)")
        ax.set_title(f"augment={a}")
    axes[0][0].set_ylabel("student top-1 (%)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, out, stem)


def fraction_curves(runs: pd.DataFrame, out: Path, stem: str, title: str):
    df = runs[runs["status"] == "done"]
    if "fraction" not in df or df["fraction"].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m in methods_in(df):
        g = _mean_ci(df[df["method"] == m], "fraction")
        ax.errorbar(g.index, g["mean"], yerr=g["half"], marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xticks(sorted(df["fraction"].unique()))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("fraction of the training set")
    ax.set_ylabel("student top-1 (%)")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return save(fig, out, stem)


def grid_heatmap(runs: pd.DataFrame, out: Path, stem: str, title: str):
    """KD top-1 over the (tau_t, tau_s) grid per setting; MKD's final learned temperatures marked."""
    ref = role_of(runs, "reference")
    kd = runs[(runs["method"] == ref) & (runs["status"] == "done")]
    if "kd.tau_t" not in kd or not len(kd):
        return None
    settings = [c for c in ("teacher", "augment") if c in runs and runs[c].nunique() > 1] or ["teacher"]
    keys = kd[settings].drop_duplicates().to_dict("records")
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        sub = kd
        mk = learned(runs)
        mk = mk[(mk["status"] == "done") & (mk["method"] != ref)]
        for k, v in key.items():
            sub, mk = sub[sub[k] == v], mk[mk[k] == v]
        piv = sub.drop_duplicates("run_id").pivot_table(index="kd.tau_t", columns="kd.tau_s", values="final_top1",
                                                        aggfunc="mean")
        sns.heatmap(piv, annot=True, fmt=".1f", cmap="viridis", ax=ax, cbar_kws={"label": "top-1 (%)"})
        ax.invert_yaxis()
        ts_vals, tt_vals = list(piv.columns), list(piv.index)

        def pos(v, vals):  # position of v on a log-spaced categorical axis (cell centres at i + 0.5)
            lv = [math.log(x) for x in vals]
            return float(np.interp(math.log(v), lv, np.arange(len(vals)) + 0.5, left=0.0, right=len(vals)))

        for _, r in mk.drop_duplicates("run_id").iterrows():
            if pd.notna(r["tau_t"]) and pd.notna(r["tau_s"]):
                x, y = pos(float(r["tau_s"]), ts_vals), pos(float(r["tau_t"]), tt_vals)
                ax.plot(x, y, marker="*", ms=16, color="red", mec="white")
                ax.annotate(f"{r.get('method_label', r['method'])} {r['final_top1']:.1f}%\n(τt={r['tau_t']:.2f}, τs={r['tau_s']:.2f})", (x, y),
                            textcoords="offset points", xytext=(-10, 10), ha="right", color="white", fontsize=8,
                            bbox=dict(boxstyle="round", fc="black", alpha=0.6))
        ax.set_xlabel("tau_s")
        ax.set_ylabel("tau_t")
        ax.set_title(", ".join(f"{k}={v}" for k, v in key.items()))
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, out, stem)
