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


class EpochStream(Dataset):
    """``base[indices[i]]`` through ``transform``, sample ``i`` of epoch ``epoch`` seeded with (seed, epoch, i).

    ``__getitems__`` fetches a whole batch (the DataLoader calls it with the batch's positions): generator
    states are saved and restored once per batch, and the batch is converted and normalised at once.  The image
    stage of sample i draws from seed (seed, epoch, i, 1), its tensor stage (random erasing) from (seed, epoch,
    i, 3).
    """

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable, seed: int, epoch: int):
        self.base, self.indices, self.transform, self.seed, self.epoch = base, indices, transform, seed, epoch
        self.image_stage, self.normalize, self.tensor_stage = split_transform(transform)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], int(y[0])

    def __getitems__(self, positions: Sequence[int]):
        """(images [B, C, H, W], labels [B]) of these positions (collated here: the loader passes them on)."""
        images, labels = [], []
        with isolated_rng():
            for i in positions:
                seed_globals(stream_seed(self.seed, self.epoch, int(i), 1))
                img, y = self.base[int(self.indices[i])]
                images.append(self.image_stage(img))
                labels.append(y)
            if self.normalize is None:
                return torch.stack(images), torch.tensor(labels)
            x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
            x = x.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
            n = self.normalize
            x.sub_(torch.as_tensor(n.mean, dtype=x.dtype).view(1, -1, 1, 1)).div_(
                torch.as_tensor(n.std, dtype=x.dtype).view(1, -1, 1, 1))
            for k, i in enumerate(positions):
                if self.tensor_stage:
                    seed_globals(stream_seed(self.seed, self.epoch, int(i), 3))
                    for t in self.tensor_stage:
                        x[k] = t(x[k])
        return x, torch.tensor(labels)


def mix_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of one batch's Mixup/CutMix draw."""
    return stream_seed(seed, epoch, step, 2)
