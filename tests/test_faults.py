"""Fault injection: damaged files in a run directory, a full disk, a crash between checkpoints.

Each test asserts that the rerun ends with the uninterrupted run's result, that nothing claims "done" that is
not, and that damaged files are kept aside rather than deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import TINY, cli_error, run_cli
from mkd.config import load_config

ARGS = ["method=mkd", "teacher=emb_vit_m", "epochs=2", "batch_size=64", "augment=weak", "mkd.meta_interval=2",
        "log_every=5", *TINY]


def _args(teacher_ckpt):
    return [*ARGS, f"teacher_checkpoint={teacher_ckpt}"]


def _same_run(a, b) -> None:
    wa, wb = (torch.load(d / "model.pt", weights_only=False)["model"] for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert (ra["final_top1"], ra["tau_t"], ra["tau_s"]) == (rb["final_top1"], rb["tau_t"], rb["tau_s"])
    ma, mb = ([{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
    assert ma == mb


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, teacher_ckpt):
    from mkd.train import train

    out = tmp_path_factory.mktemp("clean")
    train(load_config(overrides=_args(teacher_ckpt)), out, quiet=True)
    return out


def _crash_before_finishing(monkeypatch, cfg, out):
    """Train every epoch, then die where result.json would be written: checkpoints of epochs 2 and 1 remain."""
    import mkd.train as T

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(T.Trainer, "finish", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        T.train(cfg, out, quiet=True)
    monkeypatch.undo()
    assert json.loads((out / "result.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, teacher_ckpt, clean_run, monkeypatch):
    from mkd.train import train

    cfg = load_config(overrides=_args(teacher_ckpt))
    out = tmp_path / "run"
    _crash_before_finishing(monkeypatch, cfg, out)
    ck = out / "checkpoint.pt"
    assert ck.exists() and (out / "checkpoint.prev.pt").exists(), "the previous checkpoint is kept"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])  # what a copy cut short leaves
    res = train(cfg, out, quiet=True)
    assert res["status"] == "done"
    assert list(out.glob("checkpoint.pt.damaged.*")), "the damaged checkpoint is moved aside, not deleted"
    assert not ck.exists() and not (out / "checkpoint.prev.pt").exists()
    _same_run(clean_run, out)


@pytest.mark.slow
def test_both_checkpoints_damaged_restart_from_scratch(tmp_path, teacher_ckpt, clean_run, monkeypatch):
    from mkd.train import train

    cfg = load_config(overrides=_args(teacher_ckpt))
    out = tmp_path / "run"
    _crash_before_finishing(monkeypatch, cfg, out)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes(b"PK\x03\x04 not a checkpoint")
    train(cfg, out, quiet=True)
    assert len(list(out.glob("checkpoint*.damaged.*"))) == 2
    _same_run(clean_run, out)


@pytest.mark.slow
def test_truncated_result_and_config_are_moved_aside_and_the_run_redone(tmp_path, teacher_ckpt, clean_run, capsys):
    from mkd.train import main

    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    (out / "result.json").write_text('{"status": "do')
    (out / "config.yaml").write_text("method: [mkd\n  teacher: {")
    assert main(["--out", str(out), *_args(teacher_ckpt)]) == 0
    text = capsys.readouterr().out
    assert "result.json is damaged" in text and "config.yaml is damaged" in text
    assert list(out.glob("result.json.damaged.*")) and list(out.glob("config.yaml.damaged.*"))
    _same_run(clean_run, out)


def test_a_damaged_result_reads_as_failed_everywhere(tmp_path):
    from mkd.rundir import RunDir

    (tmp_path / "result.json").write_text('{"status": "done", "final_to')
    run = RunDir(tmp_path)
    assert run.state() == "failed" and "damaged" in run.read_result()["reason"]


def test_a_damaged_split_is_made_again_identically(tmp_path):
    from mkd.data import load_or_make_split

    cfg = load_config(overrides=["fraction=0.5"])
    labels = np.repeat(np.arange(10), 30)
    first = load_or_make_split(tmp_path / "split.npz", labels, cfg)
    p = tmp_path / "split.npz"
    p.write_bytes(p.read_bytes()[:100])
    again = load_or_make_split(p, labels, cfg)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert list(tmp_path.glob("split.npz.damaged.*"))


@pytest.mark.slow
def test_metrics_cut_short_keep_their_readable_lines_and_the_run_is_named(tmp_path, clean_run):
    from conftest import ROOT as R
    from mkd.results import RunInfo

    res = tmp_path / "results" / "s" / "tiny" / clean_run.name
    shutil.copytree(clean_run, res)
    (res / "run.json").write_text(json.dumps(RunInfo(clean_run.name, scale="tiny", suite="s",
                                                     rows=[{"method": "mkd", "seed": 0}]).to_dict()))
    m = res / "metrics.jsonl"
    m.write_text(m.read_text()[:-40])
    p = run_cli(str(R / "analysis" / "make_tables.py"), "--results", str(tmp_path / "results"),
                "--out", str(tmp_path / "t"))
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "skipped 1 unreadable line(s)" in p.stderr and clean_run.name in p.stderr
    assert (tmp_path / "t" / "s_tiny.md").exists()


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, teacher_ckpt, clean_run, capsys):
    """A real full filesystem: a small tmpfs that fills up during the run (root only, as in CI)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    from mkd.train import main

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("the test machine does not allow mounting a tmpfs")
    try:
        out = mnt / "run"
        line = cli_error(main, ["--out", str(out), *_args(teacher_ckpt)], capsys, "could not write", "No space left",
                         "free disk space", "rerun the same command")
        assert not (out / "result.json").exists() or json.loads((out / "result.json").read_text())["status"] != "done"
        assert not list(out.glob(".*.tmp")), f"no half-written file is left behind: {line}"
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)  # space freed
        assert main(["--out", str(out), *_args(teacher_ckpt)]) == 0
        _same_run(clean_run, out)
    finally:
        subprocess.run(["umount", str(mnt)])


# ---------------------------------------------------------------------------- preemption mid-epoch
MID = ["method=mkd", "teacher=emb_vit_m", "epochs=3", "batch_size=32", "augment=strong", "drop_path=0.1",
       "mkd.meta_interval=2", "log_every=5", *TINY]  # 22 steps an epoch; drop path, Mixup and meta batches all draw


def _mid_checkpoint(d):
    try:
        return (torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=False) or {}).get("in_epoch")
    except Exception:  # not there yet, or being replaced
        return None


def _popen(out, args):
    import sys

    from conftest import ROOT, env

    return subprocess.Popen([sys.executable, "-m", "mkd.train", "--out", str(out), *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def uninterrupted_mid(tmp_path_factory, teacher_ckpt):
    out = tmp_path_factory.mktemp("mid") / "full"
    p = run_cli("-m", "mkd.train", "--out", str(out), *MID, f"teacher_checkpoint={teacher_ckpt}",
                "teacher_cache=off", "input_cache=off")
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR2"])
def test_a_signal_mid_epoch_checkpoints_that_step_and_the_rerun_matches(tmp_path, teacher_ckpt, uninterrupted_mid, sig):
    import signal
    import time

    args = [*MID, f"teacher_checkpoint={teacher_ckpt}", "teacher_cache=off", "input_cache=off"]
    out = tmp_path / "run"
    proc = _popen(out, args)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None, "the run never finished an epoch"
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and f"stopped by {sig}" in lines[0] and "Traceback" not in err, err
    mid = _mid_checkpoint(out)
    assert mid is not None and 0 < mid["step_in_epoch"] <= 22, "a checkpoint of the step it stopped at"
    assert not (out / "result.json").exists(), "stopped: neither done nor failed"
    p = run_cli("-m", "mkd.train", "--out", str(out), *args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"step {mid['step_in_epoch']}/22 of epoch" in p.stdout, p.stdout
    _same_run(uninterrupted_mid, out)


@pytest.mark.slow
def test_step_interval_checkpoints_survive_a_kill_mid_epoch(tmp_path, teacher_ckpt, uninterrupted_mid):
    import signal
    import time

    args = [*MID, f"teacher_checkpoint={teacher_ckpt}", "checkpoint_every_steps=5", "input_cache=on"]  # with caches
    out = tmp_path / "run"
    proc = _popen(out, args)
    deadline = time.time() + 120
    while (_mid_checkpoint(out) or {}).get("step_in_epoch") != 10 or not (out / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None, "no step-10 checkpoint after the first epoch"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    p = run_cli("-m", "mkd.train", "--out", str(out), *args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "step 10/22 of epoch" in p.stdout or "step 15/22 of epoch" in p.stdout or "step 20/22" in p.stdout, p.stdout
    _same_run(uninterrupted_mid, out)
