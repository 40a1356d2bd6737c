#!/usr/bin/env python
"""The price book the analysis reads: ``python benchmarks/prices.py`` writes ``benchmarks/prices.json``.

For every suite and scale: what one more seed of each method costs (its final runs over the suite's other axes:
teachers, augmentations, fractions) and the one-off cost of the plan's teachers and tuning trials, each as a range,
from the plan's cost model (``mkd/cost.py``: an H100 at the cifar and imagenet scales, one CPU thread at tiny).
The claims scoreboard (``analysis/claims.py``) turns "about N seeds" into a price with it, without importing any
training code; the README's suites table (each suite's default plan: runs and total price) is written from it.  ``--calibrate-cpu RESULTS`` first measures the tiny models' CPU rates from finished runs (images
trained per second of a plain CE run, one thread) and writes them into ``benchmarks/throughput.csv``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mkd.errors import UserError, cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "prices.json"
METHODS = ("ce", "kd", "dist", "dkd", "ctkd", "mkd")
EXTRA = {"imagenet_main ViT-L 600 epochs": ("imagenet_main", "imagenet", {"student": ["ViT-L"]}, {"epochs": 600})}


def _book(suite: str, scale: str, filters=None, overrides=None, card: str = "H100") -> dict:
    from mkd.cost import in_units, machine_for, per_seed_prices, price_runs, unit_label
    from mkd.suites import expand, load_suite

    _, spec = load_suite(suite)
    axes = {}
    if "method" in spec["axes"]:
        ms = [m for m in METHODS if m in spec["axes"]["method"] or suite in ("degradation", "gap_ladder")]
        axes["method"] = ms
    plan = expand(suite, scale, results="/nonexistent", filters=filters, overrides=overrides, axes=axes,
                  check_data=False)
    machine = machine_for(scale, card)
    seeds = {r.config.seed for r in plan.students + plan.waiting} or {0}
    per = per_seed_prices(plan, machine)
    once = [0.0, 0.0]
    for u in [[t] for t in plan.teachers] + [u for u in plan.units() if u[0].kind == "trial"]:
        p = price_runs(u, machine)
        once = [once[0] + p.low, once[1] + p.high]
    conv = lambda v: [round(in_units(x, machine), 4) for x in v]  # noqa: E731
    return {"unit": unit_label(machine), "per_seed": {m: conv(v) for m, v in per.items()}, "once": conv(once),
            "seeds_in_plan": len(seeds)}


def _plan(suite: str, scale: str, card: str = "H100") -> dict:
    """The suite's default plan (``run.py --suite SUITE --scale SCALE``): its runs and total price."""
    from mkd.cost import in_units, machine_for, price_runs, unit_label
    from mkd.suites import expand

    plan = expand(suite, scale, results="/nonexistent", check_data=False)
    machine = machine_for(scale, card)
    lo = hi = 0.0
    for u in plan.units() + [[r] for r in plan.waiting]:
        p = price_runs(u, machine)
        lo, hi = lo + p.low, hi + p.high
    return {"teachers": len(plan.teachers), "trials": len(plan.trials),
            "students": len(plan.students) + len(plan.waiting), "unit": unit_label(machine),
            "total": [round(in_units(lo, machine), 4), round(in_units(hi, machine), 4)]}


SCALE_HEADS = {"tiny": "tiny (embedded, CPU)", "cifar": "cifar (CIFAR-100, GPUs)", "imagenet": "imagenet (ImageNet-1K, Slurm)"}


def _amount(lo: float, hi: float, unit: str) -> str:
    f = (lambda x: f"{x:,.0f}") if hi >= 10 else (lambda x: f"{x:.1f}")  # noqa: E731
    unit = "CPU-min" if unit == "CPU-min" else "GPU-h"
    return f"{f(lo)}-{f(hi)} {unit}" if f(lo) != f(hi) else f"{f(lo)} {unit}"


def suites_table(book: dict) -> str:
    """The README's suites table: each suite's question and, per scale, its default plan's runs and price."""
    from mkd.suites import known_suites, load_suite

    lines = ["| suite | what it asks | " + " | ".join(SCALE_HEADS.values()) + " |",
             "|---|---|" + "---|" * len(SCALE_HEADS)]
    order = ["degradation", "gap_ladder", "temperature_grid", "data_fraction", "imagenet_main"]
    for suite in sorted(known_suites(), key=lambda s: (order.index(s) if s in order else len(order), s)):
        _, spec = load_suite(suite)
        cells = []
        for scale in SCALE_HEADS:
            p = book["plans"].get(suite, {}).get(scale)
            cells.append(f"{p['teachers'] + p['trials'] + p['students']} runs, "
                         f"{_amount(*p['total'], p['unit'])}" if p else "")
        lines.append(f"| `{suite}` | {spec.get('question', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


README = ROOT / "README.md"
MARKS = ("<!-- suites:begin (python benchmarks/prices.py writes it) -->\n", "<!-- suites:end -->")


def readme_with_table(text: str, book: dict) -> str:
    head, rest = text.split(MARKS[0]) if MARKS[0] in text else (None, None)
    if head is None or MARKS[1] not in rest:
        raise UserError(f"README.md has no suites table markers ({MARKS[0].strip()} ... {MARKS[1]})")
    return head + MARKS[0] + suites_table(book) + MARKS[1] + rest.split(MARKS[1], 1)[1]


def calibrate_cpu(results: Path) -> int:
    """Measured CPU rates of the tiny models: training images per second of finished CE runs (teachers and
    students trained alone), one thread; inference at three times that (a forward is a third of a step)."""
    import csv

    from mkd.cost import THROUGHPUT, arch

    import yaml

    rates: dict[str, list[float]] = {}
    batches: dict[str, list[int]] = {}
    commit = env = None
    for res_path in sorted(results.glob("**/tiny/*/result.json")):
        r = json.loads(res_path.read_text())
        if r.get("status") != "done" or r.get("method") != "ce" or not r.get("epochs"):
            continue
        model = arch(r["student"])
        rates.setdefault(model, []).append(r["epochs"] * r["train_images"] / r["wall_time_s"])
        cfg = res_path.with_name("config.yaml")
        if cfg.exists():
            batches.setdefault(model, []).append(int((yaml.safe_load(cfg.read_text()) or {}).get("batch_size", 0)))
        commit = (r.get("environment") or {}).get("git_commit", commit)
        env = (r.get("environment") or {}).get("cpu_model", env)
    if not rates:
        raise UserError(f"no finished tiny CE runs under {results}: run a tiny suite first")
    lines = THROUGHPUT.read_text().splitlines()
    keep = [l for l in lines if ",cpu," not in l]
    where = results.resolve().relative_to(ROOT).as_posix() if results.resolve().is_relative_to(ROOT) else results.name
    src = f"median of {{n}} tiny CE runs under {where}/ ({env}, one thread, commit {commit})"
    for model, v in sorted(rates.items()):
        v = sorted(v)
        med = v[len(v) // 2]
        b = sorted(batches.get(model) or [64])
        batch = b[len(b) // 2]
        keep.append(f"{model},16,train,cpu,{batch},{med:.1f},measured,{src.format(n=len(v))}")
        keep.append(f"{model},16,infer,cpu,256,{3 * med:.1f},measured,three times the training rate ({src.format(n=len(v))})")
    THROUGHPUT.write_text("\n".join(keep) + "\n")
    print(f"wrote {len(rates)} CPU rates into {THROUGHPUT}")
    return 0


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/prices.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT), help="where to write the price book (default benchmarks/prices.json)")
    ap.add_argument("--gpu", default="H100", help="the card of the cifar and imagenet prices (default H100)")
    ap.add_argument("--calibrate-cpu", metavar="RESULTS", help="first measure the tiny models' CPU rates from the "
                                                                "finished runs under RESULTS")
    args = ap.parse_args(argv)
    if args.calibrate_cpu:
        calibrate_cpu(Path(args.calibrate_cpu))
    from mkd.suites import known_suites, load_suite

    book = {"generated_by": "python benchmarks/prices.py", "card": args.gpu, "date": time.strftime("%Y-%m-%d"),
            "model": "mkd/cost.py with benchmarks/throughput.csv", "suites": {}, "extra": {}, "plans": {}}
    for suite in known_suites():
        _, spec = load_suite(suite)
        for scale in spec["scales"]:
            book["suites"].setdefault(suite, {})[scale] = _book(suite, scale, card=args.gpu)
            book["plans"].setdefault(suite, {})[scale] = _plan(suite, scale, card=args.gpu)
    for name, (suite, scale, filters, overrides) in EXTRA.items():
        book["extra"][name] = _book(suite, scale, filters, overrides, card=args.gpu)
    Path(args.out).write_text(json.dumps(book, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    if args.gpu == "H100" and Path(args.out) == OUT:
        README.write_text(readme_with_table(README.read_text(), book))
        print(f"wrote the suites table into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
