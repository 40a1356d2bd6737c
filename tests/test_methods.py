"""Every method as a loss object, and every method training on the embedded data."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from mkd.config import load_config
from mkd.losses import METHODS, build_method, kd_term, ce_loss


def test_kd_term_reduces_to_hinton_and_is_batchmean():
    torch.manual_seed(0)
    zs, zt = torch.randn(8, 10), torch.randn(8, 10)
    T = 3.0
    hinton = F.kl_div(F.log_softmax(zs / T, -1), F.softmax(zt / T, -1), reduction="batchmean") * T * T
    assert torch.allclose(kd_term(zs, zt, T, T), hinton, atol=1e-6)
    assert torch.allclose(kd_term(zs, zt, 2.0, 5.0, "none"),
                          F.kl_div(F.log_softmax(zs / 5, -1), F.softmax(zt / 2, -1), reduction="batchmean"), atol=1e-6)
    per = kd_term(zs, zt, torch.full((8,), 2.0), torch.full((8,), 2.0))
    assert torch.allclose(per, kd_term(zs, zt, 2.0, 2.0), atol=1e-6)


def test_hard_distillation_uses_the_distillation_head():
    cfg = load_config(overrides=["method=hard", "teacher=t"])
    m = build_method(cfg, 5)
    cls, dist, t = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    y = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    terms = m((cls, dist), t, y)
    assert torch.allclose(terms["hard"], F.cross_entropy(dist, t.argmax(-1)))
    assert torch.allclose(terms["ce"], ce_loss(cls, y))
    assert torch.allclose(terms["loss"], 0.5 * terms["ce"] + 0.5 * terms["hard"])


def test_ctkd_reverses_the_temperature_gradient_with_a_cosine_ramp():
    cfg = load_config(overrides=["method=ctkd", "teacher=t"])
    m = build_method(cfg, 5)
    assert m.temperatures()["tau_t"] == pytest.approx(4.0, rel=1e-3)
    m.on_step(0.0)
    assert m.lam == 0.0
    m.on_step(1.0)
    assert m.lam == pytest.approx(1.0)
    zs, zt = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5) * 3
    y = F.one_hot(torch.arange(6) % 5, 5).float()
    m(zs, zt, y)["kd"].backward()
    reversed_grad = m.p.grad.clone()
    m.p.grad = None
    m.lam = -1.0  # no reversal: plain gradient
    m(zs, zt, y)["kd"].backward()
    assert torch.allclose(reversed_grad, -m.p.grad)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_embedded_data_and_its_loss_falls(method, tmp_path, teacher_ckpt):
    from mkd.train import train

    args = [f"method={method}", "epochs=3", "lr=3e-3", "batch_size=64", "augment=none", "log_every=5", *TINY]
    if method != "ce":
        args += ["teacher=emb_vit_m", f"teacher_checkpoint={teacher_ckpt}"]
    res = train(load_config(overrides=args), tmp_path, quiet=True)
    rec = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert res["status"] == "done" and len(rec) == 3
    assert rec[-1]["train_loss"] < rec[0]["train_loss"], rec
    assert set(rec[0]) >= {"ce", "train_loss", "top1", "top5", "lr", "seconds"}
    if method != "ce":
        assert res["teacher_top1"] is not None and res["teacher_top1"] > 100 / 20
    if method in ("mkd", "ctkd"):
        assert rec[0]["temps"] and len(rec[0]["temps"][0]) == 3, "step-level temperature samples"
