"""MKD: the hypergradient implementations, and that the meta step moves the temperatures the right way."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from mkd.config import RunConfig
from mkd.losses import MKD, StepContext
from mkd.meta import TOLERANCES, fused_attention_off, selfcheck


@pytest.mark.parametrize("granularity,student", [("global", "emb_vit_s"), ("per_class", "emb_vit_s"),
                                                 ("global", "emb_deit_s_distilled")])
def test_hypergradients_agree_with_each_other_and_a_finite_difference_of_the_meta_loss(granularity, student):
    res = selfcheck("cpu", "float64", granularity=granularity, student_name=student)
    tol = TOLERANCES["float64"]
    assert res["jvp_vs_exact"] < tol["jvp_vs_exact"], res
    assert res["fd_vs_exact"] < tol["fd_vs_exact"], res
    assert res["exact_vs_fd_of_meta_loss"] < tol["exact_vs_fd_of_meta_loss"], res
    assert max(abs(v) for v in res["hypergrad_exact"]) > 1e-6, "a vanishing hypergradient would make this vacuous"


def test_selfcheck_cli_passes_in_float32():
    p = run_cli("-m", "mkd.meta", "--selfcheck", "--dtype", "float32")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "jvp_vs_exact" in p.stdout and "PASS" in p.stdout


def test_fused_attention_is_off_only_inside_the_block():
    from mkd.models import create_model

    m = create_model("emb_vit_s", 20, 16)
    attn = [x for x in m.modules() if hasattr(x, "fused_attn")]
    assert attn and all(a.fused_attn for a in attn)
    with fused_attention_off(m):
        assert not any(a.fused_attn for a in attn)
    assert all(a.fused_attn for a in attn)


def _constructed(mode: str, steps: int = 60):
    """A linear student and an overconfident teacher that is wrong on 40% of the training samples with the
    true class a close second: the clean held-out CE plainly prefers the softer teacher distribution."""
    torch.manual_seed(0)
    C, d, n = 5, 16, 256
    means = torch.randn(C, d) * 2

    def sample(k):
        y = torch.randint(0, C, (k,))
        return means[y] + torch.randn(k, d), y

    x, y = sample(n)
    xm, ym = sample(128)
    bad = torch.rand(n) < 0.4
    top = torch.where(bad, (y + 1) % C, y)
    t_logits = torch.zeros(n, C)
    t_logits[torch.arange(n), top] = 12.0
    t_logits[torch.arange(n)[bad], y[bad]] = 10.0
    cfg = RunConfig(method="mkd", teacher="linear")
    cfg.kd.alpha, cfg.kd.tau_t, cfg.kd.tau_s, cfg.kd.weight = 0.9, 1.0, 1.0, "none"
    cfg.mkd.meta_interval, cfg.mkd.meta_lr, cfg.mkd.hypergrad = 1, 0.05, mode
    student = torch.nn.Linear(d, C)
    method = MKD(cfg, C)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)

    class Meta:
        def next(self):
            return xm, ym

    targets = F.one_hot(y, C).float()
    for step in range(steps):
        out = student(x)
        loss = method(out, t_logits, targets)["loss"]
        opt.zero_grad()
        loss.backward()
        method.meta_step(StepContext(student, x, targets, t_logits, out.detach(), 0.5, step,
                                     contextlib.nullcontext, Meta()))
        opt.step()
    return method.temperatures()


@pytest.mark.parametrize("mode", ["exact", "jvp", "fd"])
def test_tau_t_rises_when_the_meta_objective_prefers_a_softer_teacher(mode):
    temps = _constructed(mode)
    assert temps["tau_t"] > 2.0, temps  # from 1.0


def test_meta_interval_skips_steps_and_scales_the_meta_lr():
    cfg = RunConfig(method="mkd", teacher="t")
    cfg.mkd.meta_interval, cfg.mkd.meta_lr = 4, 0.01
    m = MKD(cfg, 10)
    assert m.learner.opt.param_groups[0]["lr"] == pytest.approx(0.02)  # sqrt(4) x
    cfg.mkd.lr_scaling = "linear"
    assert MKD(cfg, 10).learner.opt.param_groups[0]["lr"] == pytest.approx(0.04)
    calls = []
    m.learner.cfg.hypergrad = "fd"
    import mkd.meta as meta

    orig = meta.hypergradient
    meta.hypergradient = lambda *a, **k: (calls.append(1), ([torch.zeros(1), torch.zeros(1)], torch.tensor(0.0)))[1]
    try:
        for step in range(9):
            m.meta_step(StepContext(torch.nn.Linear(2, 10), torch.zeros(2, 2), torch.zeros(2, 10), torch.zeros(2, 10),
                                    torch.zeros(2, 10), 0.1, step, contextlib.nullcontext,
                                    type("M", (), {"next": lambda self: (torch.zeros(2, 2), torch.zeros(2).long())})()))
    finally:
        meta.hypergradient = orig
    assert len(calls) == 3  # steps 0, 4, 8


def test_temperatures_are_clamped_to_their_bounds():
    from mkd.meta import LearnedTemperatures

    t = LearnedTemperatures(4.0, 4.0, 10, "per_class", tau_min=1.0, tau_max=8.0)
    with torch.no_grad():
        t.log_tau_t.fill_(10.0)
        t.log_tau_s.fill_(-10.0)
    t.clamp_()
    v = t.values()
    assert v["tau_t"] == pytest.approx(8.0) and v["tau_s"] == pytest.approx(1.0)
    tt, ts = t(F.one_hot(torch.tensor([1, 2]), 10).float())
    assert tt.shape == (2,) and torch.allclose(tt, torch.full((2,), 8.0))
