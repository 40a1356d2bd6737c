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
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

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


class EpochStream(Dataset):
    """``base[indices[i]]`` through ``transform``, sample ``i`` of epoch ``epoch`` seeded with (seed, epoch, i).

    ``__getitems__`` fetches a whole batch (the DataLoader calls it with the batch's positions), so the
    generator states are saved and restored once per batch, not once per image.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable, seed: int, epoch: int):
        self.base, self.indices, self.transform, self.seed, self.epoch = base, indices, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, positions: Sequence[int]) -> list:
        out = []
        with isolated_rng():
            for i in positions:
                seed_globals(stream_seed(self.seed, self.epoch, int(i), 1))
                img, y = self.base[int(self.indices[i])]
                out.append((self.transform(img), y))
        return out


def mix_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of one batch's Mixup/CutMix draw."""
    return stream_seed(seed, epoch, step, 2)
