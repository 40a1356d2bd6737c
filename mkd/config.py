"""Typed configuration of one run: YAML in, ``key=value`` overrides, validated, hashed to a run id.

``RunConfig`` is ``mkd.fields.GeneralConfig`` (the keys every run has) plus one nested section per option section
the registered methods declare (``kd.tau_t``, ``mkd.hypergrad`` ...): it is assembled here, above the methods, so
the method registry never imports the config that imports it.  Canonical top-level keys (suites and tests use
them): method, student, teacher, dataset, augment, fraction, epochs, batch_size, lr, seed.  Every field carries
its documentation; ``python -m mkd.train --help-config`` prints them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import yaml

from . import methods
from .errors import UserError, suggest
from .fields import (AUGMENTS, DATASETS, EmbeddedConfig, GeneralConfig, build, default_of, field_types,  # noqa: F401
                     is_dataclass_type, merge, parse_overrides)
from .options import option
from .stream import STREAM_VERSION

METHODS = methods.names()  # built-ins, then those of MKD_METHODS


class _RunConfigBase(GeneralConfig):
    """What a run's config answers about itself (its method's declarations, its stream, its run id)."""

    @property
    def uses_teacher(self) -> bool:
        return methods.get(self.method).needs_teacher

    @property
    def held_out(self) -> float:
        """The share of each class this run does not train on (the meta split, when it loses it)."""
        loses = self.holdout == "all" or methods.get(self.method).needs_meta_split
        return self.meta_split if loses else 0.0

    @property
    def caches_teacher(self) -> bool:
        return self.teacher_cache == "on" or (self.teacher_cache == "auto" and self.dataset != "imagenet")

    @property
    def caches_inputs(self) -> bool:
        return self.input_cache == "on" or (self.input_cache == "auto" and self.dataset == "embedded")

    @property
    def stream(self):
        """This run's data stream identity (``mkd.stream.StreamIdentity``): planning and cache keys derive from it."""
        from .stream import StreamIdentity

        return StreamIdentity.of(self)

    def stream_key(self) -> str:
        """What fixes this run's data stream (mkd/stream.py): runs with equal keys see bit-identical batches."""
        return self.stream.key()

    def teacher_stream_key(self) -> Optional[str]:
        """The stream plus the teacher: runs with equal keys can share the teacher-output cache."""
        if not (self.uses_teacher and self.caches_teacher):
            return None
        return json.dumps([self.stream_key(), *self.teacher_identity(), self.teacher_cache_topk], default=str)

    def teacher_identity(self) -> list:
        """What fixes the teacher's logits on a stream: the model, its weights, its input, precision, compilation."""
        return [self.teacher, self.teacher_kwargs, self.teacher_checkpoint, self.teacher_pretrained,
                self.teacher_input, self.amp, self.compile]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config, headed by its run id (so later versions can tell runs apart without parsing)."""
        return f"# run_id: {self.run_id}\n" + yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def run_id(self) -> str:
        """Stable 12-hex hash of what determines the result (locations and sections of other methods excluded)."""
        return hashlib.sha256(json.dumps(identity(self), sort_keys=True).encode()).hexdigest()[:12]


def _with_method_sections():
    """RunConfig = the general fields + one nested section per option section the registered methods declare
    (``kd``, ``hard``, ``ctkd``, ``mkd``, and those of added methods)."""
    secs = [(name, dc, option(dc(), (dc.__doc__ or name).strip().split("\n")[0])) for name, dc in methods.sections().items()]
    secs.insert(0, ("method", str, option("ce", "distillation method", METHODS)))  # its choices: the registry's
    cls = dataclasses.make_dataclass("RunConfig", secs, bases=(_RunConfigBase,))
    cls.__module__, cls.__doc__ = __name__, GeneralConfig.__doc__
    return cls


RunConfig = _with_method_sections()
TEACHER_KEYS = ("teacher", "teacher_kwargs", "teacher_pretrained", "teacher_input")
LATE_KEYS = ("optimizer", "momentum", "nesterov", "lr_schedule", "decay_epochs", "decay_rate", "decay_milestones",
             "decay_fractions", "lr_per", "lr_epoch_lag", "tune_holdout")


def identity(cfg: RunConfig) -> dict:
    """What the run id hashes: every hashed field that can change this method's result.

    Option sections count only for the methods that declare them (``Method.options``), so adding a method and
    its section changes no existing id.  Paths are locations, not identities: a teacher checkpoint counts by its
    last two path parts (``<teacher run id>/model.pt`` for suite-trained teachers), the data root not at all.
    """
    own = methods.get(cfg.method).options
    sections = methods.sections()
    d = {}
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("hashed", True):
            continue
        if f.name in sections and f.name not in own:
            continue
        if f.name in TEACHER_KEYS and not cfg.uses_teacher:
            continue
        if f.name == "embedded" and cfg.dataset != "embedded":
            continue
        v = getattr(cfg, f.name)
        if f.name in LATE_KEYS and v == default_of(f):
            continue
        d[f.name] = (v.identity() if hasattr(v, "identity") else dataclasses.asdict(v)) if dataclasses.is_dataclass(v) else v
    if not cfg.uses_teacher:
        d.pop("teacher_cache_topk", None)
    d["data_stream"] = STREAM_VERSION  # results of another stream definition are other runs
    if cfg.uses_teacher and cfg.teacher_checkpoint:
        d["teacher_checkpoint"] = "/".join(Path(cfg.teacher_checkpoint).parts[-2:])
    if cfg.init_checkpoint:
        d["init_checkpoint"] = "/".join(Path(cfg.init_checkpoint).parts[-2:])
    return d


def _check(cfg: RunConfig) -> None:
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise UserError(f"config key '{key}' {msg}")

    need(0 < cfg.fraction <= 1, "fraction", f"is {cfg.fraction}: it must lie in (0, 1], e.g. fraction=0.25")
    need(0 <= cfg.meta_split < 1, "meta_split", f"is {cfg.meta_split}: it must lie in [0, 1), e.g. 0.1")
    need(cfg.epochs >= 0, "epochs", f"is {cfg.epochs}: it must be >= 0")
    need(cfg.batch_size > 0, "batch_size", f"is {cfg.batch_size}: it must be > 0")
    need(cfg.lr > 0, "lr", f"is {cfg.lr}: it must be > 0")
    need(0 <= cfg.momentum < 1, "momentum", f"is {cfg.momentum}: it must lie in [0, 1)")
    need(cfg.decay_epochs > 0 and 0 < cfg.decay_rate <= 1, "decay_epochs", "needs decay_epochs > 0 and decay_rate in (0, 1]")
    _check_milestones(cfg, need)
    need(cfg.lr_epoch_lag >= 0, "lr_epoch_lag", f"is {cfg.lr_epoch_lag}: it must be >= 0")
    need(0 <= cfg.tune_holdout < 1, "tune_holdout", f"is {cfg.tune_holdout}: it must lie in [0, 1), e.g. 0.1")
    need(cfg.img_size >= 0, "img_size", "must be >= 0 (0: the dataset's size)")
    need(cfg.repeated_aug >= 1, "repeated_aug", f"is {cfg.repeated_aug}: it must be >= 1 (1: off, DeiT: 3)")
    need(cfg.eval_every >= 1, "eval_every", f"is {cfg.eval_every}: it must be >= 1")
    need(cfg.checkpoint_minutes >= 0, "checkpoint_minutes", f"is {cfg.checkpoint_minutes}: it must be >= 0")
    e = cfg.embedded
    need(2 <= e.num_classes, "embedded.num_classes", "must be >= 2")
    need(1 <= e.superclasses <= e.num_classes, "embedded.superclasses", "must lie in [1, num_classes]")
    need(8 <= e.img_size <= 64, "embedded.img_size", "must lie in [8, 64]")
    need(e.train_per_class >= 2 and e.val_per_class >= 1, "embedded.train_per_class", "must be >= 2")
    if cfg.uses_teacher:
        need(bool(cfg.teacher), "teacher", f"is required by method={cfg.method}: set teacher=NAME "
                                           "(and teacher_checkpoint=PATH)")
    methods.get(cfg.method).check(cfg, need)


def _check_milestones(cfg: RunConfig, need) -> None:
    """A multistep schedule has its milestones one way (epochs or fractions), increasing, inside the run."""
    ms, fs = cfg.decay_milestones, cfg.decay_fractions
    for key, vals in (("decay_milestones", ms), ("decay_fractions", fs)):
        need(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals), key,
             f"is {vals}: give a list of numbers, e.g. [150, 180, 210]")
        need(list(vals) == sorted(vals) and len(set(vals)) == len(vals), key, f"is {vals}: milestones must increase")
    if cfg.lr_schedule == "multistep":
        need(bool(ms) != bool(fs), "decay_milestones", "lr_schedule=multistep needs either decay_milestones (epochs) "
                                                        "or decay_fractions (of training), not both")
        need(all(0 < f < 1 for f in fs), "decay_fractions", f"is {fs}: fractions of training lie in (0, 1)")
        need(all(m > 0 for m in ms), "decay_milestones", f"is {ms}: milestones are epochs > 0")
    else:
        need(not ms and not fs, "decay_milestones", f"is set but lr_schedule={cfg.lr_schedule}: set lr_schedule=multistep")


def from_dict(data: dict | None) -> RunConfig:
    cfg = build(RunConfig, data or {})
    _check(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """YAML file (optional) + overrides -> validated RunConfig."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} not found: pass an existing YAML file to --config")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if overrides:
        data = merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return from_dict(data)


def describe() -> str:
    """Reference of every key with its default and doc (for --help-config and the README)."""
    lines = []

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = field_types(cls)[f.name]
            if is_dataclass_type(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            ch = f.metadata.get("choices")
            extra = f" [{'|'.join(ch)}]" if ch else ""
            lines.append(f"{prefix}{f.name} = {default!r}{extra}: {f.metadata.get('doc', '')}")

    walk(RunConfig)
    return "\n".join(lines)
