"""Datasets, fractions, the meta split and augmentation presets."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY, assert_user_error, cli_error, run_cli
from mkd.augment import build_augment
from mkd.config import EmbeddedConfig, load_config
from mkd.data import (Transformed, embedded_arrays, epoch_order, load_base, load_or_make_split, make_split)
from mkd.errors import UserError


def test_embedded_identical_for_equal_seeds_and_different_otherwise(tmp_path, monkeypatch):
    cfg = EmbeddedConfig(train_per_class=20, val_per_class=5, seed=3)
    a = embedded_arrays(cfg)
    monkeypatch.setenv("MKD_CACHE", str(tmp_path))  # regenerate from scratch, not from the cache
    b = embedded_arrays(cfg)
    c = embedded_arrays(EmbeddedConfig(train_per_class=20, val_per_class=5, seed=4))
    for k in ("x_train", "y_train", "x_val", "y_val"):
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["x_train"], c["x_train"])
    assert a["x_train"].shape == (20 * 20, 16, 16, 3) and a["x_train"].dtype == np.uint8
    assert np.bincount(a["y_train"]).tolist() == [20] * 20
    assert not np.array_equal(a["x_train"][:100], a["x_val"][:100])  # separate sample streams


def test_embedded_default_is_generated_once_then_read_from_the_cache(tmp_path, monkeypatch):
    import mkd.data as data

    monkeypatch.setenv("MKD_CACHE", str(tmp_path))
    first = embedded_arrays(EmbeddedConfig())
    assert list((tmp_path / "embedded").glob("*.npz")), "generated data is cached on disk"
    monkeypatch.setattr(data, "_generate", lambda *a, **k: pytest.fail("regenerated instead of read from the cache"))
    again = embedded_arrays(EmbeddedConfig())
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)


def test_fractions_are_class_balanced_nested_deterministic_and_disjoint_from_meta():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 50)[rng.permutation(500)]
    prev = None
    for f in (0.1, 0.25, 0.5, 1.0):
        s = make_split(labels, f, 0.1, seed=7)
        counts = np.bincount(labels[s["train"]], minlength=10)
        assert counts.min() == counts.max() == round(f * 45), (f, counts)
        assert np.bincount(labels[s["meta"]], minlength=10).tolist() == [5] * 10
        assert not set(s["train"]) & set(s["meta"])
        assert np.array_equal(s["train"], make_split(labels, f, 0.1, seed=7)["train"])
        if prev is not None:
            assert set(prev) <= set(s["train"]), "subsets are nested across fractions"
        prev = s["train"]
        meta0 = s["meta"]
    assert np.array_equal(make_split(labels, 0.1, 0.1, 7)["meta"], meta0), "meta split does not depend on the fraction"
    assert not np.array_equal(make_split(labels, 0.5, 0.1, 8)["train"], make_split(labels, 0.5, 0.1, 7)["train"])


def test_split_file_is_written_and_reused(tmp_path):
    cfg = load_config(overrides=["fraction=0.5", *TINY])
    train, _, _ = load_base(cfg)
    a = load_or_make_split(tmp_path / "split.npz", train.targets, cfg)
    cfg2 = load_config(overrides=["fraction=0.25", "split_seed=5", *TINY])
    b = load_or_make_split(tmp_path / "split.npz", train.targets, cfg2)
    assert np.array_equal(a["train"], b["train"]), "a run's split file wins over a new draw"
    with pytest.raises(UserError, match="made for"):
        load_or_make_split(tmp_path / "split.npz", train.targets[:100], cfg)


def test_epoch_order_shards_reassemble_the_global_batches():
    one = epoch_order(100, 8, seed=1, epoch=3, rank=0, world=1)
    r0 = epoch_order(100, 8, seed=1, epoch=3, rank=0, world=2)
    r1 = epoch_order(100, 8, seed=1, epoch=3, rank=1, world=2)
    for b in range(len(one) // 8):
        assert sorted(one[b * 8:(b + 1) * 8]) == sorted(r0[b * 4:(b + 1) * 4] + r1[b * 4:(b + 1) * 4])
    assert epoch_order(100, 8, 1, 4, 0, 1) != one


def _write_jpeg_tree(root, classes=("cat", "dog", "eel"), n=4, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(d / f"{i}.jpg")


def test_imagefolder_loading_with_deit_eval_transform(tmp_path):
    _write_jpeg_tree(tmp_path)
    cfg = load_config(overrides=["dataset=imagenet", f"data_root={tmp_path}", "img_size=32"])
    train, val, info = load_base(cfg)
    assert info.num_classes == 3 and len(train) == 12 and len(val) == 12 and info.crop_pct == 0.875
    aug = build_augment("weak", info.img_size, info.mean, info.std, info.num_classes, info.crop_pct, info.crop_scale)
    x, y = Transformed(val, None, aug.eval_transform)[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert "Resize" in str(aug.eval_transform) and "CenterCrop" in str(aug.eval_transform)


def _write_fake_cifar100(root, n_train=60, n_test=20):
    rng = np.random.default_rng(0)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 100).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "fine_labels": labels,
                         "coarse_labels": [l // 5 for l in labels], "filenames": [f"{i}.png" for i in range(n)]}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f)


def test_cifar100_from_files_in_cifar_format(tmp_path):
    _write_fake_cifar100(tmp_path)
    cfg = load_config(overrides=["dataset=cifar100", f"data_root={tmp_path}", "meta_split=0"])
    train, val, info = load_base(cfg)
    assert (len(train), len(val), info.num_classes, info.img_size) == (60, 20, 100, 32)
    img, y = train[7]
    assert img.size == (32, 32) and y == 7


@pytest.mark.parametrize("name", ["none", "weak", "medium", "strong"])
def test_augment_presets_shapes_dtypes_and_targets(name):
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY)
    train, _, info = load_base(cfg)
    aug = build_augment(name, info.img_size, info.mean, info.std, info.num_classes, info.crop_pct, info.crop_scale)
    ds = Transformed(train, range(16), aug.train_transform)
    x = torch.stack([ds[i][0] for i in range(16)])
    y = torch.tensor([ds[i][1] for i in range(16)])
    assert x.shape == (16, 3, 16, 16) and x.dtype == torch.float32
    b = aug.batch(x.clone(), y)  # timm mixes in place
    xm, t = b.x, b.targets
    assert xm.shape == x.shape and torch.equal(b.labels, y)
    if name == "strong":  # class distributions: mixed and smoothed
        assert t.shape == (16, info.num_classes) and t.dtype == torch.float32
        from timm.data.mixup import mixup_target

        assert torch.equal(b.labels_b, y.flip(0)) and 0 <= b.lam <= 1, "image i is mixed with image 15 - i"
        assert torch.allclose(t, mixup_target(y, info.num_classes, b.lam, 0.1)), "targets from the hard labels"
        ref = aug.mixup.__class__(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                                  label_smoothing=0.1, num_classes=info.num_classes)
        for seed in range(6):  # bitwise timm's Mixup.__call__ under the same draw, CutMix and Mixup alike
            ours = aug.batch(x.clone(), y, seed=seed)
            from mkd.stream import isolated_rng, seed_globals

            with isolated_rng():
                seed_globals(seed)
                tx, tt = ref(x.clone(), y)
            assert torch.equal(ours.x, tx) and torch.equal(ours.targets, tt)
        assert torch.allclose(t.sum(-1), torch.ones(16), atol=1e-5)
        assert aug.mixup is not None and not torch.equal(xm, x), "mixup/cutmix changes the batch"
        assert (t > 0.5).sum() < 16 or (t.max(-1).values < 0.95).all(), "targets are mixed and smoothed"
        assert "RandAugment" in str(aug.train_transform) and "RandomErasing" in str(aug.train_transform)
        with pytest.raises(UserError, match="even batch"):
            aug.batch(x[:3], y[:3])
    else:  # neither mixed nor smoothed: class indices, the fast cross-entropy path
        assert aug.mixup is None and t.dtype == torch.long and torch.equal(t, y) and b.labels_b is None
        assert torch.allclose(F.cross_entropy(torch.zeros(16, 20), t), F.cross_entropy(torch.zeros(16, 20), F.one_hot(t, 20).float()))
    if name == "medium":
        assert "RandAugment" in str(aug.train_transform)
    if name == "none":
        assert torch.equal(x, torch.stack([Transformed(train, range(16), aug.eval_transform)[i][0] for i in range(16)]))


def test_randaugment_survives_posterize_zero_bits():
    """Pillow >= 12 rejects posterize(bits=0), which timm's rand-m9-mstd0.5-inc1 can emit."""
    from timm.data.auto_augment import NAME_TO_OP

    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(NAME_TO_OP["PosterizeIncreasing"](img, 0)).max() == 0


@pytest.mark.parametrize("args,fragments", [
    (["dataset=cifar100", "data_root=/nonexistent/cifar"], ["CIFAR-100 not found", "data_root"]),
    (["dataset=imagenet"], ["needs data_root"]),
    (["fraction=1.5"], ["fraction", "(0, 1]"]),
    (["meta_split=0.99", "holdout=all", *TINY], ["meta_split=0.99", "smaller meta_split"]),
    (["augment=strongest"], ["augment", "strong"]),
])
def test_bad_data_input_is_one_clear_line(tmp_path, args, fragments, capsys):
    from mkd.train import main

    cli_error(main, ["--out", str(tmp_path / "run"), "epochs=1", *args], capsys, *fragments)


@pytest.mark.slow
def test_bad_data_input_in_a_real_process_has_no_traceback(tmp_path):
    assert_user_error(run_cli("-m", "mkd.train", "--out", str(tmp_path / "run"), "dataset=imagenet",
                              f"data_root={tmp_path / 'nope'}"), "not found", "train/ and val/")


def test_meta_batches_stream_and_tensor_paths_agree_and_shard_like_one_process():
    from mkd.data import MetaBatches

    ds = [(torch.full((3, 2, 2), float(i)), i) for i in range(50)]
    tensors = (torch.stack([a for a, _ in ds]), torch.tensor([b for _, b in ds]))
    cpu = torch.device("cpu")
    one = MetaBatches(ds, tensors, 8, 0, 0, 1, cpu)
    streamed = MetaBatches(ds, None, 8, 0, 0, 1, cpu, num_workers=1)
    shards = [MetaBatches(ds, tensors, 8, 0, r, 2, cpu) for r in (0, 1)]
    for epoch in range(2):
        for mb in (one, streamed, *shards):
            mb.set_epoch(epoch)
        for _ in range(3):
            x, y = one.next()
            xs, ys = streamed.next()
            assert torch.equal(x, xs) and torch.equal(y, ys)
            assert sorted(torch.cat([s.next()[1] for s in shards]).tolist()) == sorted(y.tolist())


def test_holdout_meta_trains_other_methods_on_the_whole_set_and_all_is_the_controlled_variant():
    teacher = ["teacher=emb_vit_m", "teacher_checkpoint=x", *TINY]
    kd, mkd = (load_config(overrides=[f"method={m}", *teacher]) for m in ("kd", "mkd"))
    kd_all = load_config(overrides=["method=kd", "holdout=all", *teacher])
    assert (kd.held_out, mkd.held_out, kd_all.held_out) == (0.0, 0.1, 0.1)
    assert kd.stream_key() != mkd.stream_key() == kd_all.stream_key(), "the controlled variant shares MKD's stream"
    labels = np.repeat(np.arange(20), 40)
    whole, carved = make_split(labels, 1.0, kd.held_out, 0), make_split(labels, 1.0, mkd.held_out, 0)
    assert len(whole["train"]) == 800 and len(whole["meta"]) == 0
    assert len(carved["meta"]) == 80 and sorted(np.concatenate([carved["train"], carved["meta"]])) == list(range(800))
    quarter = make_split(labels, 0.25, 0.0, 0)["train"]
    assert set(carved["meta"]) <= set(make_split(labels, 0.1, 0.0, 0)["train"]) and len(quarter) == 200, \
        "the meta split is the start of each class's permutation, which every fraction's subset also starts with"
