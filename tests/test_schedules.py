"""The suites' learning-rate curves against the curves the cited official configs give.

Each official curve is re-derived here from the config's numbers and the official scheduler's semantics, written
out from its source (not imported: none of it is a dependency):

- DIST (hunto/image_classification_sota): ``lib/utils/scheduler.py`` wraps ``StepLR(step_size=decay_steps)`` in a
  ``GradualWarmupScheduler(total_epoch=warmup_steps, warmup_lr)``; ``tools/train.py`` line 360 calls
  ``scheduler.step(iteration)`` after every iteration.  In the warm-up the rate is ``warmup_lr + (lr - warmup_lr) *
  (i // spe * spe) / warmup_steps`` (scheduler.py lines 59-60); after it, StepLR's closed form at
  ``i - warmup_steps - 1`` (lines 89-92); with no warm-up ``total_epoch`` is -1 (lines 44-46).
- mdistiller: ``adjust_learning_rate(epoch)`` sets ``lr * rate ** sum(epoch > stages)`` at the start of each epoch,
  counted from 1 (``mdistiller/engine/utils.py`` lines 72-79, ``engine/trainer.py`` lines 78-93): 0-based code decays
  at ``epoch >= stage``.
- DeiT (facebookresearch/deit ``main.py``): timm's per-epoch cosine (``create_scheduler``, line 355) stepped after
  each epoch with that epoch's index (line 432), so epoch ``e`` trains at the schedule's value for ``e - 1``.
"""
from __future__ import annotations

import math

import pytest

from mkd.config import from_dict
from mkd.engine import lr_curve
from mkd.suites import expand

DIST_CIFAR = {"lr": 0.05, "warmup_lr": 0.05, "warmup_epochs": 120, "decay_epochs": 30, "decay_rate": 0.1,
              "epochs": 240, "batch_size": 64}  # configs/strategies/distill/dist_cifar.yaml lines 5, 8-14, 27-28
DIST_IMAGENET = {"lr": 0.1, "warmup_lr": 0.2, "warmup_epochs": 0, "decay_epochs": 30, "decay_rate": 0.1,
                 "epochs": 100}  # configs/strategies/distill/resnet_dist.yaml lines 4-10, 23-24
MDISTILLER_CIFAR = {"lr": 0.05, "stages": [150, 180, 210], "rate": 0.1, "epochs": 240}  # configs/cifar100/kd.yaml


def dist_official(i: int, c: dict, spe: int) -> float:
    """The rate of iteration ``i`` (0-based) under DIST's GradualWarmupScheduler + StepLR, stepped per iteration."""
    warm = c["warmup_epochs"] * spe or -1  # total_epoch 0 -> finished at construction, total_epoch -1
    if i <= warm:
        return c["warmup_lr"] + (c["lr"] - c["warmup_lr"]) * (i // spe * spe) / warm
    return c["lr"] * c["decay_rate"] ** ((i - warm - 1) // (c["decay_epochs"] * spe))


def mdistiller_official(epoch0: int, c: dict) -> float:
    """The rate of 0-based epoch ``epoch0``: mdistiller counts from 1 and decays when epoch > stage."""
    return c["lr"] * c["rate"] ** sum(epoch0 + 1 > s for s in c["stages"])


def deit_official(epoch0: int, epochs=300, lr=1e-3, warmup_lr=1e-6, warmup=5, min_lr=1e-5) -> float:
    """DeiT: timm's cosine with a linear warm-up, per epoch, one epoch behind (stepped after each epoch)."""
    t = max(epoch0 - 1, 0)
    if t < warmup:
        return warmup_lr + t * (lr - warmup_lr) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


def _suite_cfg(suite: str, scale: str, tmp_path, method: str = "kd"):
    plan = expand(suite, scale, results=tmp_path, data_root=str(tmp_path),
                  filters={"method": [method], "seed": ["0"]})
    return plan.students[0].config


def _per_epoch(curve: list[float], spe: int) -> list[float]:
    """The rate of each epoch's last iteration (DIST's one-iteration lag at a milestone is inside the epoch)."""
    return [curve[(e + 1) * spe - 1] for e in range(len(curve) // spe)]


def test_gap_ladder_cifar_is_dist_s_and_mdistiller_s_cifar_curve(tmp_path):
    cfg = _suite_cfg("gap_ladder", "cifar", tmp_path)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer, cfg.nesterov) == (240, 64, 0.05, "sgd", False)
    spe = 50_000 // 64  # CIFAR-100's 50,000 training images at batch 64: 781 iterations an epoch
    ours = lr_curve(cfg, spe)
    official = [dist_official(i, DIST_CIFAR, spe) for i in range(len(ours))]
    assert _per_epoch(ours, spe) == pytest.approx(_per_epoch(official, spe), rel=1e-12)
    # per iteration they differ only at the three milestones' first iteration (DIST decays one iteration later)
    differ = [i for i, (a, b) in enumerate(zip(ours, official)) if not math.isclose(a, b, rel_tol=1e-12)]
    assert differ == [150 * spe, 180 * spe, 210 * spe]
    full = sum(math.isclose(x, 0.05) for x in ours) / len(ours)
    assert full == pytest.approx(0.625, abs=1e-9)  # 62.5% of training at full rate
    per_epoch = [ours[e * spe] for e in range(240)]  # mdistiller sets the rate at each epoch's start
    assert per_epoch == pytest.approx([mdistiller_official(e, MDISTILLER_CIFAR) for e in range(240)], rel=1e-12)
    assert all(ours[e * spe + k] == ours[e * spe] for e in range(240) for k in (0, spe // 2, spe - 1))


def test_gap_ladder_imagenet_is_dist_s_imagenet_curve_per_iteration(tmp_path):
    cfg = _suite_cfg("gap_ladder", "imagenet", tmp_path)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.nesterov) == (100, 256, 0.1, True)
    spe = 1_281_167 // 256
    ours = lr_curve(cfg, spe)
    official = [dist_official(i, DIST_IMAGENET, spe) for i in range(len(ours))]
    assert ours == pytest.approx(official, rel=1e-12)
    assert [ours[e * spe] for e in (29, 30, 59, 60, 90)] == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.0001])


def test_the_tiny_ladder_keeps_the_cifar_shape_at_its_own_length():
    plan = expand("gap_ladder", "tiny", filters={"method": ["kd"], "seed": ["0"]})
    cfg = (plan.students or plan.waiting)[0].config
    spe = 37
    ours = lr_curve(cfg, spe)
    steps = len(ours)
    assert steps == cfg.epochs * spe
    drops = [i for i in range(1, steps) if ours[i] < ours[i - 1]]
    assert drops == [round(f * steps) for f in (0.625, 0.75, 0.875)]
    assert ours[0] == cfg.lr and ours[-1] == pytest.approx(cfg.lr * 1e-3)


@pytest.mark.parametrize("suite", ["degradation", "data_fraction", "imagenet_main"])
def test_the_deit_recipe_is_deit_s_per_epoch_curve(suite, tmp_path):
    method = "kd" if suite != "imagenet_main" else "ce"
    plan = expand(suite, "imagenet", results=tmp_path, data_root=str(tmp_path),
                  filters={"method": [method], "seed": ["0"], **({"student": ["ViT-T"]} if suite == "imagenet_main"
                                                                 else {})})
    cfg = plan.students[0].config
    if suite == "data_fraction":
        cfg = next(r.config for r in plan.students if r.config.fraction == 1.0)
    assert (cfg.epochs, cfg.lr, cfg.min_lr, cfg.warmup_epochs) == (300, 1e-3, 1e-5, 5)
    spe = 5
    ours = lr_curve(cfg, spe)
    for e in range(300):
        assert ours[e * spe: (e + 1) * spe] == pytest.approx([deit_official(e)] * spe, rel=1e-9), e


def test_milestones_in_epochs_and_as_fractions_are_one_schedule():
    a = from_dict({"epochs": 8, "lr": 0.1, "optimizer": "sgd", "lr_schedule": "multistep", "decay_milestones": [4, 6],
                   "warmup_epochs": 0})
    b = from_dict({"epochs": 8, "lr": 0.1, "optimizer": "sgd", "lr_schedule": "multistep",
                   "decay_fractions": [0.5, 0.75], "warmup_epochs": 0})
    assert lr_curve(a, 10) == lr_curve(b, 10)
    assert a.run_id != b.run_id
    plain = from_dict({"epochs": 8})
    assert "decay_milestones" not in plain.to_dict() or plain.to_dict()["decay_milestones"] == []
    from mkd.config import identity

    assert "decay_milestones" not in identity(plain) and "lr_per" not in identity(plain)  # old run ids unchanged


@pytest.mark.parametrize("bad, says", [
    ({"lr_schedule": "multistep"}, "either decay_milestones"),
    ({"lr_schedule": "multistep", "decay_milestones": [6, 3]}, "must increase"),
    ({"lr_schedule": "multistep", "decay_fractions": [0.5, 1.5]}, "fractions of training"),
    ({"decay_milestones": [3]}, "set lr_schedule=multistep"),
])
def test_a_malformed_schedule_is_one_clear_error(bad, says):
    from mkd.errors import UserError

    with pytest.raises(UserError, match=says):
        from_dict({"epochs": 8, **bad})
