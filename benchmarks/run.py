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
                         "--teacher-checkpoint large=/ckpts/vit_large_patch16_224.augreg_in21k_ft_in1k.pth")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan (one line per run, with its estimated GPU-hours) and exit")
    ap.add_argument("--gpu", default="H100", help="--dry-run: the card the cost is estimated for (default H100)")
    ap.add_argument("--mfu", type=float, help="--dry-run: model FLOP utilisation (default: measured, else 0.40)")
    ap.add_argument("--cores", type=int, default=10,
                    help="--dry-run: CPU cores per GPU feeding it (default 10, or the profile's cpus_per_task)")
    ap.add_argument("--status", action="store_true", help="print every run's state, top-1 and log, then exit")
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


def print_plan(plan, gpu: str, mfu, cores: int) -> int:
    """One line per run with its estimated GPU-hours (mkd/cost.py), then the suite's total."""
    from mkd.cost import run_cost, throughput

    rate, how = throughput(gpu, mfu)
    print(f"suite {plan.suite} ({plan.scale}) from {plan.path}: {len(plan.teachers)} teachers + "
          f"{len(plan.students) + len(plan.waiting)} students"
          + (f" + {len(plan.trials)} tuning trials ({plan.tuning.trials_per_method} per method and setting, "
             f"mkd/tuning.py)" if plan.trials else ""))
    total = evals = 0.0
    units = plan.units()
    cohort_of = {r.run_id: (i, u) for i, u in enumerate(units) if len(u) > 1 for r in u}
    for r in plan.runs + plan.waiting:
        wait = f" after teacher {r.teacher}" if r.teacher else ""
        wait += f" after {r.after} (reads the stream caches it fills)" if r.after else ""
        i, u = cohort_of.get(r.run_id, (None, []))
        shared = bool(u) and u[0] is not r  # a cohort computes the teacher's logits once, for its first member
        wait += f" [cohort {i}: {len(u)} runs, one teacher forward]" if u else ""
        c = run_cost(r.config, teacher_cached=shared or (bool(r.after) and r.config.teacher_stream_key() is not None))
        h, e = c.gpu_hours(rate, cores)
        total, evals = total + h, evals + e
        print(f"{r.kind:<7} {r.run_id}  {r.label}  {h:,.2f} GPU-h  -> {r.out}{wait}")
    n = sum(1 for u in units if len(u) > 1)
    if n:
        print(f"cohorts ({plan.cohorts}): {n} of {sum(len(u) for u in units if len(u) > 1)} runs, each one process "
              f"with one teacher forward per step (--no-cohorts: every run alone)")
    print(f"estimated cost: {total:,.1f} {gpu} GPU-hours ({evals:,.1f} of them evaluation) at {how}, "
          f"{cores} CPU cores per GPU (mkd/cost.py)")
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
    checkpoints = {k: v[0] for k, v in axis_values(args.teacher_checkpoint, "--teacher-checkpoint",
                                                   "large=/ckpts/vit_large.pth").items()}
    def make_plan():
        p = expand(args.suite, args.scale, args.results, axis_values(args.filter, "--filter", "method=mkd"),
                   overrides, data_root, axis_values(args.axis, "--axis", "seed=0,1,2", yaml.safe_load), checkpoints,
                   tune=not args.no_tuning)
        p.cohorts = args.cohorts
        return p

    plan = make_plan()
    if args.dry_run:
        return print_plan(plan, args.gpu, args.mfu, int(profile.get("cpus_per_task") or args.cores))
    if args.status:
        return print_status(plan)

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
