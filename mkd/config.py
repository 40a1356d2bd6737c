"""Typed configuration of one run: YAML in, ``key=value`` overrides, validated, hashed to a run id.

Canonical top-level keys (suites and tests use them): method, student, teacher, dataset, augment,
fraction, epochs, batch_size, lr, seed.  Method options live in nested sections (``kd.tau_t``,
``mkd.hypergrad``...).  Every field below carries its documentation; ``python -m mkd.train --help-config``
prints them.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError, suggest

METHODS = ("ce", "kd", "hard", "ctkd", "mkd")
DATASETS = ("embedded", "cifar100", "imagenet")
AUGMENTS = ("none", "weak", "medium", "strong")


def _f(default: Any, doc: str, choices: tuple | None = None, hashed: bool = True, **kw):
    meta = {"doc": doc, "choices": choices, "hashed": hashed}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        factory = type(default) if dataclasses.is_dataclass(default) else (lambda d=default: copy.deepcopy(d))
        return field(default_factory=factory, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class EmbeddedConfig:
    """The offline synthetic dataset (see mkd/data.py for its definition)."""

    num_classes: int = _f(20, "classes (grouped into superclasses)")
    superclasses: int = _f(5, "superclasses: classes in one share shape and colour family")
    img_size: int = _f(16, "image side in pixels (16-32)")
    train_per_class: int = _f(300, "generated training images per class (the meta split comes out of these)")
    val_per_class: int = _f(50, "generated validation images per class")
    seed: int = _f(0, "generator seed: equal seeds give identical data")


@dataclass
class KDConfig:
    """The distillation term shared by kd, ctkd and mkd:
    L = (1-alpha)*CE(z_s, y) + alpha * w(tau) * KL(softmax(z_t/tau_t) || softmax(z_s/tau_s)), batchmean."""

    tau: Optional[float] = _f(None, "shorthand: one temperature for teacher and student (overrides tau_t, tau_s)")
    tau_t: float = _f(4.0, "teacher temperature (kd: fixed; ctkd/mkd: initial value)")
    tau_s: float = _f(4.0, "student temperature (kd: fixed; mkd: initial value)")
    alpha: float = _f(0.5, "weight of the distillation term; CE on labels gets 1-alpha")
    weight: str = _f("tau_prod", "w(tau): tau_prod = tau_t*tau_s (Hinton's tau^2), none = 1", ("tau_prod", "none"))


@dataclass
class HardConfig:
    alpha: float = _f(0.5, "weight of CE on the teacher's argmax (DeiT hard distillation: 0.5)")


@dataclass
class CTKDConfig:
    """Curriculum temperature (CTKD, AAAI 2023): one learnable temperature behind a gradient reversal.

    Defaults are the official code's (github zhengli97/CTKD, models/temp_global.py, train_student.py,
    scripts/run_cifar_distill.sh): tau = 1 + 20*sigmoid(p), p starting at 1 (tau 15.62); reversal strength
    (1 - cos(pi*e/L))/2 on the 1-based epoch e, constant within an epoch, over L = 10 of 240 epochs (CIFAR;
    ImageNet: 5 of 120, the same 1/24); p trained by SGD (lr 0.05, momentum 0.9, weight decay 5e-4) following
    the student's learning-rate schedule.  The earlier variant: init=kd schedule=step ramp=0.2 optimizer=student."""

    tau_min: float = _f(1.0, "lower end of the temperature range (tau = min + (max-min)*sigmoid(p); official t_start 1)")
    tau_max: float = _f(21.0, "upper end of the temperature range (official t_start + t_end = 1 + 20)")
    init: str = _f("official", "official: p = 1 (tau = 15.62, the official Global_T's ones(1)); kd: start at kd.tau_t",
                   ("official", "kd"))
    lambda_max: float = _f(1.0, "final strength of the gradient reversal (official decay_min -1)")
    ramp: float = _f(1 / 24, "fraction of training over which lambda rises (cosine) from 0 to lambda_max "
                             "(official: 10 of 240 epochs on CIFAR, 5 of 120 on ImageNet)")
    schedule: str = _f("epoch", "epoch: lambda from the 1-based epoch index, constant within an epoch (official); "
                                "step: a smooth per-step cosine", ("epoch", "step"))
    optimizer: str = _f("sgd", "sgd: the temperature's own SGD (lr, momentum, weight_decay below), scaled by the "
                               "student's schedule, as the official code's shared SGD does; student: a parameter "
                               "of the student's AdamW (whose normalisation leaves only lambda's sign)",
                        ("sgd", "student"))
    lr: float = _f(0.05, "SGD learning rate of p at the schedule's peak (official CIFAR 0.05, ImageNet 0.1)")
    momentum: float = _f(0.9, "SGD momentum of p (official 0.9)")
    weight_decay: float = _f(5e-4, "SGD weight decay of p (official CIFAR 5e-4, ImageNet 1e-4)")


@dataclass
class MKDConfig:
    """Meta-learned teacher/student temperatures (MKD, arXiv 2202.07940), as mkd/meta.py implements them."""

    hypergrad: str = _f("fd", "hypergradient: exact (double backward), jvp (forward mode on the logits), fd (two forwards)",
                        ("exact", "jvp", "fd"))
    meta_interval: int = _f(8, "update the temperatures every N training steps")
    meta_lr: float = _f(0.01, "Adam learning rate of log(tau) for meta_interval=1")
    lr_scaling: str = _f("sqrt", "meta_lr x sqrt(meta_interval), x meta_interval (linear) or x 1 (none): "
                                 "keeps the trajectory's pace with fewer updates", ("sqrt", "linear", "none"))
    meta_batch_size: int = _f(0, "global meta batch size (0: half of batch_size)")
    objective: str = _f("ce", "meta objective on the held-out batch: ce, kd (KL to the teacher at T=1), ce+kd",
                        ("ce", "kd", "ce+kd"))
    granularity: str = _f("global", "global: two scalars; per_class: two vectors, indexed by the target class",
                          ("global", "per_class"))
    tau_min: float = _f(0.5, "lower clamp of both temperatures")
    tau_max: float = _f(20.0, "upper clamp of both temperatures")
    fd_eps: float = _f(0.01, "finite-difference step along v, divided by |v| (DARTS' choice)")
    lookahead: str = _f("sgd", "look-ahead step theta' = theta - lr*g (sgd) or with AdamW's current per-parameter "
                               "scaling, theta - lr*g/(sqrt(v_hat)+eps) (adam), as the student's optimizer steps",
                        ("sgd", "adam"))


@dataclass
class RunConfig:
    """One training run. Field docs double as the reference of ``key=value`` overrides."""

    method: str = _f("ce", "distillation method", METHODS)
    student: str = _f("emb_vit_s", "student: a preset of mkd/models.py or any timm model name")
    student_kwargs: dict = _f({}, "extra keyword arguments for timm.create_model (student)")
    teacher: Optional[str] = _f(None, "teacher: preset or timm name (needed by kd, hard, ctkd, mkd)")
    teacher_kwargs: dict = _f({}, "extra keyword arguments for timm.create_model (teacher)")
    teacher_checkpoint: Optional[str] = _f(None, "teacher weights: a DeiT/timm checkpoint ('model' key) or a raw state dict",
                                           hashed=False)
    teacher_pretrained: bool = _f(False, "load the teacher's timm pretrained weights (needs network)")
    init_checkpoint: Optional[str] = _f(None, "start the student from these weights (epochs=0: only evaluate them)",
                                        hashed=False)
    pretrained: bool = _f(False, "start the student from timm pretrained weights (needs network)")
    dataset: str = _f("embedded", "dataset", DATASETS)
    data_root: Optional[str] = _f(None, "root of cifar100 (cifar-100-python/) or imagenet (train/, val/)", hashed=False)
    download: bool = _f(False, "download CIFAR-100 into data_root when missing (needs network)", hashed=False)
    img_size: int = _f(0, "input side (0: the dataset's native size: embedded 16, cifar100 32, imagenet 224)")
    embedded: EmbeddedConfig = _f(EmbeddedConfig(), "embedded dataset definition")
    augment: str = _f("weak", "augmentation strength preset (mkd/augment.py)", AUGMENTS)
    fraction: float = _f(1.0, "class-balanced fraction of the training split the student sees, 0 < f <= 1")
    meta_split: float = _f(0.1, "class-balanced share of the training set held out for MKD's meta batches; "
                                "held out for every method so all see the same training images")
    split_seed: int = _f(0, "seed of the fraction and meta-split selection (kept fixed across run seeds)")
    epochs: int = _f(10, "training epochs (0: evaluate only)")
    batch_size: int = _f(128, "global batch size (split over DDP processes)")
    lr: float = _f(1e-3, "peak AdamW learning rate for the global batch")
    min_lr: float = _f(1e-5, "final learning rate of the cosine schedule")
    weight_decay: float = _f(0.05, "AdamW weight decay")
    warmup_epochs: float = _f(1.0, "linear warmup length in epochs")
    drop_path: float = _f(0.0, "stochastic depth rate of the student")
    clip_grad: Optional[float] = _f(None, "clip the gradient norm to this value")
    seed: int = _f(0, "run seed: initialisation, data order, augmentation")
    amp: str = _f("auto", "autocast: auto (bf16 on GPU, off on CPU), bf16, fp16, off", ("auto", "bf16", "fp16", "off"))
    compile: str = _f("auto", "torch.compile the student and teacher: auto (on GPU), on, off", ("auto", "on", "off"),
                      hashed=False)
    num_workers: int = _f(0, "DataLoader worker processes per GPU/process", hashed=False)
    eval_batch_size: int = _f(256, "evaluation batch size", hashed=False)
    log_every: int = _f(25, "steps between loss checks and temperature samples", hashed=False)
    kd: KDConfig = _f(KDConfig(), "distillation term (kd, ctkd, mkd)")
    hard: HardConfig = _f(HardConfig(), "hard distillation")
    ctkd: CTKDConfig = _f(CTKDConfig(), "CTKD options")
    mkd: MKDConfig = _f(MKDConfig(), "MKD options")

    # ------------------------------------------------------------------ helpers
    @property
    def uses_teacher(self) -> bool:
        return self.method != "ce"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config, headed by its run id (so later versions can tell runs apart without parsing)."""
        return f"# run_id: {self.run_id}\n" + yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def run_id(self) -> str:
        """Stable 12-hex hash of what determines the result (locations and sections of other methods excluded)."""
        return hashlib.sha256(json.dumps(identity(self), sort_keys=True).encode()).hexdigest()[:12]


SECTIONS_OF_METHOD = {"ce": (), "kd": ("kd",), "hard": ("hard",), "ctkd": ("kd", "ctkd"), "mkd": ("kd", "mkd")}
TEACHER_KEYS = ("teacher", "teacher_kwargs", "teacher_pretrained")


def identity(cfg: RunConfig) -> dict:
    """What the run id hashes: every hashed field that can change this method's result.

    Paths are locations, not identities: a teacher checkpoint counts by its last two path parts
    (``<teacher run id>/model.pt`` for suite-trained teachers), the data root not at all.
    """
    d = {}
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("hashed", True):
            continue
        if f.name in ("kd", "hard", "ctkd", "mkd") and f.name not in SECTIONS_OF_METHOD[cfg.method]:
            continue
        if f.name in TEACHER_KEYS and not cfg.uses_teacher:
            continue
        if f.name == "embedded" and cfg.dataset != "embedded":
            continue
        v = getattr(cfg, f.name)
        d[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    if cfg.uses_teacher and cfg.teacher_checkpoint:
        d["teacher_checkpoint"] = "/".join(Path(cfg.teacher_checkpoint).parts[-2:])
    if cfg.init_checkpoint:
        d["init_checkpoint"] = "/".join(Path(cfg.init_checkpoint).parts[-2:])
    if cfg.kd.tau is not None and "kd" in d:  # tau is shorthand: hash the resolved pair only
        d["kd"] = {**d["kd"], "tau": None}
    return d


# ---------------------------------------------------------------------- building and validation
def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value against a field type; error names the key and the expected type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    raise UserError(f"config key '{key}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise UserError(f"unknown config key '{key}'{suggest(k, names)}; allowed: {', '.join(names)}")
        tp = hints[k]
        if _is_dataclass_type(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, f"{key}.")
        else:
            kwargs[k] = _coerce(v, tp, key)
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        val = getattr(obj, f.name)
        if choices and val not in choices:
            raise UserError(f"config key '{prefix}{f.name}' is {val!r}{suggest(val, choices)}; "
                            f"allowed: {', '.join(choices)}")
    return obj


def _check(cfg: RunConfig) -> None:
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise UserError(f"config key '{key}' {msg}")

    need(0 < cfg.fraction <= 1, "fraction", f"is {cfg.fraction}: it must lie in (0, 1], e.g. fraction=0.25")
    need(0 <= cfg.meta_split < 1, "meta_split", f"is {cfg.meta_split}: it must lie in [0, 1), e.g. 0.1")
    need(cfg.epochs >= 0, "epochs", f"is {cfg.epochs}: it must be >= 0")
    need(cfg.batch_size > 0, "batch_size", f"is {cfg.batch_size}: it must be > 0")
    need(cfg.lr > 0, "lr", f"is {cfg.lr}: it must be > 0")
    need(cfg.img_size >= 0, "img_size", "must be >= 0 (0: the dataset's size)")
    need(0 <= cfg.kd.alpha <= 1, "kd.alpha", f"is {cfg.kd.alpha}: it must lie in [0, 1]")
    need(0 <= cfg.hard.alpha <= 1, "hard.alpha", f"is {cfg.hard.alpha}: it must lie in [0, 1]")
    for key, v in (("kd.tau", cfg.kd.tau), ("kd.tau_t", cfg.kd.tau_t), ("kd.tau_s", cfg.kd.tau_s)):
        need(v is None or v > 0, key, f"is {v}: temperatures must be > 0")
    for sec in ("mkd", "ctkd"):
        lo, hi = getattr(cfg, sec).tau_min, getattr(cfg, sec).tau_max
        need(lo > 0, f"{sec}.tau_min", f"is {lo}: temperature bounds must be > 0")
        need(hi > lo, f"{sec}.tau_max", f"is {hi}: it must exceed {sec}.tau_min={lo}")
    need(cfg.mkd.meta_interval >= 1, "mkd.meta_interval", "must be >= 1")
    need(cfg.mkd.meta_lr > 0, "mkd.meta_lr", "must be > 0")
    need(cfg.mkd.meta_batch_size >= 0, "mkd.meta_batch_size", "must be >= 0 (0: batch_size // 2)")
    need(cfg.mkd.fd_eps > 0, "mkd.fd_eps", "must be > 0")
    need(cfg.method != "mkd" or cfg.meta_split > 0, "meta_split", "must be > 0 for method=mkd (it needs held-out data)")
    e = cfg.embedded
    need(2 <= e.num_classes, "embedded.num_classes", "must be >= 2")
    need(1 <= e.superclasses <= e.num_classes, "embedded.superclasses", "must lie in [1, num_classes]")
    need(8 <= e.img_size <= 64, "embedded.img_size", "must lie in [8, 64]")
    need(e.train_per_class >= 2 and e.val_per_class >= 1, "embedded.train_per_class", "must be >= 2")
    if cfg.uses_teacher:
        need(bool(cfg.teacher), "teacher", f"is required by method={cfg.method}: set teacher=NAME "
                                           "(and teacher_checkpoint=PATH)")
    if cfg.kd.tau is not None:  # resolve the shorthand once
        cfg.kd.tau_t = cfg.kd.tau_s = cfg.kd.tau


def parse_overrides(items: list[str]) -> dict:
    """['a.b=1', 'method=kd'] -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value (e.g. method=kd or mkd.hypergrad=jvp)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def merge(base: dict, over: dict) -> dict:
    """Deep merge of plain dicts (over wins); dataclass sections stay mappings."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("student_kwargs", "teacher_kwargs"):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(data: dict | None) -> RunConfig:
    cfg = _build(RunConfig, data or {})
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
            tp = _field_types(cls)[f.name]
            if _is_dataclass_type(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            ch = f.metadata.get("choices")
            extra = f" [{'|'.join(ch)}]" if ch else ""
            lines.append(f"{prefix}{f.name} = {default!r}{extra}: {f.metadata.get('doc', '')}")

    walk(RunConfig)
    return "\n".join(lines)
