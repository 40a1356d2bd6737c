"""The training loop: resume, reruns, DDP, teacher loading, and clean errors for bad runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, assert_user_error, cli_error, env, free_port, run_cli
from mkd.config import load_config


def _records(d: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in (d / "metrics.jsonl").read_text().splitlines()]


def _weights(d: Path) -> dict:
    return torch.load(d / "model.pt", map_location="cpu")["model"]


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, teacher_ckpt):
    args = ["method=mkd", "teacher=emb_vit_m", f"teacher_checkpoint={teacher_ckpt}", "epochs=4", "batch_size=64",
            "augment=strong", "mkd.meta_interval=2", "log_every=5", *TINY]
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = run_cli("-m", "mkd.train", "--out", str(full), *args)  # all three in processes with the same thread count
    assert p.returncode == 0, p.stderr[-3000:]

    proc = subprocess.Popen([sys.executable, "-m", "mkd.train", "--out", str(killed), *args], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = killed / "checkpoint.pt"
        if ck.exists() and len((killed / "metrics.jsonl").read_text().splitlines()) >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists(), "killed before finishing"
    assert (killed / "checkpoint.pt").exists()
    p = run_cli("-m", "mkd.train", "--out", str(killed), *args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming after epoch" in p.stdout
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(full) == _records(killed)
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (full, killed))
    assert (ra["final_top1"], ra["tau_t"], ra["tau_s"]) == (rb["final_top1"], rb["tau_t"], rb["tau_s"])
    assert not (killed / "checkpoint.pt").exists(), "the checkpoint is removed once model.pt and result.json exist"


def test_rerun_on_a_finished_dir_does_nothing(tmp_path, capsys):
    from mkd.train import main

    args = ["--out", str(tmp_path), "epochs=1", "batch_size=64", *TINY]
    assert main(args) == 0
    mtime = (tmp_path / "result.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0 and "already finished" in capsys.readouterr().out
    assert (tmp_path / "result.json").stat().st_mtime_ns == mtime
    cli_error(main, ["--out", str(tmp_path), "epochs=2", "batch_size=64", *TINY], capsys, "holds another run")


def test_checkpoint_minutes_skips_epoch_checkpoints_but_not_the_metrics(tmp_path, monkeypatch):
    """checkpoint_minutes: an epoch's end writes a checkpoint only when that long has passed (the last epoch always
    does); every epoch's metrics are written anyway."""
    import mkd.train as tr

    saved, metrics = [], []
    real = tr.Trainer.checkpoint
    monkeypatch.setattr(tr.Trainer, "checkpoint", lambda self: (saved.append(self.state.epoch), real(self)))
    real_write = tr.atomic.write_jsonl
    monkeypatch.setattr(tr.atomic, "write_jsonl", lambda path, recs: (metrics.append(len(recs)), real_write(path, recs)))
    for minutes, out in ((0, "every"), (1e6, "rare")):
        saved.clear(), metrics.clear()
        tr.train(load_config(overrides=["epochs=3", "batch_size=64", f"checkpoint_minutes={minutes}", *TINY]),
                 tmp_path / out, quiet=True)
        assert saved == ([1, 2, 3] if minutes == 0 else [3]), saved
        assert {1, 2, 3} <= set(metrics), f"each epoch's records were written: {metrics}"


def test_result_records_teacher_top1_environment_and_is_cached(tmp_path, teacher_ckpt, private_cache):
    from mkd.train import train

    args = ["method=kd", "teacher=emb_vit_m", f"teacher_checkpoint={teacher_ckpt}", "epochs=1", "batch_size=64", *TINY]
    res = train(load_config(overrides=args), tmp_path / "a", quiet=True)
    teacher_res = json.loads((teacher_ckpt.parent / "result.json").read_text())
    assert res["teacher_top1"] == pytest.approx(teacher_res["final_top1"]), "measured on the same val set"
    assert list((private_cache / "teacher_eval").glob("*.json"))
    env_ = res["environment"]
    assert env_["torch"] == torch.__version__ and env_["device"].startswith("cpu") and env_["git_commit"]
    # the CPU kernel level changes float results: recorded, and part of what the tables compare
    assert env_["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env_["cpu_capability"] in env_["device"]
    for k in ("final_top1", "final_top5", "best_top1", "best_top5", "tau_t", "tau_s", "wall_time_s"):
        assert res[k] is not None, k


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, teacher_ckpt):
    args = ["method=mkd", "teacher=emb_vit_m", f"teacher_checkpoint={teacher_ckpt}", "epochs=2", "batch_size=64",
            "augment=none", "mkd.meta_interval=2", "mkd.hypergrad=jvp", *TINY]
    one, two = tmp_path / "one", tmp_path / "two"
    p = run_cli("-m", "mkd.train", "--out", str(one), *args)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "mkd.train",
                "--out", str(two), *args)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (one, two))
    assert rb["environment"]["world_size"] == 2
    assert abs(ra["final_top1"] - rb["final_top1"]) <= 0.5
    assert ra["tau_t"] == pytest.approx(rb["tau_t"], rel=1e-4) and ra["tau_s"] == pytest.approx(rb["tau_s"], rel=1e-4)


@pytest.mark.slow
def test_non_finite_loss_marks_the_run_failed(tmp_path):
    p = run_cli("-m", "mkd.train", "--out", str(tmp_path), "lr=1e30", "warmup_epochs=0", "epochs=2",
                "batch_size=64", "log_every=2", *TINY)
    assert_user_error(p, "non-finite training loss")
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["status"] == "failed" and "non-finite" in res["reason"]


@pytest.mark.parametrize("args,fragments", [
    (["mkd.hypergrd=jvp"], ["unknown config key 'mkd.hypergrd'", "hypergrad"]),
    (["method=kdd"], ["method", "'kd'"]),
    (["student=vit_tiny_patch16_24"], ["unknown model", "vit_tiny_patch16_224"]),
    (["method=mkd", "teacher=emb_vit_m", "mkd.tau_min=-1"], ["mkd.tau_min", "> 0"]),
    (["method=kd", "teacher=emb_vit_m"], ["teacher 'emb_vit_m' has no weights", "teacher_checkpoint"]),
    (["method=kd", "teacher=emb_vit_m", "teacher_checkpoint=/nonexistent/t.pt"], ["not found"]),
    (["epochs=-1"], ["epochs"]),
    (["batch_size=big"], ["batch_size", "int"]),
    (["student=no"], ["config key 'student' must be a string", "quote the value"]),
    (["method=yes"], ["method", "boolean", "allowed: ce, kd"]),
])
def test_bad_configs_give_one_clean_line(tmp_path, args, fragments, capsys):
    from mkd.train import main

    cli_error(main, ["--out", str(tmp_path / "r"), *args, *TINY], capsys, *fragments)


def test_yaml_booleans_in_string_keys_are_read_as_the_documented_words(tmp_path):
    cfg = load_config(overrides=["compile=on", "amp=off", "method=ce"])
    assert (cfg.compile, cfg.amp, cfg.method) == ("on", "off", "ce")
    f = tmp_path / "c.yaml"
    f.write_text("compile: off\namp: off\nkd: {weight: none}\n")
    cfg = load_config(f)
    assert (cfg.compile, cfg.amp, cfg.kd.weight) == ("off", "off", "none")


@pytest.mark.slow
def test_teacher_with_other_classes_is_rejected(tmp_path, teacher_ckpt):
    p = run_cli("-m", "mkd.train", "--out", str(tmp_path / "r"), "method=kd", "teacher=emb_vit_m",
                f"teacher_checkpoint={teacher_ckpt}", "embedded.num_classes=10", "embedded.superclasses=5", *TINY)
    assert_user_error(p, "has 20 classes but the dataset has 10")
    res = json.loads((tmp_path / "r" / "result.json").read_text())
    assert res["status"] == "failed" and "classes" in res["reason"]


def test_checkpoint_formats_deit_and_raw_state_dict(tmp_path, teacher_ckpt):
    from mkd.models import build_teacher

    sd = torch.load(teacher_ckpt)["model"]
    torch.save(sd, tmp_path / "raw.pth")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ddp.pth")
    for f in ("raw.pth", "ddp.pth"):
        t = build_teacher("emb_vit_m", 20, 16, str(tmp_path / f), False)
        assert not t.training and all(not p.requires_grad for p in t.parameters())
        assert torch.equal(t.state_dict()["head.weight"], sd["head.weight"])


@pytest.mark.slow
def test_pretrained_teacher_offline_is_a_clear_error(tmp_path):
    e = dict(env(), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "mkd.train", "--out", str(tmp_path / "r"), "method=kd",
                        "teacher=vit_tiny_patch16_224", "teacher_pretrained=true", "img_size=32", *TINY],
                       cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert_user_error(p, "could not get pretrained weights for 'vit_tiny_patch16_224'", "teacher_checkpoint=PATH")
