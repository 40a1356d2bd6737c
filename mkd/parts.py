"""Building a run's parts from its config: data (split, transforms, evaluation batches), student, teacher,
method, the loop around them and the feed of training batches and teacher logits (``Parts``).

Evaluation and meta sets are materialised once per process and key (a pool worker trains run after run on the
same validation set); every key derives from the run's ``StreamIdentity``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import atomic
from .augment import InputConfig, build_augment, model_input_config, renormalizer
from .config import RunConfig
from .data import MetaBatches, TrainSource, TrainStream, collated_as_is, load_base, load_or_make_split, materialize
from .engine import Loop, build_loop, evaluate, precision_for, tensor_batches
from .environment import Context, environment, kernels, packages, seed_everything
from .methods import build_method
from .results import Result
from .models import build_teacher, create_model, load_weights, num_params, teacher_eval_cache
from .rundir import RunDir
from .stream import StreamSource, normalizer_of, to_device
from .stream_cache import CACHE_VERSION, EpochFiles, Feed, weights_sha


@dataclass
class Parts:
    """A run's pieces once built: data, the loop and what the result reports about them."""

    loop: Loop
    feed: Feed
    split: dict
    val_len: int
    val_batches: Callable
    teacher: Optional[tuple] = None  # (module, renormaliser, top-1): what another run of the stream can share
    heldout_batches: Optional[Callable] = None  # a tuning trial's scoring split (``tune_holdout``)

    @property
    def teacher_top1(self) -> Optional[float]:
        return self.teacher[2] if self.teacher else None

    def heldout_top1(self) -> Optional[float]:
        """A tuning trial's top-1 on the images it held out of training (what tuning selects on), else None."""
        if self.heldout_batches is None:
            return None
        L = self.loop
        return evaluate(L.models.student, self.heldout_batches(), L.precision.device, L.precision.autocast)["top1"]

    def result(self, cfg: RunConfig, final: dict, best: dict, wall: float, total: float, world: int) -> Result:
        """The finished run's ``result.json``: its numbers, its parts' sizes and the environment it ran in."""
        L = self.loop
        temps, teacher = L.method.temperatures(), L.models.teacher
        return Result(
            "done", run_id=cfg.run_id, method=cfg.method, student=cfg.student, teacher=cfg.teacher,
            dataset=cfg.dataset, augment=cfg.augment, fraction=cfg.fraction, seed=cfg.seed, epochs=cfg.epochs,
            final_top1=final["top1"], final_top5=final["top5"], best_top1=best["top1"], best_top5=best["top5"],
            best_epoch=best["epoch"], heldout_top1=self.heldout_top1(), tau_t=temps.get("tau_t"), tau_s=temps.get("tau_s"),
            teacher_top1=self.teacher_top1, student_params=num_params(L.models.student),
            teacher_params=num_params(teacher) if teacher is not None else None,
            train_images=int(len(self.split["train"])), meta_images=int(len(self.split["meta"])),
            wall_time_s=round(wall, 2), total_time_s=round(total, 2), stream_cache=dict(self.feed.hits),
            environment=environment(L.precision.device, world), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            tau_t_per_class=temps.get("tau_t_per_class"), tau_s_per_class=temps.get("tau_s_per_class"))


@dataclass
class _Data:
    train_base: object
    val_base: object
    info: object
    split: dict
    dataset_input: InputConfig


_TENSORS: dict = {}  # materialised evaluation / meta sets of this process, reused by its next runs (pool workers)
_LOADERS: dict = {}  # evaluation loaders of this process (sets too large to hold), one per set for all its runs


def _materialized(key: tuple, make: Callable):
    """``make()`` once per process and key: a pool worker trains run after run on the same validation set."""
    if key not in _TENSORS:
        if len(_TENSORS) >= 4:
            _TENSORS.pop(next(iter(_TENSORS)))
        _TENSORS[key] = make()
    return _TENSORS[key]


def build(cfg: RunConfig, run: RunDir, ctx: Context, say, teacher_dir: Optional[Path] = None,
          shared_teacher: Optional[tuple] = None) -> Parts:
    """Data, student, teacher, method and the loop around them; ``teacher_dir`` holds the teacher's stream
    cache (the teacher's run directory; by default beside the teacher checkpoint, else beside the run);
    ``shared_teacher``: another run's ``Parts.teacher`` on the same stream (a cohort builds its teacher once)."""
    data = _data(cfg, run, ctx)
    info = data.info
    seed_everything(cfg.seed, 0)
    student = create_model(cfg.student, info.num_classes, info.img_size, pretrained=cfg.pretrained,
                           drop_path=cfg.drop_path, **cfg.student_kwargs)
    s_in = model_input_config(student, data.dataset_input) if cfg.student_input == "model" else data.dataset_input
    aug = build_augment(cfg.augment, info.img_size, s_in.mean, s_in.std, info.num_classes, s_in.crop_pct,
                        info.crop_scale, s_in.interpolation)
    data_key = json.dumps(cfg.stream.data(info.img_size), sort_keys=True, default=str)
    val_batches = eval_batches(cfg, data.val_base, aug.eval_transform, (data_key, s_in), ctx)
    held = None
    if cfg.tune_holdout > 0:  # a tuning trial is scored on training images it did not train on
        tune = data.split["tune"]
        sha = hashlib.sha256(np.asarray(tune).tobytes()).hexdigest()
        held = eval_batches(cfg, data.train_base, aug.eval_transform, (data_key, s_in, "heldout", sha), ctx, tune)
    if cfg.init_checkpoint:
        load_weights(student, cfg.init_checkpoint, "student")
    student.to(ctx.device)
    method = build_method(cfg, info.num_classes).to(ctx.device)
    teacher = teacher_top1 = renorm = None
    if method.needs_teacher:
        teacher, renorm, teacher_top1 = shared_teacher or _teacher(cfg, data, s_in, val_batches, data_key, ctx, say)
    meta_batches = _meta_batches(cfg, data, aug, s_in, data_key, method, ctx) if method.needs_meta_split else None
    steps_per_epoch = len(data.split["train"]) // cfg.batch_size
    loop = build_loop(cfg, student, teacher, method, aug, ctx.device, steps_per_epoch, meta_batches, ctx.rank,
                      ctx.world, renorm)
    where = teacher_dir or (Path(cfg.teacher_checkpoint).parent if cfg.teacher_checkpoint else run.path.parent)
    feed = _feed(cfg, run, loop, TrainSource(data.train_base, data.split["train"], aug.train_transform), data,
                 ctx, say, Path(where))
    return Parts(loop, feed, data.split, len(data.val_base), val_batches,
                 (teacher, renorm, teacher_top1) if teacher is not None else None, held)


def _data(cfg: RunConfig, run: RunDir, ctx: Context) -> _Data:
    """The dataset and this run's split (rank 0 writes ``split.npz``, the other ranks read it)."""
    train_base, val_base, info = load_base(cfg)
    if ctx.rank == 0:
        split = load_or_make_split(run.split, train_base.targets, cfg)
    if ctx.world > 1:
        dist.barrier()
    if ctx.rank:
        split = load_or_make_split(run.split, train_base.targets, cfg)
    return _Data(train_base, val_base, info, split, InputConfig(tuple(info.mean), tuple(info.std), info.crop_pct))


def _teacher(cfg: RunConfig, data: _Data, s_in: InputConfig, val_batches, data_key: str, ctx: Context, say):
    """The frozen teacher, the map from the student's normalisation to its own, and its validation top-1."""
    info = data.info
    teacher = build_teacher(cfg.teacher, info.num_classes, info.img_size, cfg.teacher_checkpoint,
                            cfg.teacher_pretrained, **cfg.teacher_kwargs).to(ctx.device)
    t_in = model_input_config(teacher, data.dataset_input) if cfg.teacher_input == "model" else data.dataset_input
    renorm = renormalizer(s_in, t_in)
    t_val = val_batches if t_in == s_in else eval_batches(cfg, data.val_base, t_in.eval_transform(info.img_size),
                                                          (data_key, t_in), ctx)
    top1 = teacher_top1(cfg, teacher, t_val, ctx, cfg.stream.data(info.img_size), t_in)
    say(f"teacher {cfg.teacher}: {num_params(teacher) / 1e6:.2f}M params, val top1 {top1:.2f}"
        + (f" (its own input: mean {t_in.mean}, std {t_in.std}, crop {t_in.crop_pct})" if renorm else ""))
    return teacher, renorm, top1


def _meta_batches(cfg: RunConfig, data: _Data, aug, s_in: InputConfig, data_key: str, method, ctx: Context):
    """The held-out split's batches for the meta step, materialised once per process."""
    meta_ds = StreamSource(data.train_base, data.split["meta"], aug.eval_transform)
    sha = hashlib.sha256(np.asarray(data.split["meta"]).tobytes()).hexdigest()
    meta_t = _materialized(("meta", data_key, s_in, sha), lambda: materialize(meta_ds, num_workers=cfg.num_workers))
    return MetaBatches(meta_ds, meta_t, method.meta_batch_size, cfg.seed, ctx.rank, ctx.world, ctx.device,
                       cfg.num_workers, normalizer_of(meta_ds))


def teacher_top1(cfg: RunConfig, teacher, val_batches, ctx: Context, data: dict, t_in: InputConfig) -> float:
    """The teacher's validation top-1, cached per checkpoint and evaluation data."""
    key = dict(data)
    if cfg.teacher_input != "dataset":
        key["input"] = dataclasses.asdict(t_in)
    path = teacher_eval_cache(cfg.teacher_checkpoint, cfg.teacher, key)
    hit = atomic.read_json(path)
    if hit is not None:
        return hit["top1"]
    top1 = evaluate(teacher, val_batches(), ctx.device, precision_for(cfg.amp, ctx.device).autocast)["top1"]
    if ctx.main:
        atomic.write_json(path, {"top1": top1, "teacher": cfg.teacher, "checkpoint": cfg.teacher_checkpoint, "data": key})
    return top1


def eval_batches(cfg: RunConfig, base, transform, key: tuple, ctx: Context, indices=None) -> Callable:
    """``() -> batches`` of this process's shard of the evaluation set (``indices`` of ``base``, default all of it),
    normalised on the device: from uint8 tensors held in memory when they fit (once per process and key), else
    from one loader whose workers persist across evaluations."""
    src = StreamSource(base, indices, transform)
    norm = normalizer_of(src)
    held = _materialized(("val", *key), lambda: materialize(src, num_workers=cfg.num_workers))
    bs = max(1, cfg.eval_batch_size)
    rank, world, device = ctx.rank, ctx.world, ctx.device
    loader = None
    if held is None:  # one loader (and its workers) per process and evaluation set, shared by a cohort's members
        lkey = (key, bs, rank, world, cfg.num_workers, device.type)
        if lkey not in _LOADERS:
            _LOADERS[lkey] = torch.utils.data.DataLoader(
                src, batch_size=bs, sampler=list(range(rank, len(src), world)), num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0, collate_fn=collated_as_is)
        loader = _LOADERS[lkey]

    def batches():
        it = tensor_batches(held, bs, rank, world) if held is not None else (b[:2] for b in loader)
        for x, y in it:
            yield to_device((x, y, ()), device, norm)
    return batches


def _feed(cfg: RunConfig, run: RunDir, loop: Loop, src: TrainSource, data: _Data, ctx: Context, say,
          teacher_dir: Path) -> Feed:
    """Where the epoch's batches and teacher logits come from: the stream's caches (``mkd/stream_cache.py``),
    keyed by the stream's identity and what decides its bytes, else computed (and then stored for the next run
    of the stream)."""
    device = loop.precision.device
    stream = cfg.stream.cache(num_examples=data.split["num_examples"], train_indices=data.split["train"],
                              img_size=data.info.img_size, world=ctx.world, device=device, kernels=kernels(device),
                              packages=packages(), cache_version=CACHE_VERSION)
    batches = TrainStream(src, cfg.batch_size, cfg.seed, ctx.rank, ctx.world, cfg.num_workers, device.type == "cuda",
                          cfg.repeated_aug) if cfg.epochs else None  # epochs=0: a validation, no training batches
    inputs = teacher = None
    if cfg.caches_inputs and (cfg.input_cache == "on" or run.info.exists()):  # auto: inside suites (run.json) only
        inputs = EpochFiles(run.path.parent / ".streams", {"kind": "inputs", **stream}, ctx.rank, say)
    M = loop.models
    if M.teacher is not None and cfg.caches_teacher:
        key = {"kind": "teacher_logits", **stream, "teacher": cfg.teacher, "teacher_kwargs": cfg.teacher_kwargs,
               "teacher_weights": weights_sha(M.teacher), "amp": loop.precision.amp, "compile": M.teacher_compiled,
               "topk": cfg.teacher_cache_topk}
        if cfg.teacher_input != "dataset":
            key["teacher_input"] = cfg.teacher_input
        teacher = EpochFiles(teacher_dir / "teacher_cache", key, ctx.rank, say)
    return Feed(batches and batches.epoch, loop.augment, cfg.seed, device, loop.precision.autocast, M.teacher_fwd,
                data.info.num_classes, cfg.teacher_cache_topk, inputs, teacher, batches and normalizer_of(batches.source))
