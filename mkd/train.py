"""The one training loop: ``python -m mkd.train --config FILE.yaml --out DIR [key=value ...]``.

Every method runs through it (AdamW + warmup/cosine, autocast, the teacher in eval/no-grad on the same
mixed batch, top-1/top-5 each epoch).  A run directory holds::

    config.yaml    resolved config          split.npz      training / meta indices (reused on rerun)
    metrics.jsonl  one line per epoch       checkpoint.pt  latest resumable state (removed when done)
    result.json    written last             model.pt       final student weights ({'model': state_dict})

Every file is written atomically.  Rerunning on a finished directory does nothing; on an unfinished one it
resumes from the last epoch checkpoint and, because data order and augmentation RNG are re-seeded from
(seed, epoch, rank) at every epoch, ends with the same weights and metrics as an uninterrupted run.
Started with several processes (torchrun, or submitit tasks via ``TorchDistributedEnvironment``) it trains
with DDP: gloo on CPU, NCCL on GPUs.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import platform
import random
import re
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import timm
import torch
import torch.distributed as dist
import yaml
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from . import __version__, atomic
from .augment import build_augment
from .config import RunConfig, describe, load_config
from .data import MetaBatches, Transformed, load_base, load_or_make_split, materialize, train_loader
from .engine import Loop, NonFiniteLoss, Timer, evaluate, tensor_batches, train_one_epoch
from .errors import UserError, cli
from .losses import build_method
from .models import build_teacher, create_model, is_vit, load_weights, num_params, teacher_eval_cache

CHECKPOINT, RESULT, METRICS, CONFIG, MODEL, SPLIT = ("checkpoint.pt", "result.json", "metrics.jsonl", "config.yaml",
                                                     "model.pt", "split.npz")


# ---------------------------------------------------------------------------- process setup
def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun / submitit environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "mkd": __version__, "git_commit": commit, "device": name, "world_size": world,
            "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


class RunLocked(UserError):
    """Another process holds the run's lock."""


class RunLock:
    """An exclusive lock on a run directory: two processes never train the same run."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.f = None

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise RunLocked(f"{self.path.parent} is being trained by another process (lock held): "
                            "wait for it, or check with benchmarks/run.py --status") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"{socket.gethostname()} {os.getpid()}\n")
        self.f.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def is_locked(out: Path) -> bool:
    """True while some process trains ``out``."""
    p = Path(out) / ".lock"
    if not p.exists():
        return False
    with open(p, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


# ---------------------------------------------------------------------------- the run
def prepare_dir(cfg: RunConfig, out: Path) -> Optional[dict]:
    """Create/check the run directory; returns the finished result when there is nothing to do."""
    out.mkdir(parents=True, exist_ok=True)
    res = atomic.read_json(out / RESULT)
    old = out / CONFIG
    if old.exists():
        text = old.read_text()
        m = re.match(r"# run_id: (\w+)", text)
        try:
            prev_id = m.group(1) if m else load_config(overrides=yaml.safe_load(text) or {}).run_id
        except UserError:  # written by another version with other keys
            prev_id = "unknown"
        if prev_id != cfg.run_id:
            raise UserError(f"{out} holds another run ({prev_id}, this config is {cfg.run_id}): use a new --out")
    if res and res.get("status") == "done":
        return res
    if res:  # failed before: keep the record, retry from the last checkpoint
        os.replace(out / RESULT, out / f"result.failed.{int(time.time())}.json")
    atomic.write_text(old, cfg.to_yaml())
    return None


def _teacher_top1(cfg: RunConfig, teacher, val_batches, device, autocast, info) -> float:
    key = {"dataset": cfg.dataset, "img_size": info.img_size, "root": cfg.data_root,
           "embedded": cfg.to_dict()["embedded"] if cfg.dataset == "embedded" else None}
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
    out = Path(out)
    rank, world, device = init_distributed()
    say = (lambda *a: None) if (quiet or rank) else (lambda *a: print(*a, flush=True))
    if cfg.batch_size % world:
        raise UserError(f"batch_size={cfg.batch_size} does not split over {world} processes: use a multiple of {world}")
    done = prepare_dir(cfg, out) if rank == 0 else None
    if world > 1:
        box = [done]
        dist.broadcast_object_list(box)
        done = box[0]
    if done is not None:
        say(f"{out}: already finished (top1 {done.get('final_top1')}); nothing to do")
        return done
    lock = RunLock(out) if rank == 0 else nullcontext()
    with lock:  # a RunLocked error leaves the other process's run alone
        try:
            return _run(cfg, out, rank, world, device, say)
        except NonFiniteLoss as e:
            if rank == 0:
                _write_failure(out, cfg, str(e))
            raise UserError(f"{out}: {e}") from None
        except UserError as e:  # bad input found while setting up: the run is failed, the message says why
            if rank == 0:
                _write_failure(out, cfg, str(e))
            raise
        except Exception as e:  # a bug: record it, keep the traceback
            if rank == 0:
                _write_failure(out, cfg, f"{type(e).__name__}: {e}")
            raise


def _write_failure(out: Path, cfg: RunConfig, reason: str) -> None:
    atomic.write_json(out / RESULT, {"status": "failed", "reason": reason, "run_id": cfg.run_id, "method": cfg.method,
                                     "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _run(cfg: RunConfig, out: Path, rank: int, world: int, device: torch.device, say) -> dict:
    t_start = time.time()
    amp = {"auto": "bf16" if device.type == "cuda" else "off"}.get(cfg.amp, cfg.amp)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = partial(torch.autocast, device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    compile_on = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")

    # data
    train_base, val_base, info = load_base(cfg)
    if rank == 0:
        split = load_or_make_split(out / SPLIT, train_base.targets, cfg)
    if world > 1:
        dist.barrier()
    if rank:
        split = load_or_make_split(out / SPLIT, train_base.targets, cfg)
    aug = build_augment(cfg.augment, info.img_size, info.mean, info.std, info.num_classes, info.crop_pct,
                        info.crop_scale)
    train_ds = Transformed(train_base, split["train"], aug.train_transform)
    val_ds = Transformed(val_base, None, aug.eval_transform)
    val_t = materialize(val_ds, num_workers=cfg.num_workers)
    local_eval_bs = max(1, cfg.eval_batch_size // world)

    def val_batches():
        if val_t is not None:
            return tensor_batches(val_t, local_eval_bs, rank, world)
        idx = list(range(rank, len(val_ds), world))
        return torch.utils.data.DataLoader(torch.utils.data.Subset(val_ds, idx), batch_size=local_eval_bs,
                                           num_workers=cfg.num_workers, pin_memory=device.type == "cuda")

    # models and method
    seed_everything(cfg.seed, 0)
    student = create_model(cfg.student, info.num_classes, info.img_size, pretrained=cfg.pretrained,
                           drop_path=cfg.drop_path, **cfg.student_kwargs)
    if cfg.init_checkpoint:
        load_weights(student, cfg.init_checkpoint, "student")
    student.to(device)
    method = build_method(cfg, info.num_classes).to(device)
    teacher = teacher_fwd = None
    teacher_top1 = None
    if method.needs_teacher:
        teacher = build_teacher(cfg.teacher, info.num_classes, info.img_size, cfg.teacher_checkpoint,
                                cfg.teacher_pretrained, **cfg.teacher_kwargs).to(device)
        teacher_top1 = _teacher_top1(cfg, teacher, val_batches, device, autocast, info)
        if not is_vit(teacher) and device.type == "cuda":
            teacher.to(memory_format=torch.channels_last)
            fwd = torch.compile(teacher) if compile_on else teacher
            teacher_fwd = lambda x: fwd(x.contiguous(memory_format=torch.channels_last))  # noqa: E731
        else:
            teacher_fwd = torch.compile(teacher) if compile_on else teacher
        say(f"teacher {cfg.teacher}: {num_params(teacher) / 1e6:.2f}M params, val top1 {teacher_top1:.2f}")
    meta_batches = None
    if cfg.method == "mkd":
        meta_ds = Transformed(train_base, split["meta"], aug.eval_transform)
        meta_batches = MetaBatches(meta_ds, materialize(meta_ds, num_workers=cfg.num_workers),
                                   method.learner.meta_batch_size, cfg.seed, rank, world, device, cfg.num_workers)

    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_on:
        if method.replays_forward:  # compiled random ops draw from the eager RNG, so the meta step can replay them
            torch._inductor.config.fallback_random = True
        model = torch.compile(model)

    steps_per_epoch = len(split["train"]) // cfg.batch_size
    total = max(1, cfg.epochs * steps_per_epoch)
    groups = param_groups_weight_decay(student, cfg.weight_decay, getattr(student, "no_weight_decay", lambda: ())())
    if method.train_parameters():
        groups.append({"params": method.train_parameters(), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)  # one kernel per group, on GPU and CPU alike
    sched = CosineLRScheduler(opt, t_initial=total, lr_min=cfg.min_lr, warmup_t=int(cfg.warmup_epochs * steps_per_epoch),
                              warmup_lr_init=cfg.lr * 1e-3, t_in_epochs=False)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    loop = Loop(model, student, teacher, teacher_fwd, method, opt, sched, aug, device, autocast, scaler, cfg.clip_grad,
                steps_per_epoch, total, cfg.log_every, meta_batches, rank)

    # resume
    start_epoch, step, records, wall, best = 0, 0, [], 0.0, {"top1": -1.0}
    ck = out / CHECKPOINT
    if ck.exists():
        state = torch.load(ck, map_location="cpu", weights_only=False)
        student.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        start_epoch, step, records, wall, best = (state["epoch"], state["step"], state["records"], state["wall_time"],
                                                  state["best"])
        if rank == 0:
            atomic.write_jsonl(out / METRICS, records)
        say(f"{out}: resuming after epoch {start_epoch}/{cfg.epochs}")
    elif rank == 0:
        atomic.write_jsonl(out / METRICS, [])

    say(f"run {cfg.run_id}: {cfg.method} student {cfg.student} ({num_params(student) / 1e6:.2f}M) on {cfg.dataset} "
        f"[{len(split['train'])} train / {len(split['meta'])} meta / {len(val_ds)} val], augment {cfg.augment}, "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps, {device.type}, world {world}, amp {amp}")
    timer = Timer(device)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = timer.now()
        seed_everything(cfg.seed, epoch + 1, rank)
        if meta_batches is not None:
            meta_batches.set_epoch(epoch)
        loader = train_loader(train_ds, cfg.batch_size, cfg.seed, epoch, rank, world, cfg.num_workers,
                              device.type == "cuda")
        loop.temp_samples = []
        terms, step = train_one_epoch(loop, loader, epoch + 1, step)
        ev = evaluate(student, val_batches(), device, autocast)
        secs = timer.now() - t0
        wall += secs
        rec = {"epoch": epoch + 1, "step": step, "lr": opt.param_groups[0]["lr"], "train_loss": terms.pop("loss"),
               **terms, **ev, **{k: v for k, v in method.temperatures().items() if not k.endswith("per_class")},
               "seconds": round(secs, 3)}
        if loop.temp_samples:
            rec["temps"] = loop.temp_samples
        records.append(rec)
        if ev["top1"] > best["top1"]:
            best = {**ev, "epoch": epoch + 1}
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if rank == 0:
            atomic.torch_save(ck, {"model": student.state_dict(), "method": method.state_dict(),
                                   "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "scaler": scaler.state_dict() if scaler else None, "rng": rngs,
                                   "epoch": epoch + 1, "step": step, "records": records, "wall_time": wall,
                                   "best": best, "run_id": cfg.run_id})
            atomic.write_jsonl(out / METRICS, records)
        tt = method.temperatures()
        temp = f" tau_t {tt['tau_t']:.3f} tau_s {tt['tau_s']:.3f}" if tt else ""
        say(f"epoch {epoch + 1}/{cfg.epochs} loss {rec['train_loss']:.4f} top1 {ev['top1']:.2f} top5 {ev['top5']:.2f}"
            f"{temp} {secs:.1f}s")

    final = records[-1] if records else evaluate(student, val_batches(), device, autocast)
    if not records:
        best = {"top1": final["top1"], "top5": final["top5"], "epoch": 0}
    temps = method.temperatures()
    result = {
        "status": "done", "run_id": cfg.run_id, "method": cfg.method, "student": cfg.student, "teacher": cfg.teacher,
        "dataset": cfg.dataset, "augment": cfg.augment, "fraction": cfg.fraction, "seed": cfg.seed,
        "epochs": cfg.epochs, "final_top1": final["top1"], "final_top5": final["top5"],
        "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
        "tau_t": temps.get("tau_t"), "tau_s": temps.get("tau_s"), "teacher_top1": teacher_top1,
        "student_params": num_params(student), "teacher_params": num_params(teacher) if teacher is not None else None,
        "train_images": int(len(split["train"])), "meta_images": int(len(split["meta"])),
        "wall_time_s": round(wall, 2), "total_time_s": round(time.time() - t_start, 2),
        "environment": environment(device, world), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for k in ("tau_t_per_class", "tau_s_per_class"):
        if k in temps:
            result[k] = temps[k]
    if rank == 0:
        atomic.torch_save(out / MODEL, {"model": student.state_dict(), "run_id": cfg.run_id})
        atomic.write_json(out / RESULT, result)  # last: its presence means the run is done
        ck.unlink(missing_ok=True)
    say(f"done: top1 {result['final_top1']:.2f} (best {result['best_top1']:.2f}) in {wall:.1f}s -> {out}")
    if world > 1:
        dist.barrier()
    return result


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
