"""DIST and DKD pinned to their official formulas (float64, 1e-12), their per-scale defaults, DKD's warm-up and
its Mixup rule, and CTKD's official CE/KD weights.  The references below are written from the papers' and the
official code's definitions (docs/method.md cites the lines), independently of mkd/methods/."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mkd.batch import Batch
from mkd.config import load_config
from mkd.methods import Progress, build_method

T_ARGS = ["teacher=t"]


def _fixed(n=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, c, generator=g, dtype=torch.float64)
    zt = 3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return zs, zt, y


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _dist_reference(zs, zt, tau, eps=1e-8):
    """hunto/image_classification_sota dist_kd.py: tau^2 (1 - mean_i corr(rows)) + tau^2 (1 - mean_j corr(columns)),
    corr = cosine of the centred vectors with eps added to the norms' product; numpy, one vector at a time."""
    ys, yt = _softmax(zs.numpy() / tau), _softmax(zt.numpy() / tau)

    def relation(a, b):
        cs = []
        for u, v in zip(a, b):
            u, v = u - u.mean(), v - v.mean()
            cs.append(float(u @ v) / (np.sqrt(u @ u) * np.sqrt(v @ v) + eps))
        return 1 - np.mean(cs)

    return tau ** 2 * relation(ys, yt), tau ** 2 * relation(ys.T, yt.T)


@pytest.mark.parametrize("dataset,tau", [("embedded", 4.0), ("imagenet", 1.0)])
def test_dist_loss_is_the_official_formula_at_the_recipe_s_temperature(dataset, tau):
    zs, zt, y = _fixed()
    extra = ["data_root=/x"] if dataset == "imagenet" else []
    cfg = load_config(overrides=["method=dist", *T_ARGS, f"dataset={dataset}", *extra])
    assert cfg.dist.tau == tau, "official: tau 1 on ImageNet (kd: dist), 4 on CIFAR-100 (kd: dist_t4)"
    m = build_method(cfg, 5).double()
    terms = m(zs, Batch(None, y, y, teacher_logits=zt))
    inter, intra = _dist_reference(zs, zt, tau)
    assert abs(float(terms["dist_inter"]) - inter) < 1e-12 and abs(float(terms["dist_intra"]) - intra) < 1e-12
    ce = float(F.cross_entropy(zs, y))
    assert abs(float(terms["loss"]) - (1.0 * ce + 2.0 * (inter + intra))) < 1e-12, "weights CE 1, DIST 2"


def test_dist_correlations_are_pearson_s_and_its_temperature_scales_by_tau_squared():
    from mkd.methods.dist import dist_terms, pearson_rows

    zs, zt, _ = _fixed(8, 7, seed=3)
    a, b = zs.softmax(1).numpy(), zt.softmax(1).numpy()
    r = pearson_rows(zs.softmax(1), zt.softmax(1), eps=0.0).numpy()
    assert np.abs(r - [np.corrcoef(u, v)[0, 1] for u, v in zip(a, b)]).max() < 1e-12
    inter1, _ = dist_terms(zs * 3, zt * 3, 3.0)  # softmax(3z / 3) = softmax(z): only the tau^2 factor differs
    inter0, _ = dist_terms(zs, zt, 1.0)
    assert abs(float(inter1) - 9 * float(inter0)) < 1e-12
    same, _ = dist_terms(zt, zt, 4.0, eps=0.0)  # (the official eps alone leaves ~1e-6 here)
    assert abs(float(same)) < 1e-12, "a student that matches the teacher has no inter-class loss"


def _dkd_reference(zs, zt, y, T, alpha, beta):
    """mdistiller DKD.py per sample: TCKD = KL([p_t(y), sum of the others] || the same of the student) T^2; NCKD =
    KL of the softmaxes with the target class removed (softmax(z/T - 1000 at y)) T^2; numpy, sample by sample."""
    ps, pt = _softmax(zs.numpy() / T), _softmax(zt.numpy() / T)
    tck, nck = [], []
    for i, c in enumerate(y.tolist()):
        others = [j for j in range(ps.shape[1]) if j != c]
        bs = np.array([ps[i, c], ps[i, others].sum()])
        bt = np.array([pt[i, c], pt[i, others].sum()])
        tck.append(float((bt * (np.log(bt) - np.log(bs))).sum()) * T ** 2)
        qs, qt = ps[i, others] / ps[i, others].sum(), pt[i, others] / pt[i, others].sum()
        nck.append(float((qt * (np.log(qt) - np.log(qs))).sum()) * T ** 2)
    return np.array(tck), np.array(nck)


@pytest.mark.parametrize("dataset,T,beta", [("embedded", 4.0, 8.0), ("imagenet", 1.0, 0.5)])
def test_dkd_loss_is_the_official_formula_with_the_recipe_s_weights(dataset, T, beta):
    zs, zt, y = _fixed(8, 6, seed=1)
    extra = ["data_root=/x"] if dataset == "imagenet" else []
    cfg = load_config(overrides=["method=dkd", *T_ARGS, f"dataset={dataset}", *extra])
    assert (cfg.dkd.T, cfg.dkd.alpha, cfg.dkd.beta) == (T, 1.0, beta)
    m = build_method(cfg, 6).double()
    m.on_step(Progress(10 ** 6, 10, 10 ** 7))  # past the warm-up
    terms = m(zs, Batch(None, y, y, teacher_logits=zt))
    tck, nck = _dkd_reference(zs, zt, y, T, 1.0, beta)
    assert abs(float(terms["tckd"]) - tck.mean()) < 1e-12 and abs(float(terms["nckd"]) - nck.mean()) < 1e-12
    ce = float(F.cross_entropy(zs, y))
    assert abs(float(terms["loss"]) - (ce + tck.mean() + beta * nck.mean())) < 1e-12


def test_dkd_on_a_mixup_batch_weights_both_classes_by_lambda_or_takes_the_dominant_one():
    zs, zt, y = _fixed(8, 6, seed=2)
    yb, lam = y.flip(0), 0.3
    targets = lam * F.one_hot(y, 6).double() + (1 - lam) * F.one_hot(yb, 6).double()
    batch = Batch(None, targets, y, yb, lam, zt)
    ta, na = _dkd_reference(zs, zt, y, 4.0, 1.0, 8.0)
    tb, nb = _dkd_reference(zs, zt, yb, 4.0, 1.0, 8.0)
    for mix, tck, nck in (("pair", lam * ta.mean() + (1 - lam) * tb.mean(), lam * na.mean() + (1 - lam) * nb.mean()),
                          ("dominant", tb.mean(), nb.mean())):  # lam 0.3: the mixed-in image's class dominates
        m = build_method(load_config(overrides=["method=dkd", *T_ARGS, f"dkd.mix={mix}"]), 6).double()
        m.on_step(Progress(10 ** 6, 10, 10 ** 7))
        terms = m(zs, batch)
        assert abs(float(terms["tckd"]) - tck) < 1e-12 and abs(float(terms["nckd"]) - nck) < 1e-12, mix
        ce = float(-(targets * torch.log_softmax(zs, -1)).sum(-1).mean())
        assert abs(float(terms["loss"]) - (ce + tck + 8.0 * nck)) < 1e-12


@pytest.mark.parametrize("epochs,warmup_epochs,dataset", [(240, 20, "embedded"), (100, 0, "imagenet")])
def test_dkd_warmup_is_the_official_min_epoch_over_warmup(epochs, warmup_epochs, dataset):
    """mdistiller: loss_dkd * min(epoch / WARMUP, 1), epoch counted from 1 (engine/trainer.py), at the official
    lengths: 20 of 240 epochs on CIFAR; on ImageNet WARMUP 1 of 100, where min(e / 1, 1) is 1 from the first epoch
    (the default warm-up there is 0, the same factor)."""
    extra = ["data_root=/x"] if dataset == "imagenet" else []
    m = build_method(load_config(overrides=["method=dkd", *T_ARGS, f"dataset={dataset}", *extra]), 5)
    spe = 3
    for e in range(epochs):
        for s in (0, spe - 1):
            m.on_step(Progress(e * spe + s, spe, epochs * spe))
            official = min((e + 1) / warmup_epochs, 1.0) if warmup_epochs else min((e + 1) / 1, 1.0)
            assert m.factor == pytest.approx(official, abs=1e-12), (e, s)
    zs, zt, y = _fixed()
    m.on_step(Progress(0, spe, epochs * spe))
    terms = m(zs.float(), Batch(None, y, y, teacher_logits=zt.float()))
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"] + m.factor * terms["dkd"]), rel=1e-6)


def test_a_shortened_run_still_warms_up_per_step():
    """At 10 epochs DKD's 20/240 is 0.83 of an epoch: counted in 1-based epochs the factor would be 1 from the
    first step (no warm-up); it rises per step over those 0.83 epochs instead, and CTKD's ramp likewise."""
    from mkd.methods.ctkd import ctkd_lambda

    m = build_method(load_config(overrides=["method=dkd", *T_ARGS, "epochs=10"]), 5)
    spe, epochs = 60, 10
    w_steps = 20 / 240 * epochs * spe  # 50 steps
    factors = []
    for step in range(epochs * spe):
        m.on_step(Progress(step, spe, epochs * spe))
        factors.append(m.factor)
        assert m.factor == pytest.approx(min((step + 1) / w_steps, 1.0), abs=1e-12)
    assert factors[0] == pytest.approx(1 / 50) and factors[48] < 1 and factors[49] == 1.0
    assert all(a <= b for a, b in zip(factors, factors[1:]))
    lams = [ctkd_lambda(Progress(s, spe, epochs * spe), 1.0, 1 / 24, "epoch") for s in range(3 * spe)]
    assert lams[0] < 0.01 and lams[-1] == pytest.approx(1.0) and all(a <= b for a, b in zip(lams, lams[1:]))
    # 1/24 of 10 epochs is 25 steps: the cosine reaches its top there
    assert lams[24] == pytest.approx(1.0) and lams[11] == pytest.approx(0.5 * (1 - math.cos(math.pi * 12 / 25)))


@pytest.mark.parametrize("dataset,weights", [("embedded", (0.1, 0.9)), ("imagenet", (1.0, 1.0))])
def test_ctkd_weights_ce_and_kd_as_its_official_scripts_and_keeps_kd_s_as_an_option(dataset, weights):
    zs, zt, y = _fixed()
    extra = ["data_root=/x"] if dataset == "imagenet" else []
    for opt, (w_ce, w_kd) in (([], weights), (["ctkd.weights=kd", "kd.alpha=0.5"], (0.5, 0.5))):
        m = build_method(load_config(overrides=["method=ctkd", *T_ARGS, f"dataset={dataset}", *extra, *opt]), 5).double()
        terms = m(zs, Batch(None, y, y, teacher_logits=zt))
        assert abs(float(terms["loss"] - (w_ce * terms["ce"] + w_kd * terms["kd"]))) < 1e-12, (dataset, opt)


def test_rivals_declare_their_role_for_the_analysis():
    from mkd.methods import get

    roles = {m: get(m).declarations()["role"] for m in ("ce", "kd", "dist", "dkd", "ctkd", "mkd")}
    assert roles == {"ce": "baseline", "kd": "reference", "dist": "rival", "dkd": "rival", "ctkd": "rival",
                     "mkd": "subject"}
