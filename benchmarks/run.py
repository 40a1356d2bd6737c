#!/usr/bin/env python
"""Run a benchmark suite: ``python benchmarks/run.py --suite degradation``.

Expands ``benchmarks/suites/NAME.yaml`` at one scale into runs (teachers first), skips finished runs,
resumes unfinished ones, retries failed ones, and executes the rest locally or as Slurm job arrays.
Results land in ``RESULTS/<suite>/<scale>/<run_id>/`` (teachers in ``RESULTS/teachers/<scale>/``).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mkd.config import parse_overrides  # noqa: E402
from mkd.errors import UserError, cli  # noqa: E402
from mkd.results import Result  # noqa: E402
from mkd.launch import load_profile, print_status, run_local, slurm_reachable, submit_slurm, wait_slurm  # noqa: E402
from mkd.suites import SCALES, expand, known_suites  # noqa: E402


def axis_values(items: list[str], flag: str, example: str, parse=str) -> dict[str, list]:
    """['seed=0,1,2'] -> {'seed': [0, 1, 2]} (values parsed by ``parse``); one clear error for a malformed item."""
    out: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"{flag} {item!r} is not axis=value[,value] (e.g. {flag} {example})")
        k, v = item.split("=", 1)
        m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", v.strip())
        out[k] = list(range(int(m[1]), int(m[2]) + 1)) if m else [parse(x) for x in v.split(",")]
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"known suites: {', '.join(known_suites())}")
    ap.add_argument("--suite", required=True, help="suite name or path to a suite YAML file")
    ap.add_argument("--scale", default="tiny", help=f"one of {', '.join(SCALES)} (default tiny: the embedded data, CPU)")
    ap.add_argument("--executor", choices=["local", "slurm"], help="default: slurm when --profile is given, else local")
    ap.add_argument("--profile", help="Slurm profile YAML (slurm/NAME.yaml)")
    ap.add_argument("--results", default="results", help="results root (default results/)")
    ap.add_argument("--filter", action="append", default=[], metavar="AXIS=VALUE[,VALUE]",
                    help="keep only rows with these axis values (repeatable)")
    ap.add_argument("--axis", action="append", default=[], metavar="AXIS=V1,V2",
                    help="replace an axis's values, e.g. --axis seed=0,1,2 or seed=0..9 (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, e.g. --set epochs=1 (changes run ids)")
    ap.add_argument("--data-root", help="dataset root for the cifar / imagenet scales")
    ap.add_argument("--teacher-checkpoint", action="append", default=[], metavar="LABEL=PATH",
                    help="local weights for a pretrained teacher of the scale (offline clusters), e.g. "
                         "--teacher-checkpoint large=/ckpts/deit3_large_patch16_224.fb_in1k.pth")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan and exit: one line per run with its price as a range (GPU-hours; CPU-minutes "
                         "at the tiny scale) and what binds it (GPU, decode, I/O), then the suite's total")
    ap.add_argument("--gpu", default="H100", help="--dry-run: the card the cost is estimated for (default H100)")
    ap.add_argument("--cores", type=int,
                    help="--dry-run: CPU cores per GPU feeding it (default: the profile's cpus_per_task, else 10)")
    ap.add_argument("--storage", choices=["shared", "staged"],
                    help="--dry-run: where ImageNet is read from: a shared filesystem, or staged once per job to "
                         "node-local disk (default: the profile's stage_input, else shared)")
    ap.add_argument("--rates", action="store_true", help="--dry-run: also print each model's rate and its source")
    ap.add_argument("--status", action="store_true", help="print every run's state, top-1 and log, then exit")
    ap.add_argument("--seeds-for", metavar="CLAIM",
                    help="print how many seeds the plan needs to resolve a claim (analysis/claims.py: gap, "
                         "augmentation, cure, rivals, ...; or a finding such as Q3) at the suite's smallest effect of "
                         "interest, from the paired SD of the runs finished so far, and what they cost; then exit")
    ap.add_argument("--max-parallel", type=int, help="local: concurrent runs (default: GPUs, else CPU cores); "
                                                      "slurm: array parallelism")
    ap.add_argument("--wait", action="store_true", help="slurm: block until the submitted jobs end")
    ap.add_argument("--no-teacher-cache", action="store_true",
                    help="run the teacher at every step instead of reusing its logits on the stream "
                         "(same as --set teacher_cache=off; the results are the same, only slower)")
    ap.add_argument("--cohorts", choices=["auto", "on", "off"], default="auto",
                    help="train the runs of one teacher stream together, one teacher forward per step for all "
                         "(mkd/cohort.py): auto = where the teacher's logits are not cached (the imagenet scale), "
                         "on = wherever runs share a teacher stream, off = every run alone (default auto)")
    ap.add_argument("--no-cohorts", dest="cohorts", action="store_const", const="off", help="same as --cohorts off")
    ap.add_argument("--no-tuning", action="store_true",
                    help="skip the suite's tuning (its tuning: section, mkd/tuning.py): every method at the suite's own "
                         "setting, as a smoke test or a fixed recipe; the tables then say so")
    ap.add_argument("--no-input-cache", action="store_true",
                    help="augment every run's batches itself instead of reading the stream's stored batches")
    return ap.parse_args(argv)


def print_plan(plan, machine, rates: bool = False) -> int:
    """One line per run with its price as a range and what binds it (``mkd/cost.py``): a cohort is priced as one
    process, on its first member's line; then the suite's total, split into teachers, tuning trials and students."""
    from mkd.cost import in_units, price_runs, rate, unit_label

    unit = unit_label(machine)
    head = (f"suite {plan.suite} ({plan.scale}) from {plan.path}: {len(plan.teachers)} teachers + "
            f"{len(plan.students) + len(plan.waiting)} students"
            + (f" + {len(plan.trials)} tuning trials ({plan.tuning.trials_per_method} per method and setting, "
               f"mkd/tuning.py)" if plan.trials else ""))
    where = "one CPU thread per run" if machine.cpu else \
        f"{machine.card}, {machine.cores} CPU cores per GPU, {machine.storage} storage"
    print(f"{head}; priced on {where}")
    units = plan.units() + [[r] for r in plan.waiting]
    totals = {"teacher": [0.0, 0.0], "trial": [0.0, 0.0], "student": [0.0, 0.0]}
    binds: dict[str, int] = {}
    for i, u in enumerate(units):
        p = price_runs(u, machine)
        totals[u[0].kind][0] += p.low
        totals[u[0].kind][1] += p.high
        binds[p.binds] = binds.get(p.binds, 0) + 1
        for j, r in enumerate(u):
            wait = f" after teacher {r.teacher}" if r.teacher else ""
            wait += f" after {r.after} (reads the stream caches it fills)" if r.after else ""
            if len(u) > 1:
                wait += f" [cohort {i}: {len(u)} runs, one teacher forward per step]"
            cost = (f"{in_units(p.low, machine):,.2f}-{in_units(p.high, machine):,.2f} {unit}, binds {p.binds}"
                    if j == 0 else f"in cohort {i}")
            print(f"{r.kind:<7} {r.run_id}  {r.label}  {cost}  -> {r.out}{wait}")
    n = sum(1 for u in units if len(u) > 1)
    if n:
        print(f"cohorts ({plan.cohorts}): {n}, of {sum(len(u) for u in units if len(u) > 1)} runs in all, each one "
              f"process with one teacher forward per step (--no-cohorts: every run alone)")
    if rates:
        seen = set()
        for r in plan.runs:
            for model, mode in ((r.config.student, "train"), (r.config.teacher, "infer")):
                if model and (model, mode) not in seen:
                    seen.add((model, mode))
                    from mkd.cost import img_size_of

                    x = rate(model, mode, machine.card, img_size_of(r.config))
                    print(f"rate {model} {mode}: {x.low:,.0f}-{x.high:,.0f} img/s ({x.source})")
    lo, hi = sum(v[0] for v in totals.values()), sum(v[1] for v in totals.values())
    split = ", ".join(f"{k}s {in_units(v[0], machine):,.1f}-{in_units(v[1], machine):,.1f}"
                      for k, v in totals.items() if v[1])
    print(f"estimated cost: {in_units(lo, machine):,.1f}-{in_units(hi, machine):,.1f} {unit} ({split}); binds: "
          + ", ".join(f"{k} {v} units" for k, v in sorted(binds.items())) + " (mkd/cost.py)")
    return 0


def loader_workers(profile: dict) -> int:
    """Loader worker processes per GPU process: the Slurm profile's cpus_per_task, or on the local machine its cores
    per GPU, minus one for the training process itself (an unhashed key: the run ids do not change)."""
    if profile.get("cpus_per_task"):
        return max(0, int(profile["cpus_per_task"]) - 1)
    import os

    from mkd.launch import _default_parallel

    gpus = _default_parallel()[0] if _default_parallel()[1][0] is not None else 1
    return max(0, (os.cpu_count() or 1) // gpus - 1)


def print_seeds_for(plan, claim: str, machine, filters: tuple = (), results: str = "results") -> int:
    """Seeds a claim needs on this plan (prospective: the suite's smallest effect of interest at the paired SD of
    the finished runs) and their price (``mkd/cost.py``): the analysis's findings on the plan's own runs."""
    from analysis.claims import CLAIMS
    from analysis.collect import collect
    from analysis.findings import findings_for, plan_text, verdict_text
    from analysis.stats import EFFECT, EQUIVALENT
    from analysis.tables import table_kind

    from mkd.cost import in_units, per_seed_prices, unit_label

    keys = {c.key: [k for s, k in c.tested if s == plan.suite] for c in CLAIMS}
    wanted = keys.get(claim) or [k for k in {k for ks in keys.values() for k in ks} if k.split()[0] == claim
                                 or k == claim]
    if claim not in keys and not wanted:
        from mkd.errors import suggest

        raise UserError(f"--seeds-for {claim}: not a claim or finding{suggest(claim, list(keys))}; claims: "
                        f"{', '.join(keys)} (or a finding: Q1 ... Q8)")
    if not wanted:
        raise UserError(f"--seeds-for {claim}: suite {plan.suite} does not test it; the suites that do: "
                        + ", ".join(s for c in CLAIMS if c.key == claim for s, _ in c.tested))
    runs, _, _ = collect(plan.root) if plan.root.is_dir() else (None, None, None)
    ids = {r.run_id for r in plan.students}
    df = runs[runs["run_id"].isin(ids) & (runs["suite"] == plan.suite) & (runs["scale"] == plan.scale)] \
        .dropna(axis=1, how="all") if runs is not None and len(runs) else None  # another suite's dirs may share an id
    if df is None or not len(df) or not (df["status"] == "done").any():
        raise UserError(f"--seeds-for {claim}: no finished runs of this plan under {plan.root}: run a pilot first "
                        f"(python benchmarks/run.py --suite {plan.suite} --axis seed=0,1,2)")
    found = [f for f in findings_for(df, table_kind(df, plan.suite, plan.scale), plan.suite, plan.scale)
             if f.key in wanted]
    per_seed = per_seed_prices(plan, machine)
    unit = unit_label(machine)
    for f in found:
        e = f.headline
        if f.delta is None and plan.smallest_effect:  # runs planned before suites recorded it: the suite's own
            f.delta = plan.smallest_effect["points"]
        print(f"{f.key} on {plan.suite} ({plan.scale}): {f.question}")
        print(f"  now: {verdict_text(e, f.delta, 'an effect', 'an effect')[1] if e is not None else f.answer}")
        print(f"  smallest effect of interest: {f.delta:g} points ({' '.join(plan.smallest_effect['rule'].split())})"
              if f.delta is not None and plan.smallest_effect else "  smallest effect of interest: none recorded")
        n = f.seeds_needed
        if f.verdict in (EFFECT, EQUIVALENT) and e is not None:  # what a replication powered at delta needs
            print(f"  already resolved at the {e.n} finished seeds; to replicate it with 80% power at the smallest "
                  f"effect of interest:")
        if n is None or e is None:
            print(f"  seeds needed: {plan_text(e, f.delta) if e is not None else 'no estimate yet'}")
            continue
        extra = max(0, n - e.n)
        cost = [extra * sum(per_seed.get(m, [0, 0])[i] for m in f.methods) for i in (0, 1)]
        print(f"  seeds needed: {n} ({plan_text(e, f.delta)}); {extra} more than the {e.n} finished: "
              f"{in_units(cost[0], machine):,.1f}-{in_units(cost[1], machine):,.1f} {unit}")
        if extra:
            where = (f" --results {results}" if results != "results" else "") + "".join(f" --filter {x}" for x in filters)
            print(f"  run them: python benchmarks/run.py --suite {plan.suite} --scale {plan.scale}{where} "
                  f"--axis seed=0..{n - 1} (finished seeds are reused)")
    return 0


@cli
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scale not in SCALES:
        raise UserError(f"--scale {args.scale} is unknown; allowed: {', '.join(SCALES)}")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise UserError(f"--max-parallel {args.max_parallel} must be >= 1")
    executor = args.executor or ("slurm" if args.profile else "local")
    profile = load_profile(args.profile, args.scale) if executor == "slurm" else {}
    data_root = args.data_root or profile.get("data_root")
    overrides = parse_overrides(args.set)
    if args.no_teacher_cache:
        overrides["teacher_cache"] = False
    if args.no_input_cache:
        overrides["input_cache"] = "off"
    if profile.get("stage_input"):  # the training set copied to node-local disk once per job (unhashed: same runs)
        overrides.setdefault("stage_dir", str(profile["stage_input"]))
    if "num_workers" not in overrides and args.scale != "tiny" and not args.dry_run:
        overrides["num_workers"] = loader_workers(profile)
    checkpoints = {k: v[0] for k, v in axis_values(args.teacher_checkpoint, "--teacher-checkpoint",
                                                   "large=/ckpts/vit_large.pth").items()}
    def make_plan():
        p = expand(args.suite, args.scale, args.results, axis_values(args.filter, "--filter", "method=mkd"),
                   overrides, data_root, axis_values(args.axis, "--axis", "seed=0,1,2", yaml.safe_load), checkpoints,
                   tune=not args.no_tuning, check_data=not args.dry_run)
        p.cohorts = args.cohorts
        p.cohort_max = int(profile.get("cohort_max") or p.cohort_max)
        return p

    if args.dry_run:
        from mkd.cost import check_card, machine_for

        check_card(args.gpu)
        storage = args.storage or ("staged" if profile.get("stage_input") else "shared")
        plan = make_plan()
        return print_plan(plan, machine_for(plan.scale, args.gpu, args.cores or profile.get("cpus_per_task"), storage),
                          args.rates)
    plan = make_plan()
    if args.status:
        return print_status(plan)
    if args.seeds_for:
        from mkd.cost import machine_for

        return print_seeds_for(plan, args.seeds_for, machine_for(plan.scale, args.gpu, args.cores), args.filter or (),
                               args.results)

    failed = []
    while True:  # a tuned suite runs in two stages: the trials, then the finals with the settings they chose
        if executor == "slurm":
            slurm_reachable()
            jobs = submit_slurm(plan, profile, args.max_parallel)
            if plan.waiting and not args.wait:
                print(f"{len(plan.waiting)} final runs wait for their tuning trials: rerun this command once the "
                      "trials have finished (--status shows them), or pass --wait")
            if not args.wait:
                return 0
            failed = wait_slurm(plan, jobs)
        else:
            failed = run_local(plan, args.max_parallel)
        if failed or not plan.waiting:
            break
        before, plan = len(plan.waiting), make_plan()
        if len(plan.waiting) >= before:  # the trials ended without choosing (all failed): say so below
            break
    for r in plan.waiting:
        print(f"waiting {r.name} {r.label}", file=sys.stderr)
    if plan.waiting and not failed:
        return 1
    if failed:
        print(f"{len(failed)} run(s) failed:", file=sys.stderr)
        for r in failed:
            why = (r.dir.outcome() or Result("pending")).reason or ""
            print(f"  {r.name} {r.label}: {why}  log: {r.dir.log_path()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
