"""The typed fields of one run and how a value is read: the configuration layer, below the methods.

``GeneralConfig`` holds every key a run has whatever its method; ``mkd/config.py`` joins the option sections the
registered methods declare (``kd``, ``mkd``, ...) into ``RunConfig``, validates and hashes it.  This module imports
nothing of the suite but ``options`` and ``errors``, so methods, models and data can type against it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from .errors import UserError, suggest
from .options import option

DATASETS = ("embedded", "cifar100", "imagenet")
AUGMENTS = ("none", "weak", "medium", "strong")


_f = option


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
class GeneralConfig:
    """The general fields of one run (the methods' option sections join them in ``mkd.config.RunConfig``). Field
    docs double as the reference of ``key=value`` overrides."""

    method: str = _f("ce", "distillation method (its choices: the registered methods, mkd/config.py)")
    student: str = _f("emb_vit_s", "student: a preset of mkd/models.py or any timm model name")
    student_kwargs: dict = _f({}, "extra keyword arguments for timm.create_model (student)")
    teacher: Optional[str] = _f(None, "teacher: preset or timm name (needed by kd, hard, ctkd, mkd)")
    teacher_kwargs: dict = _f({}, "extra keyword arguments for timm.create_model (teacher)")
    teacher_checkpoint: Optional[str] = _f(None, "teacher weights: a DeiT/timm checkpoint ('model' key) or a raw state dict",
                                           hashed=False)
    teacher_pretrained: bool = _f(False, "load the teacher's timm pretrained weights (needs network)")
    teacher_input: str = _f("dataset", "the teacher's input normalisation and evaluation crop: dataset (a teacher "
                                       "trained on this stream) or model (timm's resolve_data_config of the teacher: "
                                       "its pretrained mean, std, crop; its input is renormalised on the device)",
                            ("dataset", "model"))
    student_input: str = _f("dataset", "the student's normalisation and evaluation crop: dataset, or model (timm's "
                                       "resolve_data_config: for pretrained weights validated by a suite)",
                            ("dataset", "model"))
    init_checkpoint: Optional[str] = _f(None, "start the student from these weights (epochs=0: only evaluate them)",
                                        hashed=False)
    pretrained: bool = _f(False, "start the student from timm pretrained weights (needs network)")
    dataset: str = _f("embedded", "dataset", DATASETS)
    data_root: Optional[str] = _f(None, "root of cifar100 (cifar-100-python/) or imagenet (train/, val/)", hashed=False)
    download: bool = _f(False, "download CIFAR-100 into data_root when missing (needs network)", hashed=False)
    stage_dir: Optional[str] = _f(None, "an ImageNet folder's train/ copied once per machine to this node-local "
                                        "directory and read from there (the same files in the same order: the "
                                        "stream and the run id are unchanged); a profile's stage_input sets it",
                                  hashed=False)
    img_size: int = _f(0, "input side (0: the dataset's native size: embedded 16, cifar100 32, imagenet 224)")
    embedded: EmbeddedConfig = _f(EmbeddedConfig(), "embedded dataset definition")
    augment: str = _f("weak", "augmentation strength preset (mkd/augment.py)", AUGMENTS)
    fraction: float = _f(1.0, "class-balanced fraction of the training split the student sees, 0 < f <= 1")
    meta_split: float = _f(0.1, "class-balanced share of the training set held out for MKD's meta batches (the "
                                "first images of each class's seeded permutation)")
    holdout: str = _f("meta", "who loses the meta split: meta = only the methods that read it (the others train on "
                              "the whole training set, as their authors did); all = every method trains on the same "
                              "reduced set (the controlled variant)", ("meta", "all"))
    split_seed: int = _f(0, "seed of the fraction and meta-split selection (kept fixed across run seeds)")
    epochs: int = _f(10, "training epochs (0: evaluate only)")
    batch_size: int = _f(128, "global batch size (split over DDP processes)")
    lr: float = _f(1e-3, "peak learning rate for the global batch")
    min_lr: float = _f(1e-5, "final learning rate of the cosine schedule")
    weight_decay: float = _f(0.05, "weight decay (not on norms, biases, tokens)")
    warmup_epochs: float = _f(1.0, "linear warmup length in epochs")
    # added after results existed: at their defaults these keys do not enter the run id (LATE_KEYS)
    optimizer: str = _f("adamw", "adamw (DeiT) or sgd (momentum below; the ResNet recipes of DIST and DKD)",
                        ("adamw", "sgd"))
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "SGD with Nesterov momentum (the DIST ImageNet recipe's optimizer default)")
    lr_schedule: str = _f("cosine", "cosine (per step, to min_lr), step (x decay_rate every decay_epochs) or multistep "
                                    "(x decay_rate at each of decay_milestones or decay_fractions)",
                          ("cosine", "step", "multistep"))
    decay_epochs: float = _f(30.0, "step schedule: epochs between decays (DIST/DKD ImageNet: 30)")
    decay_rate: float = _f(0.1, "step and multistep schedules: the factor at each decay")
    decay_milestones: list = _f([], "multistep: the epochs (0-based) from which the lr is x decay_rate once more "
                                    "(DIST's and mdistiller's CIFAR recipe: 150, 180, 210 of 240)")
    decay_fractions: list = _f([], "multistep: the milestones as fractions of training, so a shortened run keeps "
                                   "the shape (that recipe: 0.625, 0.75, 0.875)")
    lr_per: str = _f("step", "the schedule's clock: step (updated every optimizer step) or epoch (once an epoch, "
                             "constant within it: DeiT's per-epoch scheduler)", ("step", "epoch"))
    lr_epoch_lag: int = _f(0, "lr_per=epoch: epoch e trains at the schedule's value for epoch e - lag (DeiT's loop steps "
                              "its scheduler after each epoch with that epoch's index: lag 1, facebookresearch/deit "
                              "main.py line 432)")
    tune_holdout: float = _f(0.0, "a tuning trial (a suite's tuning:): the class-balanced share of the training set it "
                                  "holds out and is scored on (heldout_top1 in its result); 0: not a trial")
    drop_path: float = _f(0.0, "stochastic depth rate of the student")
    clip_grad: Optional[float] = _f(None, "clip the gradient norm to this value")
    seed: int = _f(0, "run seed: initialisation, data order, augmentation")
    repeated_aug: int = _f(1, "repeated augmentation (DeiT's RASampler): each epoch takes 1/r of the images, each r "
                              "times with different augmentations, in the same global batch (DeiT: 3)")
    amp: str = _f("auto", "autocast: auto (bf16 on GPU, off on CPU), bf16, fp16, off", ("auto", "bf16", "fp16", "off"))
    compile: str = _f("auto", "torch.compile the student and teacher: auto (on GPU), on, off", ("auto", "on", "off"),
                      hashed=False)
    teacher_cache: str = _f("auto", "reuse the teacher's logits on this run's data stream (computed once, by the "
                                    "first run of the stream, stored next to the teacher run): auto = on for the "
                                    "embedded data and CIFAR-100, off for ImageNet (full logits: ~2.3 GB an epoch per "
                                    "stream, and every reader waits for the producer's whole run); on; off: run the "
                                    "teacher every step", ("auto", "on", "off"), hashed=False)
    teacher_cache_topk: int = _f(0, "0: the teacher's full logits; k > 0: keep its k largest logits per image and "
                                    "spread the rest (smaller cache for many classes; approximate when k < classes)")
    input_cache: str = _f("auto", "store the student's augmented input batches of the stream for the other methods: "
                                  "auto (on for the embedded data in a suite, ~17 MB an epoch, removed when the suite is done; off for "
                                  "CIFAR/ImageNet and single runs), on, off",
                          ("auto", "on", "off"),
                          hashed=False)
    num_workers: int = _f(0, "DataLoader worker processes per GPU/process", hashed=False)
    eval_batch_size: int = _f(256, "evaluation batch size per process (GPU)", hashed=False)
    checkpoint_every_steps: int = _f(0, "also checkpoint every this many steps inside an epoch (0: at epoch ends and "
                                        "on USR2/SIGTERM only); for epochs longer than a preemption notice",
                                     hashed=False)
    checkpoint_minutes: float = _f(0.0, "write an epoch's end checkpoint only when this many minutes have passed "
                                        "since the last one (0: every epoch); signals still checkpoint at once",
                                   hashed=False)
    eval_every: int = _f(1, "evaluate every this many epochs (and after the last); the final top-1 does not depend on it",
                         hashed=False)
    log_every: int = _f(25, "steps between loss checks and temperature samples", hashed=False)


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, key: str, choices: tuple | None = None) -> Any:
    """Check/convert a YAML value against a field type; error names the key and the expected type.

    YAML reads ``on``/``off``/``yes``/``no`` as booleans; a string key whose allowed values include such a word
    takes the boolean back as that word (``compile=on``, ``amp=off``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return coerce(value, args[0], key, choices)
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
        if isinstance(value, bool):
            words = [w for w in (("on", "true", "yes") if value else ("off", "false", "no")) if w in (choices or ())]
            if words:
                return words[0]
            allowed = f"; allowed: {', '.join(choices)}" if choices else ""
            raise UserError(f"config key '{key}' must be a string, got the boolean {value} (YAML reads on/off/yes/no "
                            f"as booleans: quote the value){allowed}")
        if isinstance(value, (str, int, float)):
            return str(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [value]
    raise UserError(f"config key '{key}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise UserError(f"unknown config key '{key}'{suggest(k, names)}; allowed: {', '.join(names)}")
        tp = hints[k]
        if is_dataclass_type(tp):
            kwargs[k] = build(tp, v if v is not None else {}, f"{key}.")
        else:
            f = next(f for f in dataclasses.fields(cls) if f.name == k)
            kwargs[k] = coerce(v, tp, key, f.metadata.get("choices"))
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        val = getattr(obj, f.name)
        if choices and val not in choices:
            raise UserError(f"config key '{prefix}{f.name}' is {val!r}{suggest(val, choices)}; "
                            f"allowed: {', '.join(choices)}")
    return obj


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
