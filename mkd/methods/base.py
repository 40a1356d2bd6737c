"""The base of every method: a loss object with declarations and hooks.

A method maps ``(student_out, batch)`` to a dict of named loss terms, the total under ``"loss"``.  The ``Batch``
(``mkd/batch.py``) holds the targets (class indices or distributions, smoothed or mixed by Mixup/CutMix), the
hard labels of both mixed images and the mixing weight, and the teacher's logits.  A student
with a distillation head (timm ``deit_*_distilled``) returns ``(cls, dist)`` logits in training.

Declarations (class attributes) are what the rest of the suite reads instead of method names: config
validation and run-id hashing (``options``), suite expansion and the loop (``needs_teacher``,
``needs_meta_split``, ``replays_forward``), logging and the analysis (``learns_temperature``, ``label``, ``order``, ``role``).
Hooks the loop calls for every method: ``on_step(progress)`` before the forward, ``meta_step(ctx)`` after the
backward and before the optimizer step, ``temperatures()`` for logging, ``train_parameters()`` for parameters
the student's optimizer owns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from ..batch import Batch

if TYPE_CHECKING:
    from ..fields import GeneralConfig as RunConfig  # a run's config: these fields and the methods' sections


@dataclass(frozen=True)
class Progress:
    """Where training stands before a step (for schedules): global step, 0-based epoch, totals."""

    step: int
    steps_per_epoch: int
    total_steps: int

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)

    @property
    def epoch(self) -> int:
        return self.step // max(1, self.steps_per_epoch)

    @property
    def epochs(self) -> float:
        return self.total_steps / max(1, self.steps_per_epoch)


@dataclass
class StepContext:
    """What a method's ``meta_step`` may use about the current training step."""

    student: nn.Module  # the bare module (not the DDP wrapper), parameters and .grad of this step
    x: Tensor  # the (mixed) input batch of this process
    targets: Tensor
    teacher_logits: Optional[Tensor]
    student_out: Any  # detached output of the real forward
    lr: float  # the student's current learning rate
    step: int  # global step, starting at 0
    autocast: Callable[[], Any]  # context manager factory of the loop's precision
    meta_batches: Any = None  # mkd.data.MetaBatches of the held-out split
    teacher: Optional[nn.Module] = None
    rng: Optional[dict] = None  # RNG state the real forward started from (mkd.meta.capture_rng): replay its masks
    optimizer: Optional[torch.optim.Optimizer] = None  # the student's optimizer (its state, not to be stepped)
    scaler: Any = None  # the fp16 GradScaler, when one is used (gradients of the method's own parameters are scaled)
    amp: str = "off"  # the loop's autocast: off, bf16, fp16
    batch: Optional[Batch] = None  # the step's whole batch (hard labels, mixing weight)


class Method(nn.Module):
    """Base class: a loss object with optional state (temperatures), declarations and hooks."""

    name: ClassVar[str] = ""  # registry key, the value of ``method=``
    label: ClassVar[str] = ""  # how tables and figures name it
    order: ClassVar[int] = 100  # column order in tables (lower first)
    # what the analysis compares it as: baseline (the student alone, no teacher), reference (the method every
    # other is compared with: KD), subject (the method under study: MKD), rival (a competing cure)
    role: ClassVar[str] = "rival"
    options: ClassVar[tuple[str, ...]] = ()  # option sections that determine its result (hashed into its run id)
    needs_teacher: ClassVar[bool] = True
    needs_meta_split: ClassVar[bool] = False  # the loop streams batches of the held-out split to meta_step
    learns_temperature: ClassVar[bool] = False  # the loop samples temperatures every log_every steps
    replays_forward: ClassVar[bool] = False  # meta_step recomputes the real forward: the loop records its RNG state
    # one fixed temperature for teacher and student, named as (option section, field): e.g. ("dist", "tau")
    fixed_temperature: ClassVar[Optional[tuple[str, str]]] = None

    def __init__(self, cfg: "RunConfig", num_classes: int):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes

    @classmethod
    def check(cls, cfg: "RunConfig", need: Callable[[bool, str, str], None]) -> None:
        """Validate the config for this method: ``need(condition, key, message)``."""

    @classmethod
    def declarations(cls) -> dict:
        """What results record about the method (the analysis reads these, never the classes)."""
        return {"label": cls.label or cls.name, "order": cls.order, "role": cls.role,
                "learns_temperature": cls.learns_temperature, "needs_teacher": cls.needs_teacher}

    @classmethod
    def initial_temperatures(cls, cfg: "RunConfig") -> dict[str, float]:
        """The temperatures before the first step (the launcher records them in run.json: a figure's epoch 0)."""
        if cls.fixed_temperature is None:
            return {}
        section, field = cls.fixed_temperature
        t = getattr(getattr(cfg, section), field)
        return {"tau_t": t, "tau_s": t}

    @classmethod
    def extra_student_forwards(cls, cfg: "RunConfig") -> float:
        """Student forwards (a backward counts 2) this method adds per training image beyond the step's own
        forward and backward: the plan's cost model (mkd/cost.py) reads it."""
        return 0.0

    def forward(self, out, batch: Batch) -> dict[str, Tensor]:
        """The loss terms of one step: ``out`` is the student's output, ``batch`` the step's ``Batch``."""
        raise NotImplementedError

    def on_step(self, progress: Progress) -> None:
        """Called before each training step with where training stands (schedules)."""

    def meta_step(self, ctx: StepContext) -> None:
        """Called after the backward of each step, before the optimizer step (meta learning)."""

    @property
    def has_meta_step(self) -> bool:
        """Whether the loop must build a StepContext and call meta_step (kept off the plain methods' step)."""
        return self.has_meta_step_class()

    @classmethod
    def has_meta_step_class(cls) -> bool:
        return cls.meta_step is not Method.meta_step

    @property
    def meta_batch_size(self) -> int:
        """Global batch size of the held-out batches a ``needs_meta_split`` method reads."""
        return 0

    def temperatures(self) -> dict[str, float]:
        """Current temperatures for logging ({} when the method has none; a fixed one stays its initial value)."""
        return self.initial_temperatures(self.cfg)

    def train_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the student's optimizer (e.g. CTKD's temperature in its AdamW variant)."""
        return list(self.parameters())

    def _mix(self, ce: Tensor, distill: Tensor, alpha: float, name: str) -> dict[str, Tensor]:
        return self._weighted(ce, distill, (1 - alpha, alpha), name)

    @staticmethod
    def _weighted(ce: Tensor, distill: Tensor, weights: tuple[float, float], name: str) -> dict[str, Tensor]:
        return {"ce": ce, name: distill, "loss": weights[0] * ce + weights[1] * distill}
