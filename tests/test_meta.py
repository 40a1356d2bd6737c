"""MKD: the hypergradient implementations, and that the meta step moves the temperatures the right way."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from mkd.batch import Batch
from mkd.config import RunConfig
from mkd.methods import StepContext
from mkd.methods.mkd import MKD
from mkd.meta import fused_attention_off
from mkd.selfcheck import TOLERANCES, selfcheck


@pytest.mark.parametrize("granularity,student,drop_path,dropout,lookahead", [
    ("global", "emb_vit_s", 0.0, 0.0, "sgd"), ("per_class", "emb_vit_s", 0.1, 0.0, "sgd"),
    ("global", "emb_deit_s_distilled", 0.1, 0.1, "sgd"), ("global", "emb_vit_s", 0.1, 0.1, "adam"),
    ("global", "emb_resnet", 0.1, 0.1, "sgd"), ("global", "emb_resnet", 0.0, 0.0, "adam")])
def test_hypergradients_agree_with_each_other_and_a_finite_difference_of_the_meta_loss(
        granularity, student, drop_path, dropout, lookahead):
    """Stochastic layers, BatchNorm (a ResNet student) and the Adam look-ahead included; no buffer changes."""
    res = selfcheck("cpu", "float64", granularity=granularity, student_name=student, drop_path=drop_path,
                    dropout=dropout, lookahead=lookahead)
    assert not res["buffers_changed"]
    tol = TOLERANCES["float64"]
    assert res["jvp_vs_exact"] < tol["jvp_vs_exact"], res
    assert res["fd_vs_exact"] < tol["fd_vs_exact"], res
    assert res["exact_vs_fd_of_meta_loss"] < tol["exact_vs_fd_of_meta_loss"], res
    assert max(abs(v) for v in res["hypergrad_exact"]) > 1e-6, "a vanishing hypergradient would make this vacuous"


@pytest.mark.slow
def test_selfcheck_cli_passes_in_float32():
    p = run_cli("-m", "mkd.selfcheck", "--dtype", "float32")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "jvp_vs_exact" in p.stdout and "PASS" in p.stdout


def test_repeated_hypergradients_of_one_step_with_drop_path_agree_with_each_other_and_exact():
    """One real training step with drop path 0.1; its hypergradient, recomputed from other current RNG states,
    must be the same every time (the masks of the step are replayed) and equal to exact's."""
    from mkd.meta import capture_rng, hypergradient
    from mkd.models import create_model

    torch.manual_seed(0)
    student = create_model("emb_vit_s", 20, 16, drop_path=0.1).double().train()
    x, xm = torch.randn(32, 3, 16, 16, dtype=torch.float64), torch.randn(16, 3, 16, 16, dtype=torch.float64)
    y, ym = torch.randint(0, 20, (32,)), torch.randint(0, 20, (16,))
    targets, tl = F.one_hot(y, 20).double(), 3 * torch.randn(32, 20, dtype=torch.float64)
    cfg = RunConfig(method="mkd", teacher="t")
    method = MKD(cfg, 20).double()
    with torch.no_grad():
        method.temps.log_tau_t.fill_(1.0)
    rng = capture_rng("cpu")
    out = student(x)
    method(out, Batch(x, targets, teacher_logits=tl))["loss"].backward()
    grads = [p.grad.clone() for p in student.parameters()]
    hs = {}
    for mode in ("exact", "jvp", "fd"):
        for k in range(3):
            torch.manual_seed(100 + k)
            h, _ = hypergradient(mode, student, x, targets, tl, method.temps, method.loss_with, 0.5, xm, ym,
                                 out=out.detach(), grads=grads, rng=rng, fd_eps=1e-6)
            hs.setdefault(mode, []).append(torch.cat([t.reshape(-1) for t in h]))
    ref = hs["exact"][0]
    assert ref.abs().min() > 1e-8
    for mode, tol in (("exact", 1e-12), ("jvp", 1e-10), ("fd", 1e-5)):
        for h in hs[mode]:
            assert torch.equal(h, hs[mode][0]), f"{mode}: repeats differ"
            assert float((h - ref).norm() / ref.norm()) < tol, (mode, h, ref)
    # without the replay the extra forwards draw other masks: the same computation no longer repeats
    torch.manual_seed(7)
    fresh, _ = hypergradient("fd", student, x, targets, tl, method.temps, method.loss_with, 0.5, xm, ym,
                             out=out.detach(), grads=grads, rng=None, fd_eps=1e-6)
    assert float((torch.cat([t.reshape(-1) for t in fresh]) - ref).norm() / ref.norm()) > 1e-2


def test_batchnorm_running_statistics_are_untouched_by_every_meta_mode():
    from mkd.meta import capture_rng, hypergradient
    from mkd.models import create_model

    torch.manual_seed(0)
    student = create_model("emb_resnet", 20, 16).train()
    x, xm = torch.randn(32, 3, 16, 16), torch.randn(16, 3, 16, 16)
    y, ym = torch.randint(0, 20, (32,)), torch.randint(0, 20, (16,))
    method = MKD(RunConfig(method="mkd", teacher="t"), 20)
    rng = capture_rng("cpu")
    out = student(x)
    method(out, Batch(None, y, y, teacher_logits=torch.randn(32, 20)))["loss"].backward()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    for mode in ("exact", "jvp", "fd"):
        for grads in (None, [p.grad for p in student.parameters()]):  # fd/jvp also without the real gradients
            hypergradient(mode, student, x, y, torch.randn(32, 20), method.temps, method.loss_with, 0.1, xm, ym,
                          out=out.detach(), grads=grads, rng=rng)
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert any("running_mean" in k for k in before)


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
        loss = method(out, Batch(x, targets, teacher_logits=t_logits))["loss"]
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
