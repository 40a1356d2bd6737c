"""Students and teachers by timm name; tiny ViT presets for the embedded scale; checkpoint loading.

A preset is just a timm architecture plus keyword arguments, so everything timm offers (drop path,
distillation tokens, ``fused_attn``) works the same for presets and for full-size models.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

from .errors import UserError, suggest

_VIT = "vit_tiny_patch16_224"
_DEIT_DISTILLED = "deit_tiny_distilled_patch16_224"
PRESETS: dict[str, tuple[str, dict]] = {
    # embedded scale (16 px, 4 px patches -> 16 tokens); the capacity ladder of the degradation suite
    "emb_vit_s": (_VIT, dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)),
    "emb_vit_m": (_VIT, dict(patch_size=4, embed_dim=48, depth=3, num_heads=3)),
    "emb_vit_l": (_VIT, dict(patch_size=4, embed_dim=64, depth=4, num_heads=4)),
    "emb_vit_xl": (_VIT, dict(patch_size=4, embed_dim=96, depth=4, num_heads=4)),
    # the student with a DeiT distillation token and head
    "emb_deit_s_distilled": (_DEIT_DISTILLED, dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)),
    # a BatchNorm CNN at the embedded scale (checks the meta path on buffers; any timm CNN works the same)
    "emb_resnet": ("resnet10t", dict(stem_width=8, channels=(16, 32, 64, 128), zero_init_last=False)),
    # the gap_ladder suite's tiny teachers: the student's BatchNorm ResNet, ever wider (0.7M to 4.9M parameters;
    # at 16 px wider beats deeper: a resnet18/34 of these widths trained worse than the resnet10t)
    "emb_resnet_m": ("resnet10t", dict(stem_width=16, channels=(24, 48, 96, 192), zero_init_last=False)),
    "emb_resnet_l": ("resnet10t", dict(stem_width=16, channels=(32, 64, 128, 256), zero_init_last=False)),
    "emb_resnet_xl": ("resnet10t", dict(stem_width=24, channels=(48, 96, 192, 384), zero_init_last=False)),
    "emb_resnet_xxl": ("resnet10t", dict(stem_width=32, channels=(64, 128, 256, 512), zero_init_last=False)),
    # CIFAR-100 ResNets: timm's ResNets with the CIFAR stem (a 3x3 stride-1 convolution, no max pool: He et al.'s
    # CIFAR setting, and that of the CIFAR ResNets the distillation papers train), so 32 px keeps 4x4 maps at the end
    **{f"cifar_resnet{d}": (f"resnet{d}", dict(_stem="cifar")) for d in (18, 34, 50, 101, 152)},
    # CIFAR scale (32 px, 4 px patches -> 64 tokens): ViT-T/S/B/L widths at CIFAR resolution
    "cifar_vit_t": (_VIT, dict(patch_size=4, embed_dim=192, depth=12, num_heads=3)),
    "cifar_vit_s": (_VIT, dict(patch_size=4, embed_dim=384, depth=12, num_heads=6)),
    "cifar_vit_b": (_VIT, dict(patch_size=4, embed_dim=768, depth=12, num_heads=12)),
    "cifar_vit_l": (_VIT, dict(patch_size=4, embed_dim=1024, depth=24, num_heads=16)),
}


def _known_names() -> list[str]:
    return list(PRESETS) + timm.list_models()


def resolve(name: str) -> tuple[str, dict]:
    """(timm architecture, preset kwargs) for a preset or timm name; unknown names suggest close ones."""
    if name in PRESETS:
        arch, kw = PRESETS[name]
        return arch, dict(kw)
    if timm.is_model(name.split(".")[0]):
        return name, {}
    raise UserError(f"unknown model '{name}'{suggest(name, _known_names())}: use a preset "
                    f"({', '.join(PRESETS)}) or a timm name (timm.list_models('vit*'))")


def create_model(name: str, num_classes: int, img_size: Optional[int] = None, pretrained: bool = False,
                 drop_path: float = 0.0, **kwargs) -> nn.Module:
    """``timm.create_model`` for a preset or timm name, sized to the dataset."""
    arch, kw = resolve(name)
    kw.update(kwargs)
    kw["num_classes"] = num_classes
    stem = kw.pop("_stem", None)
    if drop_path:
        kw["drop_path_rate"] = drop_path
    if img_size:
        kw.setdefault("img_size", img_size)
    try:
        try:
            model = timm.create_model(arch, pretrained=pretrained, **kw)
        except TypeError as e:  # CNNs take no img_size
            if "img_size" not in str(e):
                raise
            kw.pop("img_size")
            model = timm.create_model(arch, pretrained=pretrained, **kw)
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            raise UserError(f"could not get pretrained weights for '{name}' ({type(e).__name__}; offline?): "
                            "pass a local checkpoint instead (teacher_checkpoint=PATH)") from None
        raise UserError(f"could not build model '{name}' with {kw}: {e}") from None
    if stem == "cifar":
        _cifar_stem(model)
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # train-mode forward returns (cls, dist) logits
    return model


def _cifar_stem(model: nn.Module) -> None:
    """Replace a timm ResNet's stride-4 stem (7x7/2 convolution, 3x3/2 max pool) by one 3x3 stride-1 convolution."""
    width = model.conv1.out_channels
    model.conv1 = nn.Conv2d(model.conv1.in_channels, width, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's ResNet init
    model.maxpool = nn.Identity()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from a DeiT/timm checkpoint (``model``/``state_dict``/``model_ema`` key) or a raw state dict."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} not found: check the path (teacher_checkpoint=PATH)")
    try:
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # DeiT checkpoints pickle their argparse namespace; the user chose this file
            ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {p} could not be read ({type(e).__name__}): is it a torch checkpoint?") from None
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UserError(f"checkpoint {p} holds no state dict (looked at 'model', 'state_dict', 'model_ema')")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt.items()}


def load_weights(model: nn.Module, path: str | os.PathLike, what: str = "teacher") -> None:
    """Load ``path`` into ``model``; a class-count or shape mismatch is a clear user error."""
    state = read_state_dict(path)
    own = model.state_dict()
    head = getattr(model, "default_cfg", {}).get("classifier", "head")
    head = head[0] if isinstance(head, (list, tuple)) else head
    hw = f"{head}.weight"
    if hw in state and hw in own and state[hw].shape[0] != own[hw].shape[0]:
        raise UserError(f"{what} checkpoint {path} has {state[hw].shape[0]} classes but the dataset has "
                        f"{own[hw].shape[0]}: use a checkpoint trained on this dataset")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {bad[0]}: {tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}")
        raise UserError(f"{what} checkpoint {path} does not fit the model ({detail}): "
                        f"check the {what} name and its kwargs")
    model.load_state_dict(state)


def build_teacher(name: str, num_classes: int, img_size: int, checkpoint: Optional[str], pretrained: bool,
                  **kwargs) -> nn.Module:
    """A frozen teacher in eval mode, from a local checkpoint or (online) timm pretrained weights."""
    if not checkpoint and not pretrained:
        raise UserError(f"teacher '{name}' has no weights: set teacher_checkpoint=PATH "
                        "(or teacher_pretrained=true when online)")
    model = create_model(name, num_classes, img_size, pretrained=pretrained and not checkpoint, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint, "teacher")
    elif getattr(model, "num_classes", num_classes) != num_classes:
        raise UserError(f"pretrained teacher '{name}' has {model.num_classes} classes, the dataset {num_classes}: "
                        "use a teacher_checkpoint trained on this dataset")
    model.eval().requires_grad_(False)
    return model


def teacher_eval_cache(checkpoint: Optional[str], name: str, data_key: dict) -> Path:
    """Cache file of a teacher's validation top-1, keyed by the checkpoint file and the evaluation data."""
    ident: dict = {"name": name, "data": data_key}
    if checkpoint:
        st = Path(checkpoint).stat()
        ident.update(path=str(Path(checkpoint).resolve()), size=st.st_size, mtime=int(st.st_mtime))
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    from .data import cache_dir

    return cache_dir() / "teacher_eval" / f"{key}.json"


def is_vit(model: nn.Module) -> bool:
    return any(hasattr(m, "fused_attn") for m in model.modules())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
