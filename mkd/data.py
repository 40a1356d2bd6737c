"""Datasets (embedded synthetic, CIFAR-100, ImageNet-style folders), class-balanced fractions, the meta split.

The embedded dataset
--------------------
An offline image-classification task generated from a seed (code, not data files), hard enough that model
capacity matters.  ``C`` classes fall into ``S`` superclasses.  A superclass owns a *shape* (a mask made of
three anisotropic Gaussian blobs near the centre) and a base colour; each class owns a colour offset from
that base and a sinusoidal *grating* (orientation, frequency).  A sample is the class's textured shape,
shifted by up to a quarter of the image, with random grating phase and contrast, on a random colour
gradient, overlaid with a fainter *distractor* object of a random class elsewhere, plus pixel noise.
Telling classes apart inside a superclass needs the grating under the distractor; that is where capacity
pays off, and the superclass structure is the "dark knowledge" a teacher's soft labels carry.
Class templates depend on ``seed`` only; the training and validation samples use separate streams.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR100

from . import atomic
from .fields import EmbeddedConfig, GeneralConfig as RunConfig
from .errors import UserError

CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def cache_dir() -> Path:
    """Where generated data and teacher evaluations are cached ($MKD_CACHE, default ~/.cache/mkd)."""
    return Path(os.environ.get("MKD_CACHE", Path.home() / ".cache" / "mkd"))


# ---------------------------------------------------------------------------- embedded synthetic data
def _templates(cfg: EmbeddedConfig):
    size, C, S = cfg.img_size, cfg.num_classes, cfg.superclasses
    r = np.random.default_rng([cfg.seed, 0])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    xx = xx + 0.5 / size  # centre the grid so that a horizontal flip maps it onto itself
    masks = []
    for _ in range(S):
        m = np.zeros((size, size), np.float32)
        for _ in range(3):
            cx, cy = r.uniform(-0.2, 0.2, 2)
            sx, sy = r.uniform(0.06, 0.16, 2)
            m += np.exp(-((xx - cx) ** 2 / (2 * sx**2) + (yy - cy) ** 2 / (2 * sy**2)))
        m = m + m[:, ::-1]  # mirror-symmetric: flips preserve the class (weak augmentation is label-safe)
        masks.append(np.clip(m / m.max(), 0, 1))
    superclass = np.arange(C) * S // C
    base = r.uniform(-1, 1, (S, 3))
    colour = base[superclass] + 0.45 * r.normal(size=(C, 3))
    theta, freq = r.uniform(0.1, np.pi / 2 - 0.1, C), r.uniform(2.5, 4.5, S)[superclass]
    return xx, yy, np.stack(masks), superclass, colour.astype(np.float32), theta, freq


def _generate(cfg: EmbeddedConfig, per_class: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    size, C = cfg.img_size, cfg.num_classes
    xx, yy, masks, superclass, colour, theta, freq = _templates(cfg)
    r = np.random.default_rng([cfg.seed, 1, stream])
    n = per_class * C
    y = np.repeat(np.arange(C), per_class)
    shift, dshift = size // 4, (3 * size) // 8

    def render(c, dx, dy, phase, amp):
        # a plaid of gratings at +-theta (symmetric under horizontal flips) inside the superclass shape
        m = np.roll(masks[superclass[c]], (dy, dx), (0, 1))
        u, w = xx * np.cos(theta[c]), yy * np.sin(theta[c])
        g = 0.5 * (np.cos(2 * np.pi * freq[c] * (u + w) + phase) + np.cos(2 * np.pi * freq[c] * (w - u) + phase))
        return amp * m[..., None] * (0.6 * colour[c] + 0.5 * g[..., None] * np.sign(colour[c] + 1e-3))

    X = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = r.normal(0, 0.3, 3) + xx[..., None] * r.normal(0, 0.6, 3) + yy[..., None] * r.normal(0, 0.6, 3)
        img = img + render(y[i], *r.integers(-shift, shift + 1, 2), r.uniform(0, 2 * np.pi), r.uniform(0.7, 1.2))
        img = img + render(r.integers(C), *r.integers(-dshift, dshift + 1, 2), r.uniform(0, 2 * np.pi),
                           r.uniform(0.15, 0.4))
        img = img + r.normal(0, 0.15, img.shape)
        X[i] = np.clip((img * 0.35 + 0.5) * 255, 0, 255).astype(np.uint8)
    perm = r.permutation(n)
    return X[perm], y[perm]


def embedded_arrays(cfg: EmbeddedConfig) -> dict[str, np.ndarray]:
    """{'x_train','y_train','x_val','y_val'} as uint8 NHWC / int64, generated once and cached on disk."""
    key = hashlib.sha256(json.dumps({"v": 4, **asdict(cfg)}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "embedded" / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError):
            pass  # a foreign/corrupt cache file: regenerate
    xt, yt = _generate(cfg, cfg.train_per_class, stream=0)
    xv, yv = _generate(cfg, cfg.val_per_class, stream=1)
    arrays = {"x_train": xt, "y_train": yt.astype(np.int64), "x_val": xv, "y_val": yv.astype(np.int64)}
    _save_npz(path, arrays)
    return arrays


def _save_npz(path: Path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic.write_bytes(path, buf.getvalue())


class ArrayImages(Dataset):
    """uint8 NHWC images in memory -> (PIL image, label)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.targets = x, [int(t) for t in y]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return Image.fromarray(self.x[i]), self.targets[i]


# ---------------------------------------------------------------------------- datasets on disk
class LocalCIFAR100(CIFAR100):
    """torchvision's CIFAR-100; file checksums are verified only when downloading.

    At module level (not inside a function) so that DataLoader workers started with ``spawn`` (the local
    executor's pool, macOS) can pickle it."""

    def __init__(self, root, train: bool, download: bool):
        self.verify = download
        super().__init__(root, train=train, download=download)

    def _check_integrity(self) -> bool:
        if self.verify:
            return super()._check_integrity()
        base = Path(self.root) / self.base_folder
        return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        if self.verify:
            return super()._load_meta()
        import pickle

        path = Path(self.root) / self.base_folder / self.meta["filename"]
        if not path.is_file():
            raise RuntimeError(f"{path} is missing")
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _cifar100(root: Optional[str], train: bool, download: bool):
    if not root:
        raise UserError("dataset=cifar100 needs data_root=DIR (holding cifar-100-python/), "
                        "add download=true to fetch it")
    if not download and not (Path(root) / "cifar-100-python").is_dir():
        raise UserError(f"CIFAR-100 not found under {root} (no cifar-100-python/): point data_root at its parent "
                        "or add download=true")
    try:
        return LocalCIFAR100(root, train=train, download=download)
    except (RuntimeError, OSError) as e:
        raise UserError(f"could not load CIFAR-100 from {root} ({e}): check the files or add download=true") from None


def _image_folder(root: Optional[str], split: str, stage_dir: Optional[str] = None):
    """``root/split`` as an ImageFolder whose file list comes from ``folder_index`` (scanned once per machine, not
    once per run and rank); the training split read from a node-local copy when ``stage_dir`` is set
    (``stage_folder``): the same files in the same order, so the run's stream is unchanged."""
    import torchvision

    if not root:
        raise UserError("dataset=imagenet needs data_root=DIR with train/ and val/ class folders")
    d = Path(root) / split
    if not d.is_dir():
        raise UserError(f"ImageNet-style folder {d} not found: data_root must hold train/ and val/ "
                        "with one sub-folder per class")
    if stage_dir and split == "train":
        d = stage_folder(d, Path(os.path.expanduser(stage_dir)))
    try:
        classes, samples = folder_index(d)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"could not read image folder {d} ({e}): it needs one sub-folder of images per class") from None

    return _indexed_folder_class()(str(d), classes, samples)


@functools.cache
def _indexed_folder_class():
    """An ImageFolder built from a given file list (no scan); a module-level class, so that loader workers started
    by spawn or forkserver can unpickle it."""
    import torchvision

    class IndexedFolder(torchvision.datasets.ImageFolder):
        def __init__(self, root: str, classes: list[str], samples: list[tuple[str, int]]):
            self._index = (list(classes), samples)
            super().__init__(root)

        def find_classes(self, directory):
            return self._index[0], {c: i for i, c in enumerate(self._index[0])}

        def make_dataset(self, directory, class_to_idx, *args, **kwargs):
            return [(os.path.join(directory, rel), c) for rel, c in self._index[1]]

    IndexedFolder.__qualname__ = "IndexedFolder"
    return IndexedFolder


def __getattr__(name: str):  # pickle finds mkd.data.IndexedFolder here, torchvision imported only when needed
    if name == "IndexedFolder":
        return _indexed_folder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_FOLDERS: dict = {}


def folder_index(d: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(relative path, class index)]) of an ImageFolder, in torchvision's order: held in memory per
    process, and kept in the cache directory keyed by the folder's path and its class folders' modification times,
    so that the ranks, the cohort's members and the runs of a job on one machine scan 1.28M files once."""
    import fcntl

    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    d = d.resolve()
    if d in _FOLDERS:
        return _FOLDERS[d]
    classes, class_to_idx = find_classes(str(d))
    stamp = json.dumps([str(d), [(c, os.stat(d / c).st_mtime_ns) for c in classes]])
    path = cache_dir() / "folders" / f"{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process scans, the others wait and read its index
        try:
            index = atomic.read_json(path)
        except atomic.Damaged:
            index = None
        if index is None:
            samples = make_dataset(str(d), class_to_idx, extensions=IMG_EXTENSIONS)
            index = {"folder": str(d), "classes": classes,
                     "samples": [[os.path.relpath(p, d), c] for p, c in samples]}
            atomic.write_json(path, index)
    _FOLDERS[d] = (index["classes"], [(p, int(c)) for p, c in index["samples"]])
    return _FOLDERS[d]


def stage_folder(src: Path, stage_root: Path) -> Path:
    """A copy of ``src`` on node-local disk, made once per machine (the first process copies, the others wait;
    a copy is complete only when its marker names the file count), reused by every later run of the job."""
    import fcntl
    import shutil

    src = src.resolve()
    dest = stage_root / f"{src.parent.name}-{hashlib.sha256(str(src).encode()).hexdigest()[:12]}" / src.name
    marker = dest.parent / f".{src.name}.complete"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{src.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        n = sum(len(files) for _, _, files in os.walk(src))
        if marker.exists() and marker.read_text().strip() == str(n) and dest.is_dir():
            return dest
        tmp = dest.with_name(f".{dest.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, dest)
        atomic.write_text(marker, f"{n}\n")
    return dest


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    img_size: int
    mean: tuple
    std: tuple
    crop_pct: float  # evaluation: resize to img_size/crop_pct, then centre crop
    crop_scale: tuple  # RandomResizedCrop area range for training


def load_base(cfg: RunConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """(train set, val set, info); items are (PIL image, int label), no transform yet."""
    if cfg.dataset == "embedded":
        a = embedded_arrays(cfg.embedded)
        train, val = ArrayImages(a["x_train"], a["y_train"]), ArrayImages(a["x_val"], a["y_val"])
        x = a["x_train"].reshape(-1, 3) / 255.0
        info = DatasetInfo("embedded", cfg.embedded.num_classes, cfg.img_size or cfg.embedded.img_size,
                           tuple(x.mean(0).round(4)), tuple(x.std(0).round(4)), 1.0, (0.5, 1.0))
    elif cfg.dataset == "cifar100":
        train, val = _cifar100(cfg.data_root, True, cfg.download), _cifar100(cfg.data_root, False, cfg.download)
        info = DatasetInfo("cifar100", 100, cfg.img_size or 32, CIFAR100_MEAN, CIFAR100_STD, 1.0, (0.35, 1.0))
    else:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        train, val = _image_folder(cfg.data_root, "train", cfg.stage_dir), _image_folder(cfg.data_root, "val")
        if train.classes != val.classes:
            raise UserError(f"{cfg.data_root}: train/ and val/ have different class folders; they must match")
        info = DatasetInfo("imagenet", len(train.classes), cfg.img_size or 224, IMAGENET_DEFAULT_MEAN,
                           IMAGENET_DEFAULT_STD, 0.875, (0.08, 1.0))
    return train, val, info


# ---------------------------------------------------------------------------- fractions and meta split
def make_split(labels: Sequence[int], fraction: float, meta_split: float, seed: int,
               tune: float = 0.0) -> dict[str, np.ndarray]:
    """Class-balanced, seeded selection of the student's training subset, the held-out meta split and, for a
    tuning trial, the held-out images it is scored on.

    Per class, one seeded permutation: the first ``round(meta_split * n_c)`` images form the meta split, the next
    ``round(tune * n_c)`` a tuning trial's scoring split (none unless ``tune > 0``), the
    first ``round(fraction * rest)`` of the rest the training subset.  Subsets are therefore nested across
    fractions and disjoint from the meta split at every fraction.  A run that does not lose the meta split
    (``holdout=meta``, a method without meta batches) is made with ``meta_split=0``: its subset is the first
    ``round(fraction * n_c)`` images of the same permutation (at fraction 1 the whole class).
    """
    if not 0 < fraction <= 1:
        raise UserError(f"fraction={fraction} is outside (0, 1]: use e.g. fraction=0.25")
    if not 0 <= meta_split < 1:
        raise UserError(f"meta_split={meta_split} is outside [0, 1): use e.g. meta_split=0.1")
    labels = np.asarray(labels)
    train, meta, held = [], [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))]
        n_meta = int(round(meta_split * len(idx)))
        if meta_split > 0:
            n_meta = max(1, n_meta)
        if n_meta >= len(idx):
            raise UserError(f"meta_split={meta_split} leaves no training images for class {c} ({len(idx)} images): "
                            "use a smaller meta_split")
        n_tune = max(1, int(round(tune * len(idx)))) if tune > 0 else 0
        if n_meta + n_tune >= len(idx):
            raise UserError(f"tune_holdout={tune} with meta_split={meta_split} leaves no training images for class "
                            f"{c} ({len(idx)} images): use a smaller tune_holdout")
        rest = idx[n_meta + n_tune:]
        meta.append(idx[:n_meta])
        held.append(idx[n_meta: n_meta + n_tune])
        train.append(rest[: max(1, int(round(fraction * len(rest))))])
    split = {"train": np.sort(np.concatenate(train)), "meta": np.sort(np.concatenate(meta)),
             "num_examples": np.asarray(len(labels))}
    if tune > 0:
        split["tune"] = np.sort(np.concatenate(held))
    return split


def load_or_make_split(path: Path, labels: Sequence[int], cfg: RunConfig) -> dict[str, np.ndarray]:
    """The run's split file if present (so reruns and other machines use the same subset), else a new one."""
    split = None
    if path.exists():
        try:
            with np.load(path) as z:
                split = {k: z[k] for k in z.files}
            split["num_examples"], split["train"], split["meta"]  # noqa: B018  (all three present)
        except Exception as e:  # truncated or foreign: keep it aside, make it again (a pure function of the seed)
            from .atomic import move_aside

            print(f"{path} is damaged ({type(e).__name__}): moved aside to {move_aside(path).name}; "
                  "making the split again", flush=True)
            split = None
    if split is not None:
        if int(split["num_examples"]) != len(labels):
            raise UserError(f"{path} was made for {int(split['num_examples'])} training images but the dataset has "
                            f"{len(labels)}: point data_root at the same data or use a new --out")
        return split
    split = make_split(labels, cfg.fraction, cfg.held_out, cfg.split_seed, cfg.tune_holdout)
    _save_npz(path, split)
    return split


class Transformed(Dataset):
    """``base[indices[i]]`` with ``transform`` applied to the image."""

    def __init__(self, base: Dataset, indices: Optional[Sequence[int]], transform: Callable):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, i):
        img, y = self.base[int(self.indices[i]) if self.indices is not None else i]
        return self.transform(img), y


def materialize(ds: Dataset, max_bytes: float = 512e6, num_workers: int = 0) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """All of a deterministically transformed dataset as two tensors, when it fits in ``max_bytes``.

    Evaluation and meta sets never change between epochs; holding them as tensors skips the per-epoch
    decoding and transforms (the tiny suite evaluates every epoch).  A ``StreamSource`` is held as uint8 (its
    batches are normalised on the device), anything else as it comes.
    """
    x0 = ds[0][0]
    if len(ds) * x0.numel() * x0.element_size() > max_bytes:
        return None
    xs, ys = [], []
    for x, y, *_ in DataLoader(ds, batch_size=512, num_workers=num_workers, collate_fn=_collate_for(ds)):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------- samplers and loaders
def epoch_order(n: int, global_batch: int, seed: int, epoch: int, rank: int, world: int,
                repeats: int = 1) -> list[tuple[int, int]]:
    """This process's samples of one epoch as (position, repeat): a seeded permutation, each position repeated
    ``repeats`` times in a row (DeiT's repeated augmentation), cut to whole global batches of the epoch's ``n``
    samples, strided over ranks.

    Rank r takes ``order[r::world]``, so the union of the ranks' k-th local batches is exactly the k-th
    global batch of a single process: DDP and one process see the same data (and, as in DeiT's ``RASampler``,
    the repeats of one image land on different ranks).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    order = [(p, r) for p in perm for r in range(repeats)] if repeats > 1 else [(p, 0) for p in perm]
    order = order[: (n // global_batch) * global_batch]
    return order[rank::world]


@dataclass
class TrainSource:
    """The student's training images before augmentation: the base set, the subset's indices, the transform."""

    base: Dataset
    indices: np.ndarray
    transform: Callable

    def __len__(self) -> int:
        return len(self.indices)


class _EpochKeys:
    """The batch sampler of a persistent loader: the (epoch, position, repeat) keys of this rank's batches of
    the epoch and first step last set (the sampler runs in the main process, so workers need no epoch)."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world: int, repeats: int):
        self.n, self.global_batch, self.seed, self.rank, self.world, self.repeats = n, global_batch, seed, rank, world, repeats
        self.epoch, self.first_step = 0, 0

    def __iter__(self):
        order = epoch_order(self.n, self.global_batch, self.seed, self.epoch, self.rank, self.world, self.repeats)
        b = self.global_batch // self.world
        for s in range(self.first_step, len(order) // b):
            yield [(self.epoch, p, r) for p, r in order[s * b:(s + 1) * b]]

    def __len__(self) -> int:
        return self.n // self.global_batch - self.first_step


class TrainStream:
    """The student's training batches of every epoch from one loader whose workers persist across epochs
    (``persistent_workers``; DeiT and timm do the same): the order is ``epoch_order`` of (seed, epoch), each
    image's augmentation a function of (seed, epoch, its position, its repeat) (``mkd/stream.py``), whatever the
    workers, the method, or where the epoch was resumed.  Batches come as ``StreamSource`` batches (uint8)."""

    def __init__(self, src: TrainSource, global_batch: int, seed: int, rank: int, world: int, num_workers: int,
                 pin: bool, repeats: int = 1):
        from .stream import StreamSource

        if len(src) < global_batch:
            raise UserError(f"the training subset has {len(src)} images, fewer than batch_size={global_batch}: "
                            "lower batch_size or raise fraction")
        self.source = StreamSource(src.base, src.indices, src.transform, seed)
        self.keys = _EpochKeys(len(src), global_batch, seed, rank, world, repeats)
        g = torch.Generator().manual_seed(seed * 7919 + rank)  # else the loader draws its base seed from the global
        self.loader = DataLoader(self.source, batch_sampler=self.keys, num_workers=num_workers, pin_memory=pin,
                                 persistent_workers=num_workers > 0, generator=g, collate_fn=collated_as_is)

    def epoch(self, epoch: int, first_step: int = 0):
        self.keys.epoch, self.keys.first_step = epoch, first_step
        return iter(self.loader)


def collated_as_is(batch):
    """``StreamSource.__getitems__`` returns the batch already stacked."""
    return batch


def _collate_for(ds: Dataset):
    from .stream import StreamSource

    return collated_as_is if isinstance(ds, StreamSource) else None


class MetaBatches:
    """Endless random batches of the held-out meta split, identical across DDP ranks up to the shard.

    Every rank draws the same global index batch from a shared generator (seeded by run seed and epoch) and
    keeps its stride, as ``epoch_order`` does for training batches.  A materialised split is indexed
    directly; a large one (ImageNet) streams through one loader whose workers persist across epochs.  Batches
    of a ``StreamSource`` are uint8 and normalised on the device (``normalize``).
    """

    def __init__(self, ds: Dataset, tensors: Optional[tuple], global_batch: int, seed: int, rank: int,
                 world: int, device: torch.device, num_workers: int = 0, normalize: Optional[Callable] = None):
        self.ds, self.tensors, self.rank, self.world, self.device = ds, tensors, rank, world, device
        self.global_batch = max(world, min(global_batch, len(ds)) // world * world)
        self.seed, self.num_workers, self.normalize = seed, num_workers, normalize
        self.loader = None
        self.set_epoch(0)

    def _indices(self, gen: torch.Generator):
        while True:
            yield torch.randperm(len(self.ds), generator=gen)[: self.global_batch][self.rank:: self.world].tolist()

    def __iter__(self):  # the persistent loader's batch sampler: the current epoch's generator
        return self._indices(self.gen)

    def set_epoch(self, epoch: int, drawn: int = 0) -> None:
        """Start epoch ``epoch``'s batches, after the first ``drawn`` of them (a run resumed mid-epoch)."""
        self.gen = torch.Generator().manual_seed(self.seed * 31 + epoch + 12345)
        self.epoch, self.drawn = epoch, drawn
        for _ in range(drawn):  # the generator as it was after those batches (a loader prefetches ahead of it)
            next(self._indices(self.gen))
        self.stream = None  # the loader restarts from this generator at the first next() of the epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "drawn": self.drawn}

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.drawn += 1
        if self.tensors is None:
            if self.loader is None:
                self.loader = DataLoader(self.ds, batch_sampler=self, num_workers=self.num_workers,
                                         pin_memory=self.device.type == "cuda", collate_fn=_collate_for(self.ds),
                                         persistent_workers=self.num_workers > 0)
            if self.stream is None:
                self.stream = iter(self.loader)
            x, y, *_ = next(self.stream)
        else:
            idx = next(self._indices(self.gen))
            x, y = self.tensors[0][idx], self.tensors[1][idx]
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return (self.normalize(x) if self.normalize is not None else x), y
