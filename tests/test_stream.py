"""The deterministic data stream and the teacher-output cache (issue 11)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY
from mkd.augment import build_augment
from mkd.config import load_config
from mkd.data import TrainSource, TrainStream, load_base, make_split
from mkd.stream_cache import EpochFiles, topk_compress, topk_expand


def _source(augment: str):
    cfg = load_config(overrides=[f"augment={augment}", *TINY])
    train, _, info = load_base(cfg)
    split = make_split(train.targets, 1.0, 0.1, 0)
    aug = build_augment(augment, info.img_size, info.mean, info.std, info.num_classes, info.crop_pct, info.crop_scale)
    return TrainSource(train, split["train"], aug.train_transform), aug


def _batches(src, aug, epoch=0, workers=0, first_step=0, disturb=False, stream=None):
    out = []
    from mkd.stream import mix_seed, normalizer_of, to_device

    stream = stream or TrainStream(src, 64, 3, 0, 1, workers, False)
    for i, raw in enumerate(stream.epoch(epoch, first_step), start=first_step):
        x, y = to_device(raw, torch.device("cpu"), normalizer_of(stream.source))
        if disturb:  # what a model's dropout / drop path or a method would consume between batches
            torch.rand(1000), random.random(), np.random.rand(7)
        out.append(aug.batch(x, y, seed=mix_seed(3, epoch, i)))
    return out


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(p.x, q.x) and torch.equal(p.targets, q.targets) for p, q in zip(a, b))


@pytest.mark.parametrize("augment", ["weak", "strong"])
def test_stream_is_a_function_of_seed_epoch_and_position(augment):
    src, aug = _source(augment)
    ref = _batches(src, aug)
    torch.manual_seed(123), random.seed(5), np.random.seed(9)  # other global states: the stream does not care
    assert _equal(ref, _batches(src, aug, disturb=True)), "randomness consumed by the model or method changes nothing"
    assert _equal(ref, _batches(src, aug, workers=2)), "loader workers change nothing"
    persistent = TrainStream(src, 64, 3, 0, 1, 2, False)  # one loader, its workers kept across epochs
    assert _equal(_batches(src, aug, epoch=1), _batches(src, aug, epoch=1, stream=persistent))
    assert _equal(ref, _batches(src, aug, stream=persistent)), "a persistent loader's next epoch is that epoch"
    assert _equal(ref[3:], _batches(src, aug, first_step=3)), "an epoch resumed at step 3 continues the same stream"
    assert not torch.equal(ref[0].x, _batches(src, aug, epoch=1)[0].x), "another epoch is another draw"


def test_stream_leaves_the_callers_generators_alone():
    src, aug = _source("strong")
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    _batches(src, aug)
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random() and after[2] == np.random.rand()


def _train(tmp: Path, name: str, *extra: str) -> dict:
    from mkd.train import train

    cfg = load_config(overrides=["epochs=2", "batch_size=64", "augment=strong", "log_every=5", "input_cache=on",
                                 "holdout=all", *TINY, *extra])  # holdout=all: every method on one stream
    return train(cfg, tmp / "runs" / name, quiet=True)


def _same_run(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(d / "model.pt", map_location="cpu")["model"] for d in (a, b))
    ra, rb = ([{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (a, b))
    return all(torch.equal(wa[k], wb[k]) for k in wa) and ra == rb


@pytest.mark.slow
def test_cached_runs_equal_uncached_ones_for_every_method(tmp_path, teacher_ckpt):
    teacher = shutil.copytree(teacher_ckpt.parent, tmp_path / "teacher")  # a private teacher cache
    t = ["teacher=emb_vit_m", f"teacher_checkpoint={teacher / 'model.pt'}"]
    off = ["teacher_cache=off", "input_cache=off"]
    first = _train(tmp_path, "kd", "method=kd", *t)
    assert first["stream_cache"] == {"inputs_read": 0, "inputs_written": 2, "teacher_read": 0, "teacher_written": 2}
    again = _train(tmp_path, "kd_again", "method=kd", "log_every=7", *t)  # log_every: another run id, same stream
    assert again["stream_cache"]["teacher_read"] == 2 and again["stream_cache"]["inputs_read"] == 2
    _train(tmp_path, "kd_off", "method=kd", *t, *off)
    assert _same_run(tmp_path / "runs" / "kd", tmp_path / "runs" / "kd_again"), "kd: cache read == computed"
    assert _same_run(tmp_path / "runs" / "kd", tmp_path / "runs" / "kd_off"), "kd: cache == no cache, bitwise"
    mkd = _train(tmp_path, "mkd", "method=mkd", "mkd.meta_interval=2", *t)  # another method reads kd's cache
    assert mkd["stream_cache"]["teacher_read"] == 2
    _train(tmp_path, "mkd_off", "method=mkd", "mkd.meta_interval=2", *t, *off)
    assert _same_run(tmp_path / "runs" / "mkd", tmp_path / "runs" / "mkd_off")
    other_seed = _train(tmp_path, "kd_seed1", "method=kd", "seed=1", *t)
    assert other_seed["stream_cache"]["teacher_read"] == 0, "another seed is another stream"


def test_a_cache_file_of_another_key_or_a_damaged_one_is_never_read(tmp_path):
    said = []
    a = EpochFiles(tmp_path, {"teacher_weights": "aaa", "seed": 0}, say=said.append)
    assert a.write(0, {"logits": torch.ones(2, 3)}) and not a.write(0, {"logits": torch.zeros(2, 3)})
    assert torch.equal(a.read(0)["logits"], torch.ones(2, 3))
    b = EpochFiles(tmp_path, {"teacher_weights": "bbb", "seed": 0}, say=said.append)
    assert b.dir != a.dir and b.read(0) is None
    b.dir.mkdir()
    shutil.copy(a.path(0), b.path(0))  # a file copied by hand under another key's folder
    assert b.read(0) is None and "key mismatch" in said[-1]
    data = a.path(0).read_bytes()
    a.path(0).write_bytes(data[: len(data) // 2])
    assert a.read(0) is None and "damaged" in said[-1]
    assert not a.path(0).exists() and list(a.dir.glob("*.damaged.*")), "moved aside, not deleted"


def test_topk_is_exact_with_every_class_and_keeps_the_mass_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=g) * 3
    assert torch.equal(topk_expand(topk_compress(logits, 50), 50), logits)
    approx = topk_expand(topk_compress(logits, 5), 50)
    p, q = logits.softmax(-1), approx.softmax(-1)
    top = logits.topk(5, -1).indices
    assert torch.allclose(p.gather(-1, top), q.gather(-1, top), atol=1e-6), "the top-k probabilities are exact at T=1"
    assert torch.equal(approx.topk(5, -1).indices, top)
    assert torch.allclose(q.sum(-1), torch.ones(8))


def test_plan_names_one_producer_per_stream_and_the_others_wait(tmp_path):
    from mkd.suites import expand

    plan = expand("degradation", axes={"seed": [0, 1]}, results=tmp_path, tune=False)
    by_id = {r.run_id: r for r in plan.students}
    t_producers = {r.config.teacher_stream_key(): r for r in plan.students
                   if r.config.uses_teacher and (r.after is None or by_id[r.after].config.teacher != r.config.teacher)}
    assert len(t_producers) == 2 * 2 * 2, "one per (teacher, augmentation, seed)"
    assert all(r.config.method == "kd" for r in t_producers.values()), "the cheapest method fills the cache"
    for r in plan.students:
        if r.after:
            p = by_id[r.after]
            assert p.config.stream_key() == r.config.stream_key() and p.after != r.run_id
            assert plan.students.index(p) < plan.students.index(r)
    assert sum(r.after is None for r in plan.students) == 2 * 2, "one data producer per (augmentation, seed)"
    assert not any(r.after for r in expand("degradation", results=tmp_path, tune=False,
                                           overrides={"teacher_cache": False, "input_cache": "off"}).students)


@pytest.mark.parametrize("augment", ["weak", "strong"])
def test_uint8_batches_normalised_and_erased_on_the_device_are_bitwise_the_per_image_transform(augment):
    """The workers ship uint8 images and the erasing boxes; the device converts, normalises and pastes them:
    bitwise timm's per-image transform (RandomErasing included) under the same per-sample seeds."""
    from mkd.stream import StreamSource, isolated_rng, normalizer_of, seed_globals, stream_seed, to_device

    src, _ = _source(augment)
    ds = StreamSource(src.base, src.indices, src.transform, 3)
    positions = list(range(0, 64, 3))
    raw = ds.__getitems__([(0, i, 0) for i in positions])
    assert raw[0].dtype == torch.uint8
    x, y = to_device(raw, torch.device("cpu"), normalizer_of(ds))
    erased = 0
    for k, i in enumerate(positions):
        with isolated_rng():
            seed_globals(stream_seed(3, 0, i, 1))
            img = src.base[int(src.indices[i])][0]
            ts = src.transform.transforms
            for t in ts[:-1] if augment == "strong" else ts:
                img = t(img)
            if augment == "strong":
                seed_globals(stream_seed(3, 0, i, 3))
                before = img.clone()
                img = ts[-1](img)  # timm's RandomErasing, applied as the per-image transform does
                erased += not torch.equal(before, img)
        assert torch.equal(x[k], img) and int(y[k]) == src.base.targets[int(src.indices[i])], (augment, i)
    assert (erased > 0) == (augment == "strong") and len(raw[2]) == erased, "every erased image came as a box"


def test_repeated_augmentation_repeats_each_image_with_other_draws_across_ranks():
    from mkd.data import epoch_order

    one = epoch_order(60, 12, seed=1, epoch=0, rank=0, world=1, repeats=3)
    assert len(one) == 60 and all(one[3 * j][0] == one[3 * j + 1][0] == one[3 * j + 2][0] for j in range(20))
    assert [r for _, r in one[:6]] == [0, 1, 2, 0, 1, 2]
    shards = [epoch_order(60, 12, 1, 0, r, 3, repeats=3) for r in range(3)]
    assert all(len({p for p, _ in s}) == len(s) for s in shards), "the repeats of an image land on other ranks"
    plain = epoch_order(60, 12, 1, 0, 0, 1)
    assert [p for p, _ in one[::3]] == [p for p, _ in plain][:20] and {r for _, r in plain} == {0}, \
        "an epoch of n samples: the first n/3 images of the permutation, three times each"
    src, aug = _source("weak")
    stream = TrainStream(src, 64, 3, 0, 1, 0, False, repeats=3)
    x8, labels, _ = next(stream.epoch(0))
    assert torch.equal(labels[0:63:3], labels[1:63:3]) and not torch.equal(x8[0], x8[1]), \
        "an image's repeats in one batch are augmented differently"
