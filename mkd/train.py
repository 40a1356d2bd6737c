"""The one training loop: ``python -m mkd.train --config FILE.yaml --out DIR [key=value ...]``.

Every method runs through it (AdamW + warmup/cosine, autocast, the teacher in eval/no-grad on the same
mixed batch, top-1/top-5 each epoch).  A run directory holds::

    config.yaml    resolved config          split.npz      training / meta indices (reused on rerun)
    metrics.jsonl  one line per epoch       checkpoint.pt  latest resumable state (removed when done)
    result.json    written last             model.pt       final student weights ({'model': state_dict})

Every file is written atomically.  Rerunning on a finished directory does nothing; on an unfinished one it
resumes from the last checkpoint (an epoch's end, a step where USR2/SIGTERM stopped it, or every
``checkpoint_every_steps``) and, because the data stream is a function of (seed, epoch, position)
(``mkd/stream.py``) and every RNG state is saved, ends with the same weights and metrics as an uninterrupted run.
Started with several processes (torchrun, or submitit tasks via ``TorchDistributedEnvironment``) it trains
with DDP: gloo on CPU, NCCL on GPUs.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import timm
import torch
import torch.distributed as dist
import yaml

from . import __version__, atomic
from .augment import InputConfig, build_augment, model_input_config, renormalizer
from .config import STREAM_VERSION, RunConfig, describe, load_config
from .data import MetaBatches, TrainSource, TrainStream, collated_as_is, load_base, load_or_make_split, materialize
from .engine import (EpochPartial, Loop, NonFiniteLoss, Timer, build_loop, evaluate, precision_for, tensor_batches,
                     train_one_epoch)
from .errors import UserError, cli
from .methods import build_method
from .models import build_teacher, create_model, load_weights, num_params, teacher_eval_cache
from .preempt import PreemptGuard, Preempted
from .rundir import RunDir
from .stream import StreamSource, normalizer_of, to_device
from .stream_cache import CACHE_VERSION, EpochFiles, Feed, weights_sha



# ---------------------------------------------------------------------------- process setup
def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun / submitit environment variables."""
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
    return rank, world, device


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
    dispatches to (AVX2, AVX512, ...).  A tiny run's training amplifies rounding, so runs are bitwise reproducible
    only on the same kernels: recorded in results and part of the stream-cache key."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------- the run
def prepare_dir(cfg: RunConfig, run: RunDir, say=print) -> Optional[dict]:
    """Create/check the run directory; returns the finished result when there is nothing to do.

    A damaged result.json or config.yaml is moved aside (``NAME.damaged.<time>``) and the run resumes; a config
    of another run is refused."""
    run.path.mkdir(parents=True, exist_ok=True)
    try:
        res = atomic.read_json(run.result)
    except atomic.Damaged:
        say(f"{run.result} is damaged: moved aside to {atomic.move_aside(run.result).name}; resuming the run")
        res = None
    if run.config.exists():
        text = run.config.read_text(errors="replace")
        m = re.match(r"# run_id: (\w+)\n", text)
        try:
            prev_id = m.group(1) if m else load_config(overrides=yaml.safe_load(text) or {}).run_id
        except UserError:  # written by another version with other keys
            prev_id = "unknown"
        except yaml.YAMLError:
            say(f"{run.config} is damaged: moved aside to {atomic.move_aside(run.config).name}; rewriting it")
            prev_id = cfg.run_id  # the checkpoint's run id is checked on resume
        if prev_id != cfg.run_id:
            raise UserError(f"{run.path} holds another run ({prev_id}, this config is {cfg.run_id}): use a new --out")
    if res and res.get("status") == "done":
        return res
    if res:  # failed before: keep the record, retry from the last checkpoint
        os.replace(run.result, run.failed_result(int(time.time())))
    atomic.write_text(run.config, cfg.to_yaml())
    return None


def _teacher_top1(cfg: RunConfig, teacher, val_batches, device, autocast, info, t_in: InputConfig) -> float:
    key = {"dataset": cfg.dataset, "img_size": info.img_size, "root": cfg.data_root,
           "embedded": cfg.to_dict()["embedded"] if cfg.dataset == "embedded" else None}
    if cfg.teacher_input != "dataset":
        key["input"] = dataclasses.asdict(t_in)
    path = teacher_eval_cache(cfg.teacher_checkpoint, cfg.teacher, key)
    hit = atomic.read_json(path)
    if hit is not None:
        return hit["top1"]
    top1 = evaluate(teacher, val_batches(), device, autocast)["top1"]
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic.write_json(path, {"top1": top1, "teacher": cfg.teacher, "checkpoint": cfg.teacher_checkpoint, "data": key})
    return top1


def train(cfg: RunConfig, out: str | Path, quiet: bool = False) -> dict:
    """Train (or resume, or skip) the run ``cfg`` in ``out``; returns the result dict."""
    run = RunDir(out)
    rank, world, device = init_distributed()
    say = (lambda *a: None) if (quiet or rank) else (lambda *a: print(*a, flush=True))
    if cfg.batch_size % world:
        raise UserError(f"batch_size={cfg.batch_size} does not split over {world} processes: use a multiple of {world}")
    done = prepare_dir(cfg, run, say) if rank == 0 else None
    if world > 1:
        box = [done]
        dist.broadcast_object_list(box)
        done = box[0]
    if done is not None:
        say(f"{run.path}: already finished (top1 {done.get('final_top1')}); nothing to do")
        return done
    with run.lock() if rank == 0 else nullcontext():  # a RunLocked error leaves the other process's run alone
        try:
            return _run(cfg, run, rank, world, device, say)
        except Preempted:  # a checkpoint of the step is written; no result: the run is unfinished, not failed
            raise
        except NonFiniteLoss as e:
            if rank == 0:
                _write_failure(run, cfg, str(e))
            raise UserError(f"{run.path}: {e}") from None
        except UserError as e:  # bad input found while setting up: the run is failed, the message says why
            if rank == 0:
                _write_failure(run, cfg, str(e))
            raise
        except OSError as e:
            if e.errno not in RESOURCE_ERRORS:
                raise
            what = Path(e.filename).name.lstrip(".").split(".tmp")[0] if e.filename else "a file"
            raise UserError(f"{run.path}: could not write {what} ({e.strerror}): {RESOURCE_ERRORS[e.errno]}; "
                            "then rerun the same command: the run resumes from its last checkpoint, and nothing "
                            "half-written is read as a result") from None
        except Exception as e:  # a bug: record it, keep the traceback
            if rank == 0:
                _write_failure(run, cfg, f"{type(e).__name__}: {e}")
            raise


RESOURCE_ERRORS = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free quota", errno.EROFS: "make it writable",
                   errno.EACCES: "make it writable", errno.ENOENT: "restore the results directory"}


def _write_failure(run: RunDir, cfg: RunConfig, reason: str) -> None:
    try:
        atomic.write_json(run.result, {"status": "failed", "reason": reason, "run_id": cfg.run_id,
                                       "method": cfg.method, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    except OSError:  # the disk that failed the run may fail this too: the error message still reaches the user
        pass


@dataclass
class Built:
    """A run's pieces once built: data, the loop and what the result reports about them."""

    loop: Loop
    feed: Feed
    split: dict
    val_len: int
    val_batches: Callable
    teacher_top1: Optional[float]


@dataclass
class RunState:
    """Where a run stands: what a checkpoint saves and resuming restores."""

    epoch: int = 0
    step: int = 0
    records: list = field(default_factory=list)
    wall: float = 0.0
    best: dict = field(default_factory=lambda: {"top1": -1.0})
    in_epoch: Optional[EpochPartial] = None  # epoch ``epoch`` stopped mid-way (a mid-epoch checkpoint)
    in_epoch_seconds: float = 0.0
    meta: Optional[dict] = None  # the meta batches' position in that epoch


_TENSORS: dict = {}  # materialised evaluation / meta sets of this process, reused by its next runs (pool workers)


def _materialized(key: tuple, make: Callable):
    """``make()`` once per process and key: a pool worker trains run after run on the same validation set."""
    if key not in _TENSORS:
        if len(_TENSORS) >= 4:
            _TENSORS.pop(next(iter(_TENSORS)))
        _TENSORS[key] = make()
    return _TENSORS[key]


def _build(cfg: RunConfig, run: RunDir, rank: int, world: int, device: torch.device, say) -> Built:
    """Data (split, transforms, evaluation batches), student, teacher, method and the loop around them."""
    prec = precision_for(cfg.amp, device)
    train_base, val_base, info = load_base(cfg)
    if rank == 0:
        split = load_or_make_split(run.split, train_base.targets, cfg)
    if world > 1:
        dist.barrier()
    if rank:
        split = load_or_make_split(run.split, train_base.targets, cfg)
    seed_everything(cfg.seed, 0)
    student = create_model(cfg.student, info.num_classes, info.img_size, pretrained=cfg.pretrained,
                           drop_path=cfg.drop_path, **cfg.student_kwargs)
    dataset_input = InputConfig(tuple(info.mean), tuple(info.std), info.crop_pct)
    s_in = model_input_config(student, dataset_input) if cfg.student_input == "model" else dataset_input
    aug = build_augment(cfg.augment, info.img_size, s_in.mean, s_in.std, info.num_classes, s_in.crop_pct,
                        info.crop_scale, s_in.interpolation)
    data_key = (cfg.dataset, str(cfg.embedded) if cfg.dataset == "embedded" else cfg.data_root, info.img_size)
    val_batches = _eval_batches(cfg, val_base, aug.eval_transform, (*data_key, s_in), rank, world, device)
    if cfg.init_checkpoint:
        load_weights(student, cfg.init_checkpoint, "student")
    student.to(device)
    method = build_method(cfg, info.num_classes).to(device)
    teacher = teacher_top1 = renorm = None
    if method.needs_teacher:
        teacher = build_teacher(cfg.teacher, info.num_classes, info.img_size, cfg.teacher_checkpoint,
                                cfg.teacher_pretrained, **cfg.teacher_kwargs).to(device)
        t_in = model_input_config(teacher, dataset_input) if cfg.teacher_input == "model" else dataset_input
        renorm = renormalizer(s_in, t_in)
        t_val = val_batches if t_in == s_in else _eval_batches(cfg, val_base, t_in.eval_transform(info.img_size),
                                                               (*data_key, t_in), rank, world, device)
        teacher_top1 = _teacher_top1(cfg, teacher, t_val, device, prec.autocast, info, t_in)
        say(f"teacher {cfg.teacher}: {num_params(teacher) / 1e6:.2f}M params, val top1 {teacher_top1:.2f}"
            + (f" (its own input: mean {t_in.mean}, std {t_in.std}, crop {t_in.crop_pct})" if renorm else ""))
    meta_batches = None
    if method.needs_meta_split:
        meta_ds = StreamSource(train_base, split["meta"], aug.eval_transform)
        meta_t = _materialized(("meta", *data_key, s_in, hashlib.sha256(np.asarray(split["meta"]).tobytes()).hexdigest()),
                               lambda: materialize(meta_ds, num_workers=cfg.num_workers))
        meta_batches = MetaBatches(meta_ds, meta_t, method.meta_batch_size, cfg.seed, rank, world, device,
                                   cfg.num_workers, normalizer_of(meta_ds))
    steps_per_epoch = len(split["train"]) // cfg.batch_size
    loop = build_loop(cfg, student, teacher, method, aug, device, steps_per_epoch, meta_batches, rank, world, renorm)
    feed = _feed(cfg, run, loop, TrainSource(train_base, split["train"], aug.train_transform), split, info, rank,
                 world, say)
    return Built(loop, feed, split, len(val_base), val_batches, teacher_top1)


def _eval_batches(cfg: RunConfig, base, transform, key: tuple, rank: int, world: int, device: torch.device) -> Callable:
    """``() -> batches`` of this process's shard of the evaluation set, normalised on the device: from uint8
    tensors held in memory when they fit (once per process and key), else from one loader whose workers
    persist across evaluations."""
    src = StreamSource(base, None, transform)
    norm = normalizer_of(src)
    held = _materialized(("val", *key), lambda: materialize(src, num_workers=cfg.num_workers))
    bs = max(1, cfg.eval_batch_size)
    loader = None
    if held is None:
        loader = torch.utils.data.DataLoader(src, batch_size=bs, sampler=list(range(rank, len(src), world)),
                                             num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                             persistent_workers=cfg.num_workers > 0, collate_fn=collated_as_is)

    def batches():
        it = tensor_batches(held, bs, rank, world) if held is not None else (b[:2] for b in loader)
        for x, y in it:
            yield to_device((x, y, ()), device, norm)
    return batches


def _feed(cfg: RunConfig, run: RunDir, loop: Loop, src: TrainSource, split: dict, info, rank: int, world: int,
          say) -> Feed:
    """Where the epoch's batches and teacher logits come from: the stream's caches (``mkd/stream_cache.py``),
    keyed by everything they depend on, else computed (and then stored for the next run of the stream)."""
    import PIL
    import torchvision

    device = loop.precision.device
    stream = {"stream": STREAM_VERSION, "cache": CACHE_VERSION, "dataset": cfg.dataset,
              "embedded": dataclasses.asdict(cfg.embedded) if cfg.dataset == "embedded" else None,
              "num_examples": int(split["num_examples"]),
              "train_sha": hashlib.sha256(np.asarray(split["train"], np.int64).tobytes()).hexdigest()[:16],
              "augment": cfg.augment, "img_size": info.img_size, "batch_size": cfg.batch_size, "world": world,
              "seed": cfg.seed, "device": device.type, "student_input": cfg.student_input,
              "kernels": kernels(device),  # a cache is bitwise what this run computes only on the same kernels
              "threads": torch.get_num_threads() if device.type == "cpu" else None,  # ... and thread count
              "packages": {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                           "pillow": PIL.__version__, "numpy": np.__version__}}
    if cfg.repeated_aug > 1:
        stream["repeated_aug"] = cfg.repeated_aug
    batches = TrainStream(src, cfg.batch_size, cfg.seed, rank, world, cfg.num_workers, device.type == "cuda",
                          cfg.repeated_aug) if cfg.epochs else None  # epochs=0: a validation, no training batches

    inputs = teacher = None
    if cfg.caches_inputs and (cfg.input_cache == "on" or run.info.exists()):  # auto: inside suites (run.json) only
        inputs = EpochFiles(run.path.parent / ".streams", {"kind": "inputs", **stream}, rank, say)
    M = loop.models
    if M.teacher is not None and cfg.caches_teacher:
        where = Path(cfg.teacher_checkpoint).parent if cfg.teacher_checkpoint else run.path.parent
        key = {"kind": "teacher_logits", **stream, "teacher": cfg.teacher, "teacher_kwargs": cfg.teacher_kwargs,
               "teacher_weights": weights_sha(M.teacher), "amp": loop.precision.amp, "compile": M.teacher_compiled,
               "topk": cfg.teacher_cache_topk}
        if cfg.teacher_input != "dataset":
            key["teacher_input"] = cfg.teacher_input
        teacher = EpochFiles(where / "teacher_cache", key, rank, say)
    return Feed(batches and batches.epoch, loop.augment, cfg.seed, device, loop.precision.autocast, M.teacher_fwd,
                info.num_classes, cfg.teacher_cache_topk, inputs, teacher, batches and normalizer_of(batches.source))


def _load_checkpoint(run: RunDir, cfg: RunConfig, say) -> tuple[Optional[Path], Optional[dict]]:
    """The newest whole checkpoint of this run: ``checkpoint.pt``, else the one before it; a damaged file is moved
    aside (never deleted), and with none left the run starts over.  Returns (its path, its state)."""
    for path in (run.checkpoint, run.previous_checkpoint):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or state.get("run_id") != cfg.run_id or "model" not in state:
                raise ValueError("not a checkpoint of this run")
            return path, state
        except Exception as e:  # truncated zip, unpickling error, foreign file: keep it, fall back
            say(f"{path} is damaged ({type(e).__name__}): moved aside to {atomic.move_aside(path).name}")
    return None, None


def _resume(cfg: RunConfig, run: RunDir, b: Built, rank: int, world: int, say) -> RunState:
    """From the last whole checkpoint when there is one (weights, optimizers, scheduler, scaler, RNG, records).
    Rank 0 picks it (and moves damaged files aside); the other ranks load the file it picked."""
    L = b.loop
    path, state = _load_checkpoint(run, cfg, say) if rank == 0 else (None, None)
    if world > 1:
        box = [str(path) if path else None]
        dist.broadcast_object_list(box)
        if rank and box[0]:
            state = torch.load(box[0], map_location="cpu", weights_only=False)
    if state is None:
        if rank == 0:
            atomic.write_jsonl(run.metrics, [])
        return RunState()
    L.models.student.load_state_dict(state["model"])
    L.method.load_state_dict(state["method"])
    L.optim.optimizer.load_state_dict(state["optimizer"])
    L.optim.scheduler.load_state_dict(state["scheduler"])
    if L.optim.scaler is not None and state.get("scaler"):
        L.optim.scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) == world:
        set_rng_state(state["rng"][rank])
    p = RunState(state["epoch"], state["step"], state["records"], state["wall_time"], state["best"])
    mid = state.get("in_epoch")
    if mid is not None:
        dev = L.precision.device
        p.in_epoch = EpochPartial(mid["step_in_epoch"], {k: v.to(dev) for k, v in mid["sums"].items()}, mid["n"],
                                  mid["temp_samples"])
        p.in_epoch_seconds, p.meta = mid["seconds"], mid.get("meta")
    if rank == 0:
        atomic.write_jsonl(run.metrics, p.records)
    where = f", step {p.in_epoch.step_in_epoch}/{L.steps_per_epoch} of epoch {p.epoch + 1}" if p.in_epoch else ""
    say(f"{run.path}: resuming after epoch {p.epoch}/{L.total_steps // max(1, L.steps_per_epoch)}{where}")
    return p


def _one_epoch(cfg: RunConfig, b: Built, p: RunState, rank: int, world: int, timer: Timer, after_step=None) -> dict:
    """Train and evaluate epoch ``p.epoch`` (from where a mid-epoch checkpoint left it); updates ``p`` and returns
    the epoch's metrics record."""
    L, epoch, part = b.loop, p.epoch, p.in_epoch
    t0 = timer.now() - p.in_epoch_seconds
    if part is None:  # a fresh epoch; a resumed one has its RNG states from the checkpoint
        seed_everything(cfg.seed, epoch + 1, rank)
    if L.meta_batches is not None:
        L.meta_batches.set_epoch(epoch, (p.meta or {}).get("drawn", 0) if part else 0)
    first = part.step_in_epoch if part else 0
    terms, p.step = train_one_epoch(L, b.feed.epoch(epoch, first), epoch + 1, p.step, part,
                                    lambda part_, step: after_step(part_, step, t0))
    p.in_epoch, p.in_epoch_seconds, p.meta = None, 0.0, None
    due = (epoch + 1) % max(1, cfg.eval_every) == 0 or epoch + 1 == cfg.epochs
    ev = evaluate(L.models.student, b.val_batches(), L.precision.device, L.precision.autocast) if due else {}
    secs = timer.now() - t0
    p.wall += secs
    rec = {"epoch": epoch + 1, "step": p.step, "lr": L.optim.optimizer.param_groups[0]["lr"],
           "train_loss": terms.pop("loss"), **terms, **ev,
           **{k: v for k, v in L.method.temperatures().items() if not k.endswith("per_class")}, "seconds": round(secs, 3)}
    if L.temp_samples:
        rec["temps"] = L.temp_samples
    p.records.append(rec)
    if ev and ev["top1"] > p.best["top1"]:
        p.best = {**ev, "epoch": epoch + 1}
    p.epoch = epoch + 1
    return rec


def _checkpoint(cfg: RunConfig, run: RunDir, b: Built, p: RunState, rank: int, world: int) -> None:
    """Everything resuming needs, every process's RNG included, and where in an epoch it stopped; then the metrics
    so far."""
    rngs = [rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
    if rank:
        return
    L = b.loop
    atomic.torch_save(run.checkpoint, keep_previous=run.previous_checkpoint, obj={
        "model": L.models.student.state_dict(), "method": L.method.state_dict(),
        "optimizer": L.optim.optimizer.state_dict(), "scheduler": L.optim.scheduler.state_dict(),
        "scaler": L.optim.scaler.state_dict() if L.optim.scaler else None, "rng": rngs, "epoch": p.epoch,
        "step": p.step, "records": p.records, "wall_time": p.wall, "best": p.best, "run_id": cfg.run_id,
        "in_epoch": None if p.in_epoch is None else {
            "step_in_epoch": p.in_epoch.step_in_epoch, "sums": {k: v.detach().cpu() for k, v in p.in_epoch.sums.items()},
            "n": p.in_epoch.n, "temp_samples": p.in_epoch.temp_samples, "seconds": p.in_epoch_seconds,
            "meta": L.meta_batches.state() if L.meta_batches is not None else None}})
    atomic.write_jsonl(run.metrics, p.records)


def _finish(cfg: RunConfig, run: RunDir, b: Built, p: RunState, rank: int, world: int, t_start: float) -> dict:
    """result.json (last: its presence means done) and model.pt; the checkpoint goes."""
    L = b.loop
    student, teacher = L.models.student, L.models.teacher
    final = p.records[-1] if p.records else evaluate(student, b.val_batches(), L.precision.device, L.precision.autocast)
    best = p.best if p.records else {"top1": final["top1"], "top5": final["top5"], "epoch": 0}
    temps = L.method.temperatures()
    result = {
        "status": "done", "run_id": cfg.run_id, "method": cfg.method, "student": cfg.student, "teacher": cfg.teacher,
        "dataset": cfg.dataset, "augment": cfg.augment, "fraction": cfg.fraction, "seed": cfg.seed,
        "epochs": cfg.epochs, "final_top1": final["top1"], "final_top5": final["top5"],
        "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
        "tau_t": temps.get("tau_t"), "tau_s": temps.get("tau_s"), "teacher_top1": b.teacher_top1,
        "student_params": num_params(student), "teacher_params": num_params(teacher) if teacher is not None else None,
        "train_images": int(len(b.split["train"])), "meta_images": int(len(b.split["meta"])),
        "wall_time_s": round(p.wall, 2), "total_time_s": round(time.time() - t_start, 2),
        "stream_cache": dict(b.feed.hits),  # epochs read from / written to the stream caches in this process
        "environment": environment(L.precision.device, world), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for k in ("tau_t_per_class", "tau_s_per_class"):
        if k in temps:
            result[k] = temps[k]
    if rank == 0:
        atomic.torch_save(run.model, {"model": student.state_dict(), "run_id": cfg.run_id})
        atomic.write_json(run.result, result)  # last: its presence means the run is done
        run.checkpoint.unlink(missing_ok=True)
        run.previous_checkpoint.unlink(missing_ok=True)
    return result


def _say_epoch(cfg: RunConfig, L: Loop, p: RunState, rec: dict, say) -> None:
    tt = L.method.temperatures()
    temp = f" tau_t {tt['tau_t']:.3f} tau_s {tt['tau_s']:.3f}" if tt else ""
    acc = f" top1 {rec['top1']:.2f} top5 {rec['top5']:.2f}" if "top1" in rec else ""
    say(f"epoch {p.epoch}/{cfg.epochs} loss {rec['train_loss']:.4f}{acc}{temp} {rec['seconds']:.1f}s")


def _run(cfg: RunConfig, run: RunDir, rank: int, world: int, device: torch.device, say) -> dict:
    """Build, resume, train epoch after epoch (each followed by a checkpoint), finish."""
    t_start = time.time()
    b = _build(cfg, run, rank, world, device, say)
    p = _resume(cfg, run, b, rank, world, say)
    L = b.loop
    say(f"run {cfg.run_id}: {cfg.method} student {cfg.student} ({num_params(L.models.student) / 1e6:.2f}M) on "
        f"{cfg.dataset} [{len(b.split['train'])} train / {len(b.split['meta'])} meta / {b.val_len} val], augment "
        f"{cfg.augment}, {cfg.epochs} epochs x {L.steps_per_epoch} steps, {device.type}, world {world}, "
        f"amp {L.precision.amp}")
    timer = Timer(device)
    guard = PreemptGuard()

    def after_step(part: EpochPartial, step: int, t0: float) -> None:
        """A mid-epoch checkpoint every ``checkpoint_every_steps`` steps and when a signal asked to stop."""
        p.step = step
        stop = guard.requested is not None
        if world > 1 and (step % L.log_every == 0 or part.step_in_epoch == L.steps_per_epoch):
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag)  # every rank stops at the same step
            stop = bool(flag.item())
        elif world > 1:
            stop = False
        every = cfg.checkpoint_every_steps
        last = part.step_in_epoch == L.steps_per_epoch  # the epoch's own checkpoint follows unless we stop now
        if stop or (every and part.step_in_epoch % every == 0 and not last):
            p.in_epoch, p.in_epoch_seconds = part, timer.now() - t0
            _checkpoint(cfg, run, b, p, rank, world)
            p.in_epoch = None
        if stop:
            guard.requested = guard.requested or signal.SIGTERM  # another rank's signal
            guard.stop(f"at step {part.step_in_epoch}/{L.steps_per_epoch} of epoch {p.epoch + 1}")

    last_save = time.time()
    with guard:
        while p.epoch < cfg.epochs:
            rec = _one_epoch(cfg, b, p, rank, world, timer, after_step)
            if _due(time.time() - last_save, cfg.checkpoint_minutes, world, device) or p.epoch == cfg.epochs:
                _checkpoint(cfg, run, b, p, rank, world)
                last_save = time.time()
            elif rank == 0:
                atomic.write_jsonl(run.metrics, p.records)
            _say_epoch(cfg, L, p, rec, say)
    result = _finish(cfg, run, b, p, rank, world, t_start)
    h, parts = b.feed.hits, []
    if b.feed.teacher is not None:
        parts.append(f"teacher logits {h['teacher_read']} epochs read, {h['teacher_written']} written")
    if b.feed.inputs is not None:
        parts.append(f"input batches {h['inputs_read']} epochs read, {h['inputs_written']} written")
    if parts:
        say("stream cache: " + "; ".join(parts))
    say(f"done: top1 {result['final_top1']:.2f} (best {result['best_top1']:.2f}) in {p.wall:.1f}s -> {run.path}")
    if world > 1:
        dist.barrier()
    return result


def _due(seconds: float, minutes: float, world: int, device: torch.device) -> bool:
    """Whether an epoch's end checkpoint is due (``checkpoint_minutes``); rank 0's clock decides for all ranks."""
    due = torch.tensor([float(seconds >= 60 * minutes)], device=device)
    if world > 1:
        dist.broadcast(due, 0)
    return bool(due.item())


# ---------------------------------------------------------------------------- CLI
@cli
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mkd.train", description="Train one run (any method) into --out.")
    ap.add_argument("--config", help="YAML run config (see --help-config)")
    ap.add_argument("--out", help="run directory (default results/train/<run_id>)")
    ap.add_argument("--help-config", action="store_true", help="list every config key with its default")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and run id, then exit")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys (mkd.hypergrad=jvp)")
    args = ap.parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    out = Path(args.out or Path("results") / "train" / cfg.run_id)
    try:
        train(cfg, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
