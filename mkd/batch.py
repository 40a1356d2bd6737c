"""What the loop hands every method for one training step (``Method.forward(out, batch)``).

Why a type: the training targets alone (smoothed, or mixed by Mixup/CutMix) lose which classes were mixed and
by how much, and a method that needs the true class of each image (a target / non-target split, a hard-label
term) cannot be written from them.  Mixup and CutMix in timm's batch mode mix image ``i`` with image ``B-1-i``
(the flipped batch) with one weight ``lam`` (CutMix's corrected for the box clipped at the border), so the
targets are ``lam * onehot(labels) + (1 - lam) * onehot(labels_b)``, smoothed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from torch import Tensor


@dataclass
class Batch:
    x: Optional[Tensor]  # the (mixed) input batch of this process
    targets: Tensor  # what CE trains on: class indices, or class distributions (smoothed / mixed)
    labels: Optional[Tensor] = None  # the true class of each image
    labels_b: Optional[Tensor] = None  # the class of the image mixed into it (None without Mixup/CutMix)
    lam: float = 1.0  # the weight of ``labels`` in the mix (1.0: unmixed)
    teacher_logits: Optional[Tensor] = None  # from the teacher's forward or the stream cache

    def with_teacher(self, logits: Optional[Tensor]) -> "Batch":
        return replace(self, teacher_logits=logits)

    @property
    def mixed(self) -> bool:
        return self.labels_b is not None and self.lam != 1.0
