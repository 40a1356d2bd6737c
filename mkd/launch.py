"""Executing a suite plan: locally (subprocesses, one per core or GPU) or on Slurm (submitit job arrays).

Both paths end in ``mkd.train.train`` on a run directory holding ``config.yaml``.  Run state lives in the
directories themselves, so any invocation can tell what is done (``result.json``), failed, running (the
run's lock is held, or its Slurm job is pending/running: ``job.json``) or still pending.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import submitit
import yaml

from . import atomic
from .errors import UserError
from .results import Result, RunInfo
from .rundir import ACTIVE_SLURM, RunDir, environment_of, mixed_environments
from .suites import Plan, Run

PROJECT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- run directories
def prepare(plan: Plan) -> None:
    """Write config.yaml and run.json of every planned run (pending runs show up in status and tables)."""
    from . import methods

    for run in plan.runs:
        d = run.dir
        d.path.mkdir(parents=True, exist_ok=True)
        if not d.config.exists():
            atomic.write_text(d.config, run.config.to_yaml())
        info = d.read_info()
        rows = info.get("rows", [])
        for r in run.rows:
            if r not in rows:
                rows.append(r)
        suites = sorted(set(info.get("suites", [])) | {plan.suite})
        new = RunInfo(run.run_id, kind=run.kind, scale=plan.scale, suites=suites,
                      suite=plan.suite if run.kind != "teacher" else None, rows=rows, label=run.label,
                      teacher_run=str(plan_teacher(plan, run).out) if run.teacher else None,
                      method={"name": run.config.method, **methods.get(run.config.method).declarations(),
                              "initial_temperatures": methods.get(run.config.method).initial_temperatures(run.config)},
                      table=plan.table, tuned=run.tuned or info.get("tuned"),
                      smallest_effect=info.get("smallest_effect") or (plan.smallest_effect if run.kind == "student"
                                                                      else None)).to_dict()
        if new != info:
            atomic.write_json(d.info, new)


def plan_teacher(plan: Plan, run: Run) -> Optional[Run]:
    return next((t for t in plan.teachers if t.run_id == run.teacher), None)


def slurm_states(runs: list[Run]) -> dict[str, str]:
    """Slurm state of each run that has a job.json, through submitit's sacct watcher."""
    jobs = {}
    for run in runs:
        info = run.dir.read_job()
        if info and info.get("executor") == "slurm" and shutil.which("sacct"):
            jobs[run.run_id] = submitit.SlurmJob(folder=info["folder"], job_id=info["job_id"])
    states = {}
    for rid, job in jobs.items():
        try:
            states[rid] = job.watcher.get_state(job.job_id, mode="force" if not states else "standard")
        except Exception:  # sacct unreachable: unknown
            states[rid] = "UNKNOWN"
    return states


def state_of(run: Run, slurm: dict[str, str]) -> str:
    return run.dir.state(slurm.get(run.run_id, ""))


def status_rows(plan: Plan) -> list[dict]:
    """One row per run; a student whose teacher failed is ``blocked`` and says why."""
    slurm = slurm_states(plan.runs)
    rows = []
    for run in plan.runs:
        res = run.dir.outcome() or Result("pending")
        state, reason = state_of(run, slurm), res.reason
        teacher = plan_teacher(plan, run) if run.teacher else None
        if teacher is not None and state in ("pending", "failed") and state_of(teacher, slurm) == "failed":
            why = (teacher.dir.outcome() or Result("pending")).reason or slurm.get(teacher.run_id) or "see its log"
            state, reason = "blocked", f"teacher {teacher.run_id} failed ({why})"
        rows.append({"state": state, "run": run.run_id, "kind": run.kind, "label": run.label,
                     "top1": res.final_top1, "log": run.dir.log_path(), "reason": reason,
                     "slurm": slurm.get(run.run_id)})
    for run in plan.waiting:  # finals whose setting their tuning trials have not chosen yet
        rows.append({"state": "waiting", "run": run.run_id, "kind": run.kind, "label": run.label, "top1": None,
                     "log": "-", "reason": "its tuning trials have not all ended", "slurm": None})
    return rows


def print_status(plan: Plan) -> int:
    rows = status_rows(plan)
    counts = defaultdict(int)
    for r in rows:
        counts[r["state"]] += 1
    summary = ", ".join(f"{counts[s]} {s}" for s in ("done", "running", "pending", "waiting", "failed", "blocked")
                        if counts[s])
    print(f"suite {plan.suite} ({plan.scale}): {len(rows)} runs: {summary}")
    w = max(len(r["label"]) for r in rows)
    print(f"{'STATE':<8} {'RUN':<12} {'KIND':<7} {'WHAT':<{w}} {'TOP1':>6}  LOG")
    for r in rows:
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
        extra = f"  ({r['reason']})" if r["state"] == "failed" and r["reason"] else ""
        if r["state"] == "blocked":
            extra = f"  (blocked: {r['reason']}; fix the teacher and rerun: they are submitted again)"
        print(f"{r['state']:<8} {r['run']:<12} {r['kind']:<7} {r['label']:<{w}} {top1:>6}  {r['log']}{extra}")
    mixed = mixed_environments([environment_of(r.dir.read_result()) for r in plan.students])
    if mixed:
        print(f"warning: {mixed}")
    return 1 if counts["failed"] or counts["blocked"] else 0


# ---------------------------------------------------------------------------- local execution
def _default_parallel() -> tuple[int, list[Optional[str]]]:
    try:
        import torch

        n_gpu = torch.cuda.device_count()
    except Exception:
        n_gpu = 0
    if n_gpu:
        return n_gpu, [str(i) for i in range(n_gpu)]
    n = max(1, min(os.cpu_count() or 1, 8))
    return n, [None] * n


def threads_per_run(parallel: int, slots: list[Optional[str]]) -> int:
    """Intra-op threads of each pool worker.  On a CPU a fixed count (``MKD_CPU_THREADS``, default 1) whatever the
    parallelism: a run's float results depend on how many threads split its reductions, so ``--max-parallel 1``
    and ``2`` must give the same digits.  With GPUs, the cores shared out (they only feed the device)."""
    if slots and slots[0] is not None:
        return max(1, (os.cpu_count() or 1) // parallel)
    return max(1, int(os.environ.get("MKD_CPU_THREADS", "1")))


def die_with_parent(grace_s: float = 20.0) -> None:
    """Linux: when the launcher dies, even by ``kill -9``, the kernel sends this process SIGTERM (a training run
    checkpoints the step it is at and stops; its loader workers see their parent gone and exit); a watchdog ends it
    for good if it is still alive ``grace_s`` seconds after.  No process outlives its launcher."""
    import signal
    import threading

    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _worker_init(threads: int, gpu_slots) -> None:
    """Pool worker set-up: it dies with the launcher; its GPU (one per worker) and thread count, before torch is
    imported."""
    die_with_parent()
    if gpu_slots is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_slots.get()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _teacher_dir(run_dir: str) -> Optional[str]:
    """The teacher's run directory the plan recorded (``run.json``): where the teacher's stream cache lives."""
    return RunDir(run_dir).run_info().teacher_run


def local_job(run_dir: str) -> tuple[bool, str]:
    """Train one run inside a pool worker, its output (Python and C level) appended to the run's train.log.

    The worker imports torch/timm once and trains run after run, as a Slurm job trains its one run.
    """
    def one() -> tuple[bool, str]:
        from .config import load_config
        from .train import train

        train(load_config(RunDir(run_dir).config), run_dir, teacher_dir=_teacher_dir(run_dir))
        return True, ""
    return _logged(RunDir(run_dir).log, one)


def local_cohort_job(run_dirs: list[str]) -> tuple[bool, str]:
    """Train one cohort inside a pool worker (``mkd/cohort.py``): each member's lines go to its own train.log,
    the cohort's output (and any traceback) to ``cohort.log`` beside its first member."""
    def cohort() -> tuple[bool, str]:
        from .cohort import train_cohort

        out = train_cohort(run_dirs, [_teacher_dir(d) for d in run_dirs])
        bad = [f"{Path(d).name}: {why}" for d, (ok, why) in out.items() if not ok]
        return not bad, "; ".join(bad)
    return _logged(RunDir(run_dirs[0]).path / "cohort.log", cohort)


def _logged(path: Path, job) -> tuple[bool, str]:
    """``job()`` with this process's output (Python and C level) appended to ``path``; (finished, why not): a user
    error is its one line, a bug its traceback in the log."""
    from .errors import UserError

    log = open(path, "ab", buffering=0)
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        return job()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return False, str(e)
    except Exception as e:  # a bug: keep the traceback in the log, tell the runner
        import traceback

        traceback.print_exc()
        return False, f"{type(e).__name__}: {e}"
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        log.close()


class _Pool:
    """A spawn-context process pool of persistent workers (one GPU each, or a share of the CPU threads) that is
    rebuilt when a worker dies (killed, out of memory)."""

    def __init__(self, n: int, threads: int, slots: list[Optional[str]]):
        import multiprocessing as mp

        self.n, self.threads, self.ctx = n, threads, mp.get_context("spawn")
        self.gpu_q = None
        if slots[0] is not None:
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=self.ctx)
            manager.start(die_with_parent)  # the manager's server process dies with the launcher too
            self.gpu_q = manager.Queue()
            for i in range(n):
                self.gpu_q.put(slots[i % len(slots)])
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))
        self.pool = self._new()

    def _new(self):
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(self.n, mp_context=self.ctx, initializer=_worker_init,
                                   initargs=(self.threads, self.gpu_q))

    def submit(self, unit: list[Run]):
        if len(unit) == 1:
            return self.pool.submit(local_job, str(unit[0].out))
        return self.pool.submit(local_cohort_job, [str(r.out) for r in unit])

    def restart(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new()

    def kill(self) -> None:
        for proc in list(getattr(self.pool, "_processes", {}).values()):
            proc.terminate()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.pool.shutdown()


class LocalRunner:
    """Runs a plan's unfinished runs on the local machine: teachers before their students, a student whose teacher
    failed is reported failed, a dead worker's run is retried after the pool is rebuilt."""

    def __init__(self, plan: Plan, max_parallel: Optional[int] = None, quiet: bool = False):
        from tqdm import tqdm

        n_default, self.slots = _default_parallel()
        self.plan, self.n = plan, max_parallel or n_default
        self.by_id = {r.run_id: r for r in plan.runs}
        self.failed: list[Run] = []
        self.running: dict = {}  # future -> (unit, start): a unit is a run or a cohort (Plan.units)
        self.queue: list[list[Run]] = []
        self.count, self.total = 0, 0
        self.tty = sys.stderr.isatty() and not quiet
        self.bar = tqdm(total=0, desc=f"{plan.suite}/{plan.scale}", unit="run", disable=not self.tty, dynamic_ncols=True)

    def report(self, run: Run, ok: bool, secs: float, why: str = "") -> None:
        self.count += 1
        self.bar.update(1)
        top1 = (run.dir.outcome() or Result("pending")).final_top1
        msg = (f"[{self.count}/{self.total}] {'done' if ok else 'FAILED'} {run.name} {run.label}"
               + (f" top1 {top1:.2f}" if ok and top1 is not None else "")
               + f" ({secs:.0f}s){' ' + why if why else ''}")
        self.bar.write(msg) if self.tty else print(msg, flush=True)

    def schedule(self, pool: _Pool) -> None:
        """Start every queued unit (a run, or a cohort) whose teachers are done and whose cache producers outside
        it have ended (a failed producer only means the run computes the stream itself); fail the runs whose
        teacher failed."""
        def busy(run_id: Optional[str]) -> bool:
            return run_id is not None and (any(r.run_id == run_id for u in self.queue for r in u) or
                                           any(r.run_id == run_id for u, _ in self.running.values() for r in u))

        for unit in list(self.queue):
            if len(self.running) >= self.n:
                break
            ids = {r.run_id for r in unit}
            waits = [self.by_id[r.after] for r in unit if r.after and r.after not in ids and r.after in self.by_id]
            if any(busy(w.run_id) or w.dir.state() == "running" for w in waits):
                continue
            state = {r.run_id: "done" if r.teacher is None else self.by_id[r.teacher].dir.state() for r in unit}
            dead = [r for r in unit if state[r.run_id] not in ("done", "running") and not busy(r.teacher)]
            for r in dead:  # its teacher failed: it can never start
                self.failed.append(r)
                self.report(r, False, 0, f"(teacher {r.teacher} failed: see {self.by_id[r.teacher].dir.log_path()})")
            left = [r for r in unit if r not in dead]
            i = self.queue.index(unit)
            self.queue.remove(unit)
            if left and all(state[r.run_id] == "done" for r in left):
                self.running[pool.submit(left)] = (left, time.time())
            elif left:
                self.queue.insert(i, left)

    def collect(self, pool: _Pool, finished) -> None:
        """Record finished units; a dead worker breaks the pool: requeue the others and rebuild it."""
        from concurrent.futures.process import BrokenProcessPool

        for fut in finished:
            unit, start = self.running.pop(fut)
            try:
                _, why = fut.result()
            except BrokenProcessPool:
                why = ("the worker process died (killed, or out of memory): rerun the suite to resume "
                                  "this run from its last checkpoint")
                for f2, (u2, _) in list(self.running.items()):
                    self.queue.insert(0, u2)
                    self.running.pop(f2)
                pool.restart()
            for run in unit:
                done = run.dir.done
                if not done:
                    self.failed.append(run)
                    if run.dir.outcome() is None:
                        atomic.write_json(run.dir.result, Result.failed(run.run_id, why or "unfinished").to_dict())
                log = run.dir.log if len(unit) == 1 else f"{run.dir.log} and {unit[0].dir.path / 'cohort.log'}"
                self.report(run, done, time.time() - start, "" if done else f"see {log}")

    def run(self) -> list[Run]:
        from concurrent.futures import FIRST_COMPLETED, wait

        todo = [r for r in self.plan.runs if r.dir.state() != "done"]
        busy = [r for r in todo if r.dir.state() == "running"]
        for r in busy:
            print(f"skip {r.name} ({r.label}): running in another process", file=sys.stderr)
        todo = [r for r in todo if r not in busy]
        prepare(self.plan)  # finished runs too: a run a new suite or row reuses records them in its run.json
        if not todo:
            if not busy:
                print(f"suite {self.plan.suite} ({self.plan.scale}): all {len(self.plan.runs)} runs finished; nothing to do")
            return []
        pending = {r.run_id for r in todo}
        self.queue = [u for u in ([[r for r in unit if r.run_id in pending] for unit in self.plan.units()]) if u]
        self.total = len(todo)
        self.bar.total = len(todo)
        t0 = last = time.time()
        pool = _Pool(self.n, threads_per_run(self.n, self.slots), self.slots)
        try:
            while self.queue or self.running:
                if not self.tty and time.time() - last >= PROGRESS_SECONDS:  # a log: a summary line now and then
                    last = time.time()
                    print(progress_line(f"{self.plan.suite}/{self.plan.scale}", self.count, self.total,
                                        sum(len(u) for u, _ in self.running.values()), len(self.failed), t0), flush=True)
                self.schedule(pool)
                if not self.running:
                    if self.queue:  # waiting for a teacher another process trains
                        time.sleep(1.0)
                    continue
                finished, _ = wait(list(self.running), timeout=1.0, return_when=FIRST_COMPLETED)
                self.collect(pool, finished)
        except KeyboardInterrupt:
            self.bar.close()
            pool.kill()
            raise
        pool.close()
        self.bar.close()
        if not self.failed:
            drop_input_caches(self.plan)
        print(f"suite {self.plan.suite} ({self.plan.scale}): {len(todo) - len(self.failed)}/{len(todo)} runs finished in "
              f"{time.time() - t0:.0f}s with {self.n} parallel")
        return self.failed


PROGRESS_SECONDS = float(os.environ.get("MKD_PROGRESS_SECONDS", "120"))  # without a terminal: a summary this often


def progress_line(what: str, done: int, total: int, running: int, failed: int, t0: float) -> str:
    """'12:03:10 degradation/tiny: 40/110 ended (2 failed), 2 running, 8m elapsed, about 14m left at this pace'."""
    from .messages import _duration

    elapsed = time.time() - t0
    left = f", about {_duration(elapsed / done * (total - done))} left at this pace" if done and total > done else ""
    return (f"{time.strftime('%H:%M:%S')} {what}: {done}/{total} ended" + (f" ({failed} failed)" if failed else "")
            + f", {running} running, {_duration(elapsed)} elapsed{left}")


def drop_input_caches(plan: Plan) -> None:
    """Remove the suite's stored input batches once every run of the plan is done: they only speed up the runs of
    a stream, and a stream's runs are all finished (teacher logits stay: small, and reused by new methods)."""
    if all(r.dir.state() == "done" for r in plan.runs):
        shutil.rmtree(plan.root / plan.suite / plan.scale / ".streams", ignore_errors=True)


def run_local(plan: Plan, max_parallel: Optional[int] = None, quiet: bool = False) -> list[Run]:
    """Run every unfinished run of the plan on the local machine; returns the runs that failed."""
    return LocalRunner(plan, max_parallel, quiet).run()


# ---------------------------------------------------------------------------- Slurm execution
class TrainJob(submitit.helpers.Checkpointable):
    """A submitit job training one run directory, or a cohort's (a list: ``mkd/cohort.py``); requeued on
    timeout/preemption, it resumes from the last checkpoints (Checkpointable resubmits the same call)."""

    def __call__(self, run_dir: str | list[str]) -> Optional[dict]:
        from .cohort import train_cohort
        from .config import load_config
        from .preempt import Preempted
        from .train import train

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # overwrite: a MASTER_PORT the cluster or user set is kept (submitit reads it)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        try:
            if isinstance(run_dir, list):  # a cohort: its members' results are in their run directories
                out = train_cohort(run_dir, [_teacher_dir(d) for d in run_dir])
                return {Path(d).name: {"finished": ok, "reason": why} for d, (ok, why) in out.items()}
            return train(load_config(RunDir(run_dir).config), run_dir, teacher_dir=_teacher_dir(run_dir))
        except Preempted:
            if env.global_rank == 0:
                raise
            # rank 0 wrote the checkpoint and requeues the job; this task ends cleanly (a non-zero exit would
            # end the job FAILED under KillOnBadExit instead of requeued)
            return None


PROFILE_KEYS = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos", "nodes": "nodes",
                "gpus_per_node": "gpus_per_node", "tasks_per_node": "tasks_per_node", "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb",
                "timeout_min": "timeout_min", "constraint": "slurm_constraint", "setup": "slurm_setup",
                "array_parallelism": "slurm_array_parallelism", "signal_delay_s": "slurm_signal_delay_s",
                "additional": "slurm_additional_parameters", "exclude": "slurm_exclude"}
PROFILE_OTHER = ("data_root", "scales", "description", "max_num_timeout", "stage_input", "cohort_max")


def load_profile(path: Optional[str], scale: str) -> dict:
    if not path:
        raise UserError("--executor slurm needs --profile slurm/NAME.yaml (see slurm/example_gpu_cluster.yaml)")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"Slurm profile {p} not found: pass an existing file (see slurm/example_gpu_cluster.yaml)")
    prof = yaml.safe_load(p.read_text()) or {}
    allowed = list(PROFILE_KEYS) + list(PROFILE_OTHER)
    from .errors import suggest

    for where, d in [("", prof)] + [(f"scales.{k}.", v) for k, v in (prof.get("scales") or {}).items()]:
        for k in d:
            if k not in allowed or (where and k in PROFILE_OTHER):
                raise UserError(f"{p.name}: {where}{k}: unknown key{suggest(k, allowed)}; allowed: {', '.join(allowed)}")
    merged = {k: v for k, v in prof.items() if k != "scales"}
    merged.update((prof.get("scales") or {}).get(scale) or {})
    return merged


def slurm_reachable() -> None:
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise UserError(f"--executor slurm: SLURM_CONF={conf} does not exist: point it at slurm.conf or unset it")
    if not shutil.which("sbatch"):
        raise UserError("--executor slurm: no Slurm here (sbatch not on PATH): run on a login node or use --executor local")
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"--executor slurm: Slurm is not reachable ({e}): check SLURM_CONF / the controller") from None
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["sinfo failed"])[-1]
        raise UserError(f"--executor slurm: Slurm is not reachable (sinfo: {msg}): start it or use --executor local")


def make_executor(profile: dict, folder: Path, max_parallel: Optional[int]) -> submitit.AutoExecutor:
    """submitit's executor from the profile: its sbatch options, and how many times a job that reaches its time
    limit is requeued (``max_num_timeout``, submitit's default 3: a 300-epoch run in 48 h jobs needs more)."""
    extra = {"slurm_max_num_timeout": int(profile["max_num_timeout"])} if profile.get("max_num_timeout") else {}
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm", **extra)
    params = {PROFILE_KEYS[k]: v for k, v in profile.items() if k in PROFILE_KEYS and v is not None}
    gpus = int(profile.get("gpus_per_node") or 0)
    params.setdefault("tasks_per_node", max(1, gpus))  # one task (process) per GPU, DDP from the submitit environment
    if not gpus:
        params.pop("gpus_per_node", None)
    if max_parallel:
        params["slurm_array_parallelism"] = max_parallel
    params.setdefault("timeout_min", 60)
    params.setdefault("slurm_job_name", "mkd")
    # a student whose teacher failed can never start (afterok): let Slurm cancel it instead of leaving it pending
    params["slurm_additional_parameters"] = {"kill-on-invalid-dep": "yes", **(params.get("slurm_additional_parameters") or {})}
    ex.update_parameters(**params)
    return ex


def _active_job(run: Run, states: dict[str, str]) -> Optional[str]:
    st = states.get(run.run_id, "")
    if st.split(" ")[0] in ACTIVE_SLURM:
        return run.dir.read_job()["job_id"]
    return None


def submit_slurm(plan: Plan, profile: dict, max_parallel: Optional[int] = None) -> list[submitit.Job]:
    """Submit every unfinished run: teachers as one array, students (runs, or cohorts: ``Plan.units``) as arrays
    with ``afterok`` dependencies on their teacher's job.  Returns the jobs submitted now."""
    states = slurm_states(plan.runs)
    folder = plan.root / plan.suite / plan.scale / ".submitit"
    todo = [r for r in plan.runs if state_of(r, states) in ("pending", "failed") and not _active_job(r, states)]
    skipped = [r for r in plan.runs if _active_job(r, states)]
    prepare(plan)  # finished runs too: a run a new suite or row reuses records them in its run.json
    if not todo:
        if skipped:
            print(f"suite {plan.suite} ({plan.scale}): {len(skipped)} runs already queued or running; nothing to submit")
        else:
            print(f"suite {plan.suite} ({plan.scale}): all {len(plan.runs)} runs finished; nothing to do")
        return []
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))
    sub = _Submitter(make_executor(profile, folder, max_parallel), folder, plan,
                     {r.run_id: _active_job(r, states) for r in skipped})
    teachers = [r for r in todo if r.kind == "teacher"]
    if teachers:
        sub.submit([[r] for r in teachers], None)
    pending = {r.run_id for r in todo}
    units = [u for u in ([r for r in unit if r.run_id in pending] for unit in plan.units()) if u and u[0].kind != "teacher"]
    while units:  # waves: a unit is submitted once the runs it waits for have job ids
        waiting = {r.run_id for u in units for r in u}
        wave = [u for u in units if not any(r.after and r.after in waiting and r.after not in {x.run_id for x in u}
                                            for r in u)] or units
        groups: dict[Optional[str], list[list[Run]]] = defaultdict(list)
        for u in wave:
            groups[sub.dependency(u)].append(u)
        for dep, us in groups.items():
            sub.submit(us, dep)
        units = [u for u in units if u not in wave]
    n_students, jobs = len([r for r in todo if r.kind != "teacher"]), len(sub.submitted) - len(teachers)
    n_trials = len([r for r in todo if r.kind == "trial"])
    print(f"suite {plan.suite} ({plan.scale}): submitted {len(sub.submitted)} jobs "
          f"({len(teachers)} teachers, {n_students} students" + (f" of which {n_trials} tuning trials" if n_trials else "")
          + (f" in {jobs} jobs: cohorts of a teacher stream" if jobs < n_students else "") + "); "
          f"logs in {folder}; follow with --status")
    return sub.submitted


class _Submitter:
    """Submits units as array elements and knows each run's job, for the dependencies of the next wave."""

    def __init__(self, ex, folder: Path, plan: Plan, job_of: dict[str, str]):
        self.ex, self.folder, self.job_of, self.submitted = ex, folder, job_of, []
        self.by_id = {r.run_id: r for r in plan.runs}

    def submit(self, units: list[list[Run]], dependency: Optional[str]) -> None:
        """One array element per unit: a run, or a cohort (every member's job.json names the element)."""
        self.ex.update_parameters(slurm_dependency=dependency)
        with self.ex.batch():
            jobs = [self.ex.submit(TrainJob(), str(u[0].out) if len(u) == 1 else [str(r.out) for r in u])
                    for u in units]
        for u, j in zip(units, jobs):
            for r in u:
                self.job_of[r.run_id] = j.job_id
                atomic.write_json(r.dir.job, {
                    "executor": "slurm", "job_id": j.job_id, "folder": str(self.folder / "%j"),
                    "stdout": str(j.paths.stdout), "stderr": str(j.paths.stderr), "dependency": dependency,
                    "cohort": [x.run_id for x in u] if len(u) > 1 else None,
                    "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.submitted.extend(jobs)

    def dependency(self, unit: list[Run]) -> Optional[str]:
        """afterok on each unfinished teacher; afterany on each unfinished run outside the unit that fills the
        caches a member reads (if that one fails, the member computes the stream itself)."""
        deps, ids = [], {r.run_id for r in unit}
        for r in unit:
            if r.teacher and self._unfinished(r.teacher):
                deps.append(f"afterok:{self.job_of[r.teacher]}")
            if r.after and r.after not in ids and self._unfinished(r.after):
                deps.append(f"afterany:{self.job_of[r.after]}")
        return ",".join(dict.fromkeys(deps)) or None  # each once, in order

    def _unfinished(self, run_id: str) -> bool:
        return bool(self.job_of.get(run_id)) and not self.by_id[run_id].dir.done


def wait_slurm(plan: Plan, jobs: list[submitit.Job], poll_s: float = 5.0) -> list[Run]:
    """Block until the submitted jobs end; returns the runs that did not finish."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    bar = tqdm(total=len(jobs), desc=f"{plan.suite}/{plan.scale} (slurm)", unit="job", disable=not tty)
    pending = list(jobs)
    t0 = last = time.time()
    while pending:
        for j in list(pending):
            if j.done():
                pending.remove(j)
                bar.update(1)
        if not tty and time.time() - last >= PROGRESS_SECONDS:
            last = time.time()
            print(progress_line(f"{plan.suite}/{plan.scale} (slurm jobs)", len(jobs) - len(pending), len(jobs),
                                len(pending), 0, t0), flush=True)
        if pending:
            time.sleep(poll_s)
    bar.close()
    return [r for r in plan.runs if not r.dir.done]
