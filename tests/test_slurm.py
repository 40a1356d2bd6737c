"""The runner on a real single-node Slurm (slurm/local_cluster.sh): job arrays, a teacher -> student
``afterok`` dependency, and a requeue (interrupt -> checkpoint -> resumed) that ends like an uninterrupted run.

Needs root and the Slurm packages (``slurm/local_cluster.sh install``); `.ci/run` provides both."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, RUN, run_cli, write_suite

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]  # one worker owns the cluster fixture
SCRIPT = ROOT / "slurm" / "local_cluster.sh"
PROFILE = ROOT / "slurm" / "local.yaml"


def _reachable() -> bool:
    if not os.environ.get("SLURM_CONF") or shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """The cluster .ci/run started (SLURM_CONF), else one started here for this module."""
    if _reachable():
        yield Path(os.environ["SLURM_CONF"]).parent.parent
        return
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        pytest.skip("needs root and the Slurm packages: sudo slurm/local_cluster.sh install")
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="mkd-slurm-"))  # not under pytest's 0700 tree: mariadb runs as mysql
    env = dict(os.environ, SLURM_DIR=str(d))
    started = subprocess.run([SCRIPT, "start"], env=env, timeout=120, capture_output=True, text=True)
    if started.returncode != 0:  # stop what did start (munged, mariadb) before failing with the script's words
        subprocess.run([SCRIPT, "stop"], env=env, timeout=120, capture_output=True)
        pytest.fail(f"slurm/local_cluster.sh start failed: {(started.stderr or started.stdout).strip()[-800:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(d / "etc" / "slurm.conf")
    try:
        yield d
    finally:
        subprocess.run([SCRIPT, "stop"], env=env, timeout=120, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def release_requeued(job_id: str) -> None:
    """Slurm 22.05 holds requeued jobs for 121 s (Reason=BeginTime); start them now."""
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%r"], capture_output=True, text=True).stdout.strip()
    if r == "BeginTime":
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=False)


def test_suite_on_slurm_arrays_and_teacher_dependency(slurm_cluster, tmp_path):
    suite = write_suite(tmp_path / "small.yaml")
    res = tmp_path / "results"
    p = run_cli(RUN, "--suite", str(suite), "--results", str(res), "--profile", str(PROFILE), "--filter", "seed=0",
                "--wait", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "submitted 4 jobs (1 teachers, 3 students)" in p.stdout
    teacher_job = json.loads(next((res / "teachers" / "tiny").glob("*/job.json")).read_text())["job_id"]
    jobs = {yaml.safe_load((f.parent / "config.yaml").read_text())["method"]: json.loads(f.read_text())
            for f in (res / "small" / "tiny").glob("*/job.json")}
    # kd fills the stream's caches once its teacher is done; ce and mkd start after it ends and read them
    assert jobs["kd"]["dependency"] == f"afterok:{teacher_job}", jobs
    assert jobs["ce"]["dependency"] == f"afterany:{jobs['kd']['job_id']}", jobs
    assert jobs["mkd"]["dependency"] == f"afterok:{teacher_job},afterany:{jobs['kd']['job_id']}", jobs
    results = {r.get("method"): r for r in (json.loads(f.read_text()) for f in res.glob("small/tiny/*/result.json"))}
    results["teacher"] = json.loads(next(res.glob("teachers/tiny/*/result.json")).read_text())
    assert len(results) == 4 and all(r["status"] == "done" and r["environment"]["slurm_job_id"] for r in results.values())
    assert results["kd"]["stream_cache"]["teacher_written"] == 2 and results["mkd"]["stream_cache"]["teacher_read"] == 2
    assert results["ce"]["stream_cache"]["inputs_read"] == 2, "the students read what the first one computed"
    p = run_cli(RUN, "--suite", str(suite), "--results", str(res), "--profile", str(PROFILE), "--filter", "seed=0")
    assert "nothing to do" in p.stdout
    p = run_cli(RUN, "--suite", str(suite), "--results", str(res), "--profile", str(PROFILE), "--filter", "seed=0",
                "--status")
    assert p.returncode == 0 and p.stdout.count("\ndone") == 4, p.stdout


def test_requeue_resumes_from_checkpoint_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path):
    from mkd.launch import load_profile, submit_slurm
    from mkd.suites import expand

    spec_changes = {"axes/method": ["mkd"], "axes/seed": [0], "scales/tiny/config/epochs": 6,
                    "axes/augment": ["strong"]}
    profile = load_profile(str(PROFILE), "tiny")
    plans = []
    for name in ("a", "b"):  # identical runs in two results folders: b is interrupted, a is not
        suite = write_suite(tmp_path / f"{name}.yaml", **spec_changes)
        plans.append(expand(str(suite), "tiny", tmp_path / name))
    for plan in plans:  # the teacher first, locally
        from mkd.train import train

        train(plan.teachers[0].config, plan.teachers[0].out, quiet=True)
    (ja,), (jb,) = (submit_slurm(plan, profile) for plan in plans)
    run_b = plans[1].students[0]
    deadline = time.time() + 300
    while not (run_b.out / "checkpoint.pt").exists():
        assert time.time() < deadline and not jb.done(), "job b never wrote a checkpoint"
        time.sleep(0.1)
    jb._interrupt()  # USR2 as at a time limit: checkpoint -> requeue
    end = time.time() + 400
    saw_requeue = False
    done = lambda run: (run.dir.read_result() or {}).get("status") == "done"  # noqa: E731
    # wait on the runs' results, not on job.done(): right after a requeue sacct may briefly report the first
    # attempt as FAILED, which submitit would take for the job's end
    while not all(done(p.students[0]) for p in plans) and time.time() < end:
        st = subprocess.run(["squeue", "-h", "-j", jb.job_id, "-o", "%r"], capture_output=True, text=True).stdout
        saw_requeue |= "BeginTime" in st
        release_requeued(jb.job_id)
        time.sleep(0.5)
    ra, rb = (json.loads(p.students[0].dir.result.read_text()) for p in plans)
    log = "".join(p.read_text() for p in (tmp_path / "b").rglob("*_log.out"))
    assert (saw_requeue or "Requeued job" in log) and "resuming after epoch" in log, log[-3000:]
    # USR2 stops the job after the step in progress, with a checkpoint of that step: it resumes mid-epoch
    assert re.search(r"resuming after epoch \d+/6, step \d+/11 of epoch \d+", log), log[-3000:]
    print("requeued job", jb.job_id, "log:", *[l for l in log.splitlines() if "resuming" in l or l.startswith("epoch")],
          sep="\n  ")
    assert ra["status"] == rb["status"] == "done"
    assert (ra["final_top1"], ra["tau_t"], ra["tau_s"]) == (rb["final_top1"], rb["tau_t"], rb["tau_s"])
    wa = torch.load(plans[0].students[0].out / "model.pt")["model"]
    wb = torch.load(run_b.out / "model.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_task_job_trains_with_ddp_from_the_submitit_environment(slurm_cluster, tmp_path):
    """tasks_per_node=2 on CPU: gloo DDP set up by TorchDistributedEnvironment matches one process."""
    from mkd.launch import load_profile, submit_slurm
    from mkd.suites import expand
    from mkd.train import train

    changes = {"axes/method": ["kd"], "axes/seed": [0], "scales/tiny/config/epochs": 2}
    suite = write_suite(tmp_path / "ddp.yaml", **changes)
    one = expand(str(suite), "tiny", tmp_path / "one")
    two = expand(str(suite), "tiny", tmp_path / "two")
    for plan in (one, two):
        train(plan.teachers[0].config, plan.teachers[0].out, quiet=True)
    train(one.students[0].config, one.students[0].out, quiet=True)
    profile = dict(load_profile(str(PROFILE), "tiny"), tasks_per_node=2)
    (job,) = submit_slurm(two, profile)
    res = job.results()  # one result per task
    assert len(res) == 2 and all(r["status"] == "done" and r["environment"]["world_size"] == 2 for r in res), res
    wa = torch.load(one.students[0].out / "model.pt")["model"]
    wb = torch.load(two.students[0].out / "model.pt")["model"]
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_students_of_a_failed_teacher_are_cancelled_reported_blocked_and_resubmitted(slurm_cluster, tmp_path):
    suite = write_suite(tmp_path / "fails.yaml", **{"scales/tiny/teachers/small/train": {
        "epochs": 2, "lr": 1e30, "warmup_epochs": 0, "log_every": 1}})
    res = tmp_path / "results"
    args = ["--suite", str(suite), "--results", str(res), "--profile", str(PROFILE), "--filter", "seed=0",
            "--filter", "method=kd,mkd"]
    p = run_cli(RUN, *args, "--wait", timeout=600)  # returns: Slurm cancels the students (kill-on-invalid-dep)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    status = run_cli(RUN, *args, "--status")
    assert status.returncode == 1
    teacher = next((res / "teachers" / "tiny").iterdir()).name
    blocked = [l for l in status.stdout.splitlines() if l.startswith("blocked")]
    assert len(blocked) == 2 and all(f"teacher {teacher} failed (" in l and "non-finite" in l for l in blocked), \
        status.stdout
    p = run_cli(RUN, *args)  # rerun: the teacher and its students go out again
    assert "submitted 3 jobs (1 teachers, 2 students)" in p.stdout, p.stdout + p.stderr
    jobs = [json.loads(f.read_text())["job_id"] for f in res.glob("*/tiny/*/job.json")]
    subprocess.run(["scancel", *[j.split("_")[0] for j in jobs]], check=False)


def test_cifar_scale_suite_on_slurm_with_loader_workers(slurm_cluster, tmp_path):
    """The cifar scale as a cluster user first runs it, reduced by --set: Slurm arrays, DataLoader workers in the
    job, the teacher trained with the scale's recipe."""
    from conftest import make_cifar100
    from test_gpu_scales import CIFAR_SMOKE, check_cifar_smoke

    data = make_cifar100(tmp_path / "cifar")
    p = run_cli(RUN, "--suite", "degradation", "--scale", "cifar", "--data-root", str(data), "--results",
                str(tmp_path / "results"), "--executor", "slurm", "--profile", str(PROFILE), "--wait", *CIFAR_SMOKE,
                timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    check_cifar_smoke(tmp_path / "results")


def test_a_cohort_is_one_array_element_and_its_members_end_as_their_runs_alone(slurm_cluster, tmp_path):
    """--cohorts on: kd and mkd of one teacher stream (holdout=all) train as one array element; each member keeps
    its run directory and result, --status shows each, and both end bitwise as the same runs trained alone."""
    suite = write_suite(tmp_path / "small.yaml", **{"axes/method": ["kd", "mkd"], "axes/seed": [0]})
    res, alone = tmp_path / "results", tmp_path / "alone"
    p = run_cli(RUN, "--suite", str(suite), "--results", str(res), "--profile", str(PROFILE), "--cohorts", "on",
                "--wait", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 students in 1 jobs: cohorts of a teacher stream" in p.stdout, p.stdout
    jobs = {json.loads(f.read_text())["job_id"] for f in (res / "small" / "tiny").glob("*/job.json")}
    assert len(jobs) == 1
    p = run_cli(RUN, "--suite", str(suite), "--results", str(res), "--profile", str(PROFILE), "--status")
    assert p.returncode == 0 and p.stdout.count("\ndone") == 3, p.stdout
    p = run_cli(RUN, "--suite", str(suite), "--results", str(alone), "--no-cohorts")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    import torch

    for d in (res / "small" / "tiny").iterdir():
        if not (d / "model.pt").exists():
            continue
        a = torch.load(d / "model.pt", weights_only=False)["model"]
        b = torch.load(alone / "small" / "tiny" / d.name / "model.pt", weights_only=False)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), d.name
