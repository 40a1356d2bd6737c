"""The data stream of a run: which images, in which order, augmented how, as a pure function of the seed.

Why: runs that differ only in method must see the same batches, so that (a) comparisons between methods are
paired (the same data order and augmentation, only the method differs) and (b) the teacher's logits on a
stream can be computed once and reused by every method (``mkd/stream_cache.py``).  Re-seeding the global
generators at the start of an epoch is not enough: the model's own random ops (drop path, dropout) and the
method's draw from them between the samples, and loader workers each hold their own.

- A sample's augmentation draws from generators seeded with (seed, epoch, sample position in the training
  subset), independent of loader workers and of any randomness the model or method consumes.  timm's
  transforms use the global ``random``, ``numpy.random`` and ``torch`` generators, so those are seeded per
  sample and restored around each batch: the caller's generator states are untouched.
- The batch composition is ``data.epoch_order`` of (seed, epoch); the Mixup/CutMix draw of a batch is a
  function of (seed, epoch, step in the epoch).
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import Compose, Normalize

_M64 = (1 << 64) - 1


def stream_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed of small integers (SplitMix64 finaliser over the parts); microseconds per call."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _M64
        h ^= h >> 31
    return h >> 1


@contextmanager
def isolated_rng():
    """Run a block with the global Python, NumPy and torch CPU generators, then put their states back."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


def seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also seed CUDA (~0.3 ms)


def split_transform(transform: Callable) -> tuple[Callable, Optional[Normalize], list]:
    """A timm/torchvision ``Compose`` as (image stage, its ``ToTensor``+``Normalize`` or None, tensor stage).

    Converting and normalising a whole batch at once is bitwise what the per-image calls give (the same
    element-wise float32 operations) and several times faster for small images."""
    ts = list(getattr(transform, "transforms", []))
    i = next((k for k, t in enumerate(ts) if type(t).__name__ in ("ToTensor", "MaybeToTensor")), None)
    if i is None or i + 1 >= len(ts) or not isinstance(ts[i + 1], Normalize):
        return transform, None, []
    return Compose(ts[:i]), ts[i + 1], ts[i + 2:]


class _EraseRecorder:
    """Stands in for an image tensor under timm's ``RandomErasing._erase``: records each box it writes and the
    shape of its fill (the eraser runs on the meta device: the boxes are timm's draws, the fill is drawn later
    on the training device, ``to_device``)."""

    def __init__(self):
        self.boxes: list[tuple[int, int, int, int, tuple]] = []

    def __setitem__(self, key, value) -> None:
        _, rows, cols = key
        self.boxes.append((rows.start, rows.stop, cols.start, cols.stop, tuple(value.shape)))


def _meta_eraser(t):
    """A copy of a timm ``RandomErasing`` whose fills are drawn on the meta device (free: only their shapes)."""
    import copy

    e = copy.copy(t)
    e.device = "meta"
    return e


def _stage_seed(seed: int, epoch: int, position: int, stage: int, repeat: int) -> int:
    """Repeat 0 is the stream as it was before repeated augmentation existed (same seeds, same batches)."""
    return stream_seed(seed, epoch, position, stage, repeat) if repeat else stream_seed(seed, epoch, position, stage)


class StreamSource(Dataset):
    """The CPU half of the stream: ``base[indices[i]]`` through the image stage of ``transform`` as uint8.

    Items are keyed ``(epoch, position, repeat)``: sample ``i`` of epoch ``e`` (repeat ``r`` of repeated
    augmentation) draws its image stage from seed (seed, e, i, 1[, r]) and its random erasing from (seed, e, i,
    3[, r]).  ``__getitems__`` returns a whole batch: uint8 images [B, C, H, W], labels, and the erasing boxes
    (timm's draws, with the seed their fills are drawn from); ``to_device`` converts, normalises and fills the
    boxes on the device, on a CPU bitwise what the per-image transform computes (tested).  Workers do the
    decoding and geometric work only, and ship 4x fewer bytes.
    A transform without a ``ToTensor``+``Normalize`` pair is applied whole, per image, as before.
    """

    def __init__(self, base: Dataset, indices: Optional[Sequence[int]], transform: Callable, seed: int = 0):
        self.base, self.indices, self.transform, self.seed = base, indices, transform, seed
        self.image_stage, self.normalize, erasers = split_transform(transform)
        for t in erasers:
            if not hasattr(t, "_erase"):
                raise TypeError(f"{type(t).__name__} after Normalize: only timm's RandomErasing runs on the device")
        self.erasers = [_meta_eraser(t) for t in erasers]

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, key):
        x, y, _ = self.__getitems__([key])
        return x[0], int(y[0])

    def __getitems__(self, keys: Sequence[tuple[int, int, int] | int]):
        images, labels, erase = [], [], []
        keys = [k if isinstance(k, tuple) else (0, k, 0) for k in keys]  # plain indices: evaluation sets
        with isolated_rng():
            for e, i, r in keys:
                seed_globals(_stage_seed(self.seed, e, i, 1, r))
                img, y = self.base[int(self.indices[i]) if self.indices is not None else int(i)]
                images.append(self.image_stage(img))
                labels.append(y)
            if self.normalize is None:
                return torch.stack(images), torch.tensor(labels), erase
            first = np.asarray(images[0], dtype=np.uint8)
            x = torch.empty((len(images), first.shape[2], *first.shape[:2]), dtype=torch.uint8)
            xs = x.numpy()
            for k, im in enumerate(images):  # one copy per image, straight into the NCHW batch
                xs[k] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
            if self.erasers:
                chan, h, w = x.shape[1:]
                for k, (e, i, r) in enumerate(keys):
                    seed = _stage_seed(self.seed, e, i, 3, r)
                    seed_globals(seed)
                    for t in self.erasers:
                        rec = _EraseRecorder()
                        t._erase(rec, chan, h, w, torch.float32)
                        erase += [(k, seed, _fill_mode(t), *box) for box in rec.boxes]
        return x, torch.tensor(labels), erase


@dataclass
class DeviceNormalize:
    """uint8 images -> float32 ``(x / 255 - mean) / std`` on their device (timm's PrefetchLoader idea), the
    same element-wise operations as ``ToTensor`` + ``Normalize``."""

    mean: tuple
    std: tuple

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:  # already converted (a transform without Normalize)
            return x
        x = x.to(torch.float32).div(255)
        m = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub_(m).div_(s)


def _fill_mode(eraser) -> str:
    return "normal" if (eraser.per_pixel or eraser.rand_color) else "zero"


def to_device(batch, device: torch.device, normalize: Optional[DeviceNormalize]) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``StreamSource`` batch on the device: converted, normalised, then the erasing boxes filled there.

    A box's fill is drawn as timm draws it (``normal_``, or zeros), from a generator on the device seeded with the
    image's erasing seed, box after box: on a CPU bitwise timm's per-image ``RandomErasing`` (the test compares
    them); on a GPU the same boxes with fills that are a function of the same seeds."""
    x, y, erase = batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if normalize is not None:
        x = normalize(x)
    gen, last = None, None
    for k, seed, mode, t0, t1, l0, l1, shape in erase:
        if mode == "zero":
            x[k, :, t0:t1, l0:l1] = 0.0
            continue
        if (k, seed) != last:  # one generator per image: its boxes draw in sequence, as timm's do
            gen, last = torch.Generator(device=device).manual_seed(seed), (k, seed)
        x[k, :, t0:t1, l0:l1] = torch.empty(shape, dtype=x.dtype, device=device).normal_(generator=gen)
    return x, y


def normalizer_of(src: StreamSource) -> Optional[DeviceNormalize]:
    n = src.normalize
    return None if n is None else DeviceNormalize(tuple(map(float, n.mean)), tuple(map(float, n.std)))


def mix_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of one batch's Mixup/CutMix draw."""
    return stream_seed(seed, epoch, step, 2)


# ---------------------------------------------------------------------------- the stream's identity
STREAM_VERSION = 2  # the stream's definition: results and caches of another definition are other runs


@dataclass(frozen=True)
class StreamIdentity:
    """What fixes a run's batches, written once: the planner's key (runs with equal keys see bit-identical
    batches and share a teacher stream), the stream caches' key (the same, resolved, plus what decides the bytes
    on this machine: the split, world size, kernels, thread count, packages) and the evaluation data's key.

    Built from a config (``StreamIdentity.of(cfg)``); the fields are the config keys that define the stream."""

    fields: tuple  # sorted (key, value) pairs of the stream's config keys

    KEYS = ("dataset", "embedded", "data_root", "img_size", "augment", "fraction", "split_seed", "batch_size",
            "seed", "repeated_aug", "student_input")

    @classmethod
    def of(cls, cfg) -> "StreamIdentity":
        import dataclasses

        d = {k: getattr(cfg, k) for k in cls.KEYS}
        d["held_out"] = cfg.held_out
        if cfg.tune_holdout:  # a tuning trial trains on fewer images (its scoring split held out)
            d["tune_holdout"] = cfg.tune_holdout
        d["embedded"] = dataclasses.asdict(cfg.embedded) if cfg.dataset == "embedded" else None
        return cls(tuple(sorted(d.items())))

    def __getitem__(self, key: str):
        return dict(self.fields)[key]

    def key(self) -> str:
        """The planner's key: runs with equal keys see the same batches (the stream version is in their run id)."""
        import json

        return json.dumps(dict(self.fields), sort_keys=True, default=str)

    def data(self, img_size: int) -> dict:
        """The evaluation data (dataset, its source, resolution): the key of the held evaluation tensors and of a
        teacher's cached validation accuracy."""
        source = self["embedded"] if self["dataset"] == "embedded" else self["data_root"]
        return {"dataset": self["dataset"], "source": source, "img_size": img_size}

    def cache(self, *, num_examples: int, train_indices, img_size: int, world: int, device: torch.device,
              kernels: str, packages: dict, cache_version: int) -> dict:
        """The stream caches' key: a cached epoch is bitwise what this run computes only under all of it."""
        import hashlib

        key = {"stream": STREAM_VERSION, "cache": cache_version, "dataset": self["dataset"],
               "embedded": self["embedded"], "num_examples": int(num_examples),
               "train_sha": hashlib.sha256(np.asarray(train_indices, np.int64).tobytes()).hexdigest()[:16],
               "augment": self["augment"], "img_size": img_size, "batch_size": self["batch_size"], "world": world,
               "seed": self["seed"], "device": device.type, "student_input": self["student_input"],
               "kernels": kernels, "threads": torch.get_num_threads() if device.type == "cpu" else None,
               "packages": packages}
        if self["repeated_aug"] > 1:
            key["repeated_aug"] = self["repeated_aug"]
        return key
