"""The process a run trains in: distributed context, fast kernels, RNG seeding and state, and the record of
the software and hardware that decide its float rounding (written into every result)."""
from __future__ import annotations

import os
import platform
import random
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist

from . import __version__


@dataclass(frozen=True)
class Context:
    """Where this process stands in a (possibly one-process) job: its rank, the world size and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run directory."""
        return self.rank == 0


def init_distributed() -> Context:
    """The context from torchrun / submitit environment variables (DDP: gloo on CPU, NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    # rank % visible GPUs (DeiT): clusters that bind one GPU per task show each task a single device 0
    device = torch.device(f"cuda:{local % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        fast_kernels()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Context(rank, world, device)


def fast_kernels() -> None:
    """TF32 matmuls and convolutions (fp32 parts of an autocast step, the meta path's fp32 forwards) and cuDNN's
    autotuner (fixed shapes every step), as timm's and DeiT's training scripts set them."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def seed_everything(*seed: int) -> None:
    s = int(np.random.SeedSequence(list(seed)).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def environment(device: torch.device, world: int) -> dict:
    """Packages, commit, device and host of a run, as its result records them."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    isa = torch.backends.cpu.get_cpu_capability()
    name = kernels(device) if device.type == "cuda" else \
        f"cpu ({platform.machine()} {isa}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "mkd": __version__, "git_commit": commit, "device": name, "cpu_model": _cpu_model(),
            "cpu_capability": isa, "cpu_threads": torch.get_num_threads(), "world_size": world,
            "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def kernels(device: torch.device) -> str:
    """What decides a run's float rounding beyond the packages: the GPU model, or on a CPU the kernel level torch
    dispatches to (AVX2, AVX512, ...) and the CPU model (an Intel Xeon and an AMD EPYC, both AVX512, train the tiny
    degradation study's runs to other digits).  A tiny run's training amplifies rounding, so runs are bitwise
    reproducible only on the same kernels: recorded in results and part of the stream-cache key."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.backends.cpu.get_cpu_capability()} ({_cpu_model()})"


def packages() -> dict:
    """The versions of the packages that decide what a data stream's bytes are."""
    import PIL
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
