"""The cifar and imagenet scales' code paths on CPU: generated CIFAR-100 files and a generated JPEG ImageFolder,
real suites through the local executor with loader workers (sizes reduced by --set, which reaches the teachers),
the teacher's own input normalisation, a compiled student whose masks the meta step replays."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import RUN, make_cifar100, make_image_folder, run_cli
from mkd.rundir import RunDir

CIFAR_SMOKE = ["--filter", "teacher=small", "--axis", "augment=strong", "--axis", "seed=0", "--axis", "method=ce,kd,mkd",
               "--set", "img_size=8", "--set", "epochs=1", "--set", "batch_size=64", "--set", "num_workers=2",
               "--set", "eval_every=1"]


def _runs(results: Path, suite: str, scale: str) -> dict[str, RunDir]:
    out = {}
    for d in [*(results / suite / scale).glob("*/"), *(results / "teachers" / scale).glob("*/")]:
        if (d / "run.json").exists():
            info = json.loads((d / "run.json").read_text())
            out[info["method"]["name"] if info["kind"] == "student" else "teacher"] = RunDir(d)
    return out


def _config(run: RunDir) -> dict:
    import yaml

    return yaml.safe_load(run.config.read_text())


def check_cifar_smoke(results: Path) -> None:
    """What a first cluster run of the cifar scale must show (local executor and Slurm alike)."""
    runs = _runs(results, "degradation", "cifar")
    assert set(runs) == {"teacher", "ce", "kd", "mkd"}
    assert all(r.state() == "done" for r in runs.values()), {k: r.state() for k, r in runs.items()}
    t = _config(runs["teacher"])
    assert (t["epochs"], t["batch_size"], t["warmup_epochs"], t["img_size"]) == (1, 64, 10.0, 8), \
        "--set reaches the teacher, which trains with the scale's batch and warmup"
    res = {k: r.read_result() for k, r in runs.items()}
    assert res["ce"]["train_images"] == res["kd"]["train_images"] == 800, "non-meta methods: the whole training set"
    assert (res["mkd"]["train_images"], res["mkd"]["meta_images"]) == (700, 100), "MKD: 1 image per class held out"
    assert _config(runs["kd"])["num_workers"] == 2
    assert (Path(runs["teacher"].path) / "teacher_cache").is_dir(), "the cifar scale caches the teacher's logits"


@pytest.mark.slow
def test_cifar_scale_suite_through_the_local_executor_with_loader_workers(tmp_path):
    """The pool's workers are spawned and so are their DataLoader workers: the CIFAR-100 dataset must pickle."""
    data = make_cifar100(tmp_path / "cifar")
    p = run_cli(RUN, "--suite", "degradation", "--scale", "cifar", "--data-root", str(data), "--results",
                str(tmp_path / "results"), "--max-parallel", "2", *CIFAR_SMOKE)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    check_cifar_smoke(tmp_path / "results")


@pytest.mark.slow
def test_imagenet_scale_suite_on_a_jpeg_folder_with_a_local_pretrained_teacher(tmp_path):
    """The imagenet scale's pretrained teacher from a local checkpoint (no hub at test time), JPEG decoding in
    loader workers, repeated augmentation, its teacher cache off by default."""
    from mkd.models import create_model

    data = make_image_folder(tmp_path / "imagenet")
    ckpt = tmp_path / "deit3_small.pth"
    teacher = create_model("deit3_small_patch16_224.fb_in1k", 4, 32)  # the suite's small teacher (DeiT III)
    torch.save({"model": teacher.state_dict()}, ckpt)
    p = run_cli(RUN, "--suite", "degradation", "--scale", "imagenet", "--data-root", str(data), "--results",
                str(tmp_path / "results"), "--max-parallel", "2", "--teacher-checkpoint", f"small={ckpt}",
                "--filter", "teacher=small", "--axis", "augment=strong", "--axis", "seed=0", "--axis", "method=kd,mkd",
                "--set", "img_size=32", "--set", "epochs=1", "--set", "batch_size=16", "--set", "num_workers=2",
                "--set", "eval_every=1", "--set", "mkd.meta_batch_size=8")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = _runs(tmp_path / "results", "degradation", "imagenet")
    assert all(r.state() == "done" for r in runs.values()) and set(runs) == {"teacher", "kd", "mkd"}
    t, kd = _config(runs["teacher"]), _config(runs["kd"])
    assert t["student_input"] == "model" and t["init_checkpoint"] == str(ckpt) and t["epochs"] == 0
    assert kd["teacher_input"] == "model" and kd["repeated_aug"] == 3
    res = runs["kd"].read_result()
    assert res["train_images"] == 96 and res["teacher_top1"] is not None
    assert not (runs["teacher"].path / "teacher_cache").exists(), "no teacher cache at the imagenet scale"


def test_a_pretrained_teacher_gets_its_own_normalisation_on_the_device():
    from mkd.augment import InputConfig, model_input_config, renormalizer
    from mkd.config import load_config
    from mkd.engine import build_models
    from mkd.methods import build_method

    from mkd.models import create_model

    # the augreg ViTs' pretrained config (mean = std = 0.5, crop 0.9): ViT-Ti's, built on the CPU in a second,
    # is ViT-L's (building ViT-L on the meta device fails under older torch releases)
    vit_l = create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", 1000, 224)
    imagenet = InputConfig((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875)
    own = model_input_config(vit_l, imagenet)
    assert (own.mean, own.std, own.crop_pct) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9), "timm's pretrained config"
    assert renormalizer(imagenet, imagenet) is None
    a, b = renormalizer(imagenet, own)
    raw = torch.rand(2, 3, 4, 4)
    student_x = (raw - torch.tensor(imagenet.mean).view(1, 3, 1, 1)) / torch.tensor(imagenet.std).view(1, 3, 1, 1)
    teacher_x = (raw - 0.5) / 0.5
    assert torch.allclose(student_x * a + b, teacher_x, atol=1e-6)

    seen = []
    teacher = torch.nn.Identity()
    teacher.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    cfg = load_config(overrides=["method=kd", "teacher=emb_vit_m", "teacher_checkpoint=x", "compile=off"])
    student = torch.nn.Linear(2, 2)
    models = build_models(cfg, student, teacher, build_method(cfg, 2), torch.device("cpu"), renorm=(a, b))
    models.teacher_fwd(student_x)
    assert torch.allclose(seen[0], teacher_x, atol=1e-6), "the teacher sees its own normalisation"


@pytest.mark.slow
def test_a_compiled_student_replays_its_drop_path_masks_in_the_meta_step():
    """compile=on: the compiled forward's random ops draw from the eager generator (fallback_random, set for this
    compile only), so the meta step's eager replay of the step's RNG state gives the same masks."""
    import torch._inductor.config as inductor

    from mkd.config import load_config
    from mkd.engine import build_models
    from mkd.meta import capture_rng, replayed_rng
    from mkd.methods import build_method
    from mkd.models import create_model

    cfg = load_config(overrides=["method=mkd", "teacher=emb_vit_m", "teacher_checkpoint=x", "compile=on",
                                 "drop_path=0.3"])
    torch.manual_seed(0)
    student = create_model("emb_vit_s", 20, 16, drop_path=0.3).train()
    models = build_models(cfg, student, None, build_method(cfg, 20), torch.device("cpu"))
    assert models.model is not student and inductor.fallback_random is False, "scoped to this compile"
    x = torch.randn(8, 3, 16, 16)
    models.model(x)  # compile
    rng = capture_rng("cpu")
    compiled = models.model(x)
    with replayed_rng(rng, "cpu"):
        eager = student(x)
    other = student(x)  # the generator has moved on: other masks
    assert torch.allclose(compiled, eager, atol=1e-5), (compiled - eager).abs().max()
    assert not torch.allclose(compiled, other, atol=1e-3), "drop path draws masks (the check is not vacuous)"


def test_cifar_resnets_keep_the_cifar_stem_resolution():
    """``cifar_resnetN``: timm's ResNet with a 3x3 stride-1 stem and no max pool, so 32 px ends at 4x4 maps (the
    ImageNet stem would leave 1x1), with timm's own weights and blocks otherwise."""
    import torch

    from mkd.models import create_model

    m = create_model("cifar_resnet18", 100, 32).eval()
    assert m.forward_features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)
    assert create_model("resnet18", 100, 32).eval().forward_features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (1, 1)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
