"""The failure modes of a real cluster: the training set staged to node-local disk (the stream unchanged), the
ImageFolder scanned once, one evaluation loader per process, the profile's requeue count and loader workers,
and no process outliving a launcher killed with kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import RUN, env, load_script, make_image_folder, write_suite


def _imagenet_cfg(root, **extra):
    from mkd.config import load_config

    over = ["dataset=imagenet", f"data_root={root}", "img_size=16", "epochs=1", "batch_size=8", "augment=weak",
            "eval_batch_size=8", "lr=1e-3", *(f"{k}={v}" for k, v in extra.items())]
    return load_config(overrides=over)


def test_a_staged_training_set_is_the_same_stream_and_the_same_run(tmp_path):
    """stage_dir copies train/ to node-local disk once and reads it from there: the run id, the batches and the
    trained weights are those of the run that reads the shared folder."""
    from mkd.train import train

    root = make_image_folder(tmp_path / "imagenet", classes=4, train=12, val=4, size=(20, 24))
    plain, staged = _imagenet_cfg(root), _imagenet_cfg(root, stage_dir=tmp_path / "local")
    assert plain.run_id == staged.run_id and plain.stream_key() == staged.stream_key()
    train(plain, tmp_path / "a", quiet=True)
    train(staged, tmp_path / "b", quiet=True)
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the staged copy gives the same stream"
    copies = [p for p in (tmp_path / "local").iterdir() if p.is_dir()]
    assert len(copies) == 1 and len(list((copies[0] / "train").rglob("*.JPEG"))) == 4 * 12
    stamp = (copies[0] / "train").stat().st_mtime_ns
    from mkd.data import stage_folder

    assert stage_folder(root / "train", tmp_path / "local") == copies[0] / "train"
    assert (copies[0] / "train").stat().st_mtime_ns == stamp, "a complete copy is reused, not made again"


def test_an_image_folder_is_scanned_once_and_its_index_reused(tmp_path, monkeypatch):
    import torchvision.datasets.folder as F

    from mkd import data

    root = make_image_folder(tmp_path / "imagenet", classes=3, train=5, val=2, size=(12, 12))
    first = data._image_folder(str(root), "train")
    import torchvision

    assert first.samples == torchvision.datasets.ImageFolder(str(root / "train")).samples, "torchvision's order"
    data._FOLDERS.clear()  # another process: only the index file in the cache is left

    def no_scan(*a, **k):
        raise AssertionError("scanned again")

    monkeypatch.setattr(F, "make_dataset", no_scan)
    second = data._image_folder(str(root), "train")
    assert first.samples == second.samples and first.classes == second.classes == ["n00000000", "n00000001",
                                                                                   "n00000002"]


def test_runs_of_one_process_share_one_evaluation_loader(tmp_path):
    from mkd import parts
    from mkd.environment import Context
    from mkd.stream import StreamSource  # noqa: F401

    cfg = _imagenet_cfg(tmp_path, num_workers=0)
    ctx = Context(rank=0, world=1, device=torch.device("cpu"))

    class Big(torch.utils.data.Dataset):  # too large to hold in memory: evaluated through a loader
        def __len__(self):
            return 10

        def __getitem__(self, i):
            from PIL import Image

            return Image.new("RGB", (8, 8)), 0

    import mkd.parts as P

    real = P.materialize
    P.materialize = lambda *a, **k: None
    try:
        a = parts.eval_batches(cfg, Big(), lambda im: im, ("k",), ctx)
        b = parts.eval_batches(cfg, Big(), lambda im: im, ("k",), ctx)
    finally:
        P.materialize = real
    loaders = [v for k, v in parts._LOADERS.items() if k[0] == ("k",)]
    assert len(loaders) == 1, "a second run of the process evaluates through the first one's loader"
    assert callable(a) and callable(b)


def test_the_profile_sets_requeues_loader_workers_and_staging(tmp_path, monkeypatch):
    import submitit.slurm.slurm as S

    from mkd.launch import load_profile, make_executor

    monkeypatch.setattr(S.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # a login node with srun
    prof = tmp_path / "p.yaml"
    prof.write_text("partition: gpu\ncpus_per_task: 12\nmax_num_timeout: 9\ncohort_max: 4\n"
                    "stage_input: /local/scratch\nscales: {tiny: {cpus_per_task: 3}}\n")
    profile = load_profile(str(prof), "imagenet")
    ex = make_executor(profile, tmp_path, None)
    assert ex._executor.max_num_timeout == 9
    run = load_script(Path(RUN))
    assert run.loader_workers(profile) == 11 and run.loader_workers(load_profile(str(prof), "tiny")) == 2


@pytest.mark.slow
def test_no_process_outlives_a_launcher_killed_with_kill_9(tmp_path):
    """kill -9 the launcher while its pool trains: within 30 s no process it started is left (the workers get
    SIGTERM from the kernel when their parent dies, their loader workers follow)."""
    suite = write_suite(tmp_path / "s.yaml", **{"axes/method": ["ce"], "axes/seed": [0, 1, 2, 3],
                                                "scales/tiny/config/epochs": 40})
    p = subprocess.Popen([sys.executable, RUN, "--suite", str(suite), "--results", str(tmp_path / "r"),
                          "--max-parallel", "2"], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        logs = list((tmp_path / "r").rglob("train.log"))
        if any("epoch 1/40" in l.read_text(errors="ignore") for l in logs):
            break
        time.sleep(0.5)
    else:
        p.kill()
        pytest.fail("no run started training within 120 s")
    family = _descendants(p.pid)
    assert family, "the launcher's pool workers"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in family):
        time.sleep(0.5)
    left = [pid for pid in family if _alive(pid)]
    assert not left, f"processes outlived their launcher: {left}"


def _descendants(pid: int) -> list[int]:
    kids = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
