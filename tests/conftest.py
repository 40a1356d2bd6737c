"""Shared fixtures: a private cache, tiny embedded data, a tiny teacher checkpoint, CLI runners."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import json
import pickle

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
# small embedded data for fast tests: 20 classes x 40 training images, 16 px
TINY = ["embedded.train_per_class=40", "embedded.val_per_class=10"]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Generated data and teacher evaluations go to a per-session cache, not ~/.cache."""
    d = tmp_path_factory.mktemp("mkd-cache")
    old = os.environ.get("MKD_CACHE")
    os.environ["MKD_CACHE"] = str(d)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # make test: one core per xdist worker
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))
    yield d
    if old is None:
        os.environ.pop("MKD_CACHE", None)
    else:
        os.environ["MKD_CACHE"] = old


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    return e


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a CLI (python -m mkd.train ..., or a script path) and capture its output."""
    cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def assert_user_error(p: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, one line on stderr starting with 'error:', no traceback, every fragment present."""
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def cli_error(main, args: list[str], capsys, *fragments: str) -> str:
    """Call a CLI's main() in-process: exit status 2 and one 'error:' line holding every fragment."""
    capsys.readouterr()
    rc = main(list(args))
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def load_script(path: Path):
    """Import a script (benchmarks/run.py, analysis/make_tables.py) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A tiny emb_vit_m teacher checkpoint (DeiT format), trained one epoch on the tiny data."""
    from mkd.config import load_config
    from mkd.train import train

    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(overrides=["student=emb_vit_m", "epochs=2", "lr=2e-3", "augment=none", "batch_size=64", *TINY])
    train(cfg, out, quiet=True)
    return out / "model.pt"


RUN = str(ROOT / "benchmarks" / "run.py")
SMALL_SUITE = {
    "description": "a small test suite",
    "axes": {"teacher": ["small"], "augment": ["none"], "method": ["ce", "kd", "mkd"], "seed": [0, 1]},
    "scales": {"tiny": {
        "student": "emb_vit_s",
        "teachers": {"small": {"model": "emb_vit_m", "train": {"epochs": 2, "augment": "none", "lr": 2e-3}}},
        "config": {"dataset": "embedded", "epochs": 2, "batch_size": 64, "log_every": 5, "holdout": "all",
                   "embedded": {"train_per_class": 40, "val_per_class": 10}, "mkd": {"meta_interval": 2}}}},
}


def write_suite(path: Path, spec: dict | None = None, **changes) -> Path:
    """Write a suite YAML: SMALL_SUITE with 'a/b/c' keyed changes."""
    spec = json.loads(json.dumps(spec or SMALL_SUITE))
    for k, v in changes.items():
        node = spec
        parts = k.split("/")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def small_suite_results(tmp_path_factory):
    """The small suite run once through the real CLI (2 processes); shared by runner and analysis tests."""
    d = tmp_path_factory.mktemp("suite")
    suite = write_suite(d / "small.yaml")
    p = run_cli(RUN, "--suite", str(suite), "--results", str(d / "results"), "--max-parallel", "2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return d, suite, p




def make_cifar100(root: Path, train_per_class: int = 8, test_per_class: int = 2) -> Path:
    """CIFAR-100 in torchvision's layout (``cifar-100-python/{train,test,meta}``) with random images."""
    rng = np.random.default_rng(0)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, per in (("train", train_per_class), ("test", test_per_class)):
        labels = (np.arange(100 * per) % 100).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8), "fine_labels": labels,
                         "coarse_labels": [l // 5 for l in labels], "filenames": [f"{i}.png" for i in range(len(labels))]}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f)
    return root


def make_image_folder(root: Path, classes: int = 4, train: int = 24, val: int = 4, size: tuple = (40, 48)) -> Path:
    """An ImageNet-style folder (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) of random JPEGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"{i}.JPEG", quality=90)
    return root
