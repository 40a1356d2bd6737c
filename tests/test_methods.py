"""Every method as a loss object, and every method training on the embedded data."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from mkd.config import load_config
from mkd.methods import build_method, names
from mkd.batch import Batch
from mkd.methods.common import ce_loss, kd_term


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
    terms = m((cls, dist), Batch(None, y, teacher_logits=t))
    assert torch.allclose(terms["hard"], F.cross_entropy(dist, t.argmax(-1)))
    assert torch.allclose(terms["ce"], ce_loss(cls, y))
    assert torch.allclose(terms["loss"], 0.5 * terms["ce"] + 0.5 * terms["hard"])


def _official_ctkd_strength(epoch: int, decay_loops: float) -> float:
    """github zhengli97/CTKD train_student.py: CosineDecay(max_value=0, min_value=-1, num_loops=decay_loops)
    .get_value(epoch), epochs counted from 1; the reversal layer multiplies the gradient by that (negative) value."""
    i = min(max(epoch, 0), decay_loops)
    value = (math.cos(i * math.pi / decay_loops) + 1.0) * 0.5 * (0 - (-1)) + (-1)
    return -value


@pytest.mark.parametrize("epochs,loops", [(240, 10), (120, 5)])  # the official lengths (short runs: test_rivals.py)
def test_ctkd_reversal_strength_follows_the_official_per_epoch_schedule(epochs, loops):
    from mkd.methods import Progress
    from mkd.methods.ctkd import ctkd_lambda

    spe = 7
    for e in range(epochs):  # every step of 1-based epoch e+1 has the official value of that epoch
        for s in (0, spe - 1):
            lam = ctkd_lambda(Progress(e * spe + s, spe, epochs * spe), 1.0, 1 / 24, "epoch")
            assert lam == pytest.approx(_official_ctkd_strength(e + 1, loops), abs=1e-12), (e, s)
    if epochs == 240:  # values quoted in the README and the fidelity issue
        assert ctkd_lambda(Progress(4 * spe, spe, 240 * spe), 1.0, 1 / 24, "epoch") == pytest.approx(0.5)
        assert ctkd_lambda(Progress(0, spe, 240 * spe), 1.0, 1 / 24, "epoch") == pytest.approx(0.02447, abs=1e-5)


def test_ctkd_starts_at_the_official_temperature_and_keeps_the_earlier_variant():
    cfg = load_config(overrides=["method=ctkd", "teacher=t"])
    m = build_method(cfg, 5)
    assert m.temperatures()["tau_t"] == pytest.approx(1 + 20 / (1 + math.exp(-1)), abs=1e-5)  # 15.6193
    assert m.train_parameters() == [] and m.opt is not None  # its own SGD, not the student's AdamW
    old = build_method(load_config(overrides=["method=ctkd", "teacher=t", "ctkd.init=kd", "ctkd.optimizer=student",
                                              "ctkd.schedule=step", "ctkd.ramp=0.2"]), 5)
    assert old.temperatures()["tau_t"] == pytest.approx(4.0, rel=1e-3) and old.train_parameters() == [old.p]


def test_ctkd_reverses_the_gradient_and_its_sgd_step_scales_with_lambda():
    from mkd.methods import Progress, StepContext

    cfg = load_config(overrides=["method=ctkd", "teacher=t", "lr=0.01"])
    zs, zt = torch.randn(6, 5), torch.randn(6, 5) * 3
    y = F.one_hot(torch.arange(6) % 5, 5).float()
    moved = {}
    for lam in (0.1, 1.0):
        m = build_method(cfg, 5)
        m.lam = lam
        m(zs, Batch(None, y, teacher_logits=zt))["kd"].backward()
        g = m.p.grad.clone()
        m.lam = -1.0  # identity instead of reversal: the plain gradient, scaled by lambda above
        m.p.grad = None
        m(zs, Batch(None, y, teacher_logits=zt))["kd"].backward()
        assert torch.allclose(g, -lam * m.p.grad)
        m.p.grad = g
        p0 = float(m.p.detach())
        m.meta_step(StepContext(None, zs, y, zt, zs, 0.005, 0, None))  # student at half its peak lr
        moved[lam] = float(m.p.detach()) - p0 + 0.025 * 5e-4 * p0  # the part the loss moved (weight decay removed)
        assert m.p.grad is None
        # SGD with the official lr at the student's schedule: half of 0.05, weight decay 5e-4
        assert moved[lam] == pytest.approx(-0.025 * float(g), rel=2e-2)  # float32 p
    assert moved[0.1] / moved[1.0] == pytest.approx(0.1, rel=1e-2)  # AdamW would normalise lambda away
    m.on_step(Progress(0, 10, 100))  # 10 epochs, a ramp of 10/24 of an epoch: it rises per step (4.17 steps)
    assert m.lam == pytest.approx(0.5 * (1 - math.cos(math.pi / (10 / 24 * 10))))
    m.on_step(Progress(4, 10, 100))
    assert m.lam == pytest.approx(1.0)


@pytest.mark.parametrize("method", list(names()))
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


def _kd_reference(zs, zt, targets, tau_t, tau_s, alpha):
    """(1-alpha) CE + alpha tau_t tau_s KL(p_t || p_s), batchmean, in float64 from the definitions."""
    pt = torch.softmax(zt / tau_t, -1)
    kl = (pt * (torch.log(pt) - torch.log_softmax(zs / tau_s, -1))).sum(-1).mean()
    ce = -(targets * torch.log_softmax(zs, -1)).sum(-1).mean()
    return ce, tau_t * tau_s * kl, (1 - alpha) * ce + alpha * tau_t * tau_s * kl


@pytest.mark.parametrize("method", ["ce", "kd", "ctkd", "mkd"])
def test_each_method_s_loss_terms_on_fixed_tensors(method):
    """Every method's terms from its definition, float64 to 1e-12, on a Mixup batch (soft targets)."""
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 5, generator=g, dtype=torch.float64), 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    lam = 0.7
    targets = lam * F.one_hot(y, 5).double() + (1 - lam) * F.one_hot(y.flip(0), 5).double()
    extra = [] if method == "ce" else ["teacher=t"]
    m = build_method(load_config(overrides=[f"method={method}", *extra]), 5).double()
    terms = m(zs, Batch(None, targets, y, y.flip(0), lam, zt))
    if method == "ce":
        ref = -(targets * torch.log_softmax(zs, -1)).sum(-1).mean()
        assert abs(float(terms["loss"] - ref)) < 1e-12 and abs(float(terms["ce"] - ref)) < 1e-12
        return
    temps = m.temperatures()
    alpha = 0.9 if method == "ctkd" else 0.5  # CTKD's official CIFAR/embedded weights: CE 0.1, KD 0.9
    ce, kd, loss = _kd_reference(zs, zt, targets, temps["tau_t"], temps["tau_s"], alpha)
    for k, v in (("ce", ce), ("kd", kd), ("loss", loss)):
        assert abs(float(terms[k]) - float(v)) < 1e-12, (method, k, float(terms[k]), float(v))


def test_the_toy_method_reads_the_hard_labels_of_both_mixed_images():
    """Its CE on the hard labels, weighted by the mixing weight, is CE on the unsmoothed mixed targets."""
    from mkd.methods.common import hard_label_ce  # what tests/toy_method.py trains on

    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (8,), generator=g)
    for lam in (1.0, 0.63, 0.2):
        mixed = lam * F.one_hot(y, 6).double() + (1 - lam) * F.one_hot(y.flip(0), 6).double()
        b = Batch(None, mixed, y, y.flip(0), lam)
        assert abs(float(hard_label_ce(z, b) - F.cross_entropy(z, mixed))) < 1e-12
    assert abs(float(hard_label_ce(z, Batch(None, y, y)) - F.cross_entropy(z, y))) < 1e-12
