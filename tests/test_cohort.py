"""Cohorts: runs of one teacher stream trained in lockstep in one process end exactly as they do alone."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY
from mkd.config import load_config


def _configs(teacher_ckpt) -> list:
    """kd, mkd and ctkd with drop path under Mixup/CutMix (every step draws masks and mixing), dkd without; every
    method on the same images (``holdout=all``: MKD's meta split is then the training set, so all share a stream)."""
    common = ["teacher=emb_vit_m", f"teacher_checkpoint={teacher_ckpt}", "epochs=2", "batch_size=64",
              "augment=strong", "eval_every=1", "log_every=3", "teacher_cache=off", "holdout=all", *TINY]
    return [load_config(overrides=[f"method={m}", *common, *extra]) for m, extra in
            (("kd", ["drop_path=0.1"]), ("mkd", ["drop_path=0.1", "mkd.meta_interval=2"]),
             ("ctkd", ["drop_path=0.1"]), ("dkd", []))]


def _run_dirs(root, named) -> list[str]:
    """A run directory with its config.yaml for each (name, config)."""
    out = []
    for name, c in named:
        d = root / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(c.to_yaml())
        out.append(str(d))
    return out


def _same_run(a, b) -> None:
    wa = torch.load(a / "model.pt", weights_only=False)["model"]
    wb = torch.load(b / "model.pt", weights_only=False)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"weights differ: {a.name}"
    ra, rb = ([{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in (d / "metrics.jsonl").open()]
              for d in (a, b))
    assert ra == rb and len(ra) == 2, f"per-epoch records differ: {a.name}"


@pytest.mark.slow
def test_each_member_of_a_cohort_ends_bitwise_as_its_run_alone(tmp_path, teacher_ckpt):
    from mkd.cohort import train_cohort
    from mkd.train import train

    cfgs = _configs(teacher_ckpt)
    out = train_cohort(_run_dirs(tmp_path / "cohort", [(c.method, c) for c in cfgs]), quiet=True)
    assert all(ok for ok, _ in out.values()) and len(out) == 4, out
    for c in cfgs:
        train(c, tmp_path / "alone" / c.method, quiet=True)
        _same_run(tmp_path / "cohort" / c.method, tmp_path / "alone" / c.method)
    res = json.loads((tmp_path / "cohort" / "mkd" / "result.json").read_text())
    assert res["status"] == "done" and res["tau_t"] is not None


@pytest.mark.slow
def test_a_member_that_fails_leaves_the_cohort_and_a_stopped_cohort_resumes_every_member(tmp_path, teacher_ckpt):
    """A diverging member (lr 1e6) fails with its reason while the others finish; a cohort stopped at a step
    (a preemption) checkpoints every member there, and the rerun resumes them all to the uninterrupted result."""
    from mkd import cohort as C
    from mkd.preempt import Preempted
    from mkd.train import train

    kd, mkd = _configs(teacher_ckpt)[:2]
    bad = load_config(overrides=["method=kd", "lr=1e6", "teacher=emb_vit_m", f"teacher_checkpoint={teacher_ckpt}",
                                 "epochs=2", "batch_size=64", "augment=strong", "log_every=1", "teacher_cache=off",
                                 "holdout=all", *TINY])
    dirs = _run_dirs(tmp_path / "c", (("kd", kd), ("bad", bad), ("mkd", mkd)))
    out = C.train_cohort(dirs, quiet=True)
    assert out[dirs[0]][0] and out[dirs[2]][0] and not out[dirs[1]][0] and "non-finite" in out[dirs[1]][1]
    assert json.loads((tmp_path / "c" / "bad" / "result.json").read_text())["status"] == "failed"

    # stop the cohort at its 5th step, as a preemption signal would, then rerun it; dkd draws no drop-path masks,
    # so its RNG state at the stop differs from the others' (each member must resume with its own)
    dkd = _configs(teacher_ckpt)[3]
    dirs2 = _run_dirs(tmp_path / "p", (("kd", kd), ("mkd", mkd), ("dkd", dkd)))
    import mkd.train as T

    real, calls = T.Trainer.stop_requested, []

    def stop_at_5(self, steps):
        calls.append(steps.step)
        return steps.step == 5 or real(self, steps)
    T.Trainer.stop_requested = stop_at_5
    try:
        with pytest.raises(Preempted):
            C.train_cohort(dirs2, quiet=True)
    finally:
        T.Trainer.stop_requested = real
    for d in dirs2:
        state = torch.load(f"{d}/checkpoint.pt", weights_only=False)
        assert state["step"] == 5 and state["in_epoch"] is not None, "every member checkpointed at the same step"
    out = C.train_cohort(dirs2, quiet=True)
    assert all(ok for ok, _ in out.values())
    for c in (kd, mkd, dkd):
        train(c, tmp_path / f"alone_{c.method}", quiet=True)
        _same_run(tmp_path / "p" / c.method, tmp_path / f"alone_{c.method}")


@pytest.mark.slow
def test_a_member_out_of_gpu_memory_splits_the_cohort_and_every_member_ends_as_alone(tmp_path, teacher_ckpt):
    """A CUDA out-of-memory error in one member's step (raised here at the 5th step of the second member) does
    not kill the cohort: every member is checkpointed where it stands, the cohort goes on as two halves, and each
    member ends bitwise as its run alone."""
    import mkd.engine as E
    from mkd import cohort as C
    from mkd.train import train

    cfgs = _configs(teacher_ckpt)
    dirs = _run_dirs(tmp_path / "c", [(c.method, c) for c in cfgs])
    real, seen = E.EpochSteps.take, []

    def take(self, batch):
        if self.loop.method.name == "mkd" and self.step == 5 and not seen:
            seen.append(self.step)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)

    E.EpochSteps.take = take
    try:
        out = C.train_cohort(dirs, quiet=True)
    finally:
        E.EpochSteps.take = real
    assert seen == [5] and all(ok for ok, _ in out.values()) and len(out) == 4, out
    for c in cfgs:
        train(c, tmp_path / "alone" / c.method, quiet=True)
        _same_run(tmp_path / "c" / c.method, tmp_path / "alone" / c.method)


def test_out_of_memory_alone_is_one_clear_line(tmp_path):
    from mkd.prepare import failures_recorded
    from mkd.rundir import RunDir

    cfg = load_config(overrides=["epochs=1"])
    with pytest.raises(Exception) as e:
        with failures_recorded(RunDir(tmp_path), cfg, True):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    from mkd.errors import UserError

    assert isinstance(e.value, UserError) and "lower batch_size" in str(e.value)
    assert "out of GPU memory" in json.loads((tmp_path / "result.json").read_text())["reason"]


def test_the_planner_groups_runs_of_one_teacher_stream_and_nothing_else(tmp_path):
    """auto: cohorts where the teacher's logits are not cached (ImageNet); a run without a teacher, another teacher,
    augmentation or seed, or another training set (MKD holds out its meta split unless holdout=all) is another
    unit."""
    from mkd.cohort import plan_cohorts
    from mkd.suites import expand

    six = {"method": ["ce", "kd", "dist", "dkd", "ctkd", "mkd"]}
    inet = expand("degradation", "imagenet", data_root=str(tmp_path), axes=six)
    units = plan_cohorts(inet.students, "auto")
    multi = [u for u in units if len(u) > 1]
    assert len(multi) == 2 * 2 * 5, "one cohort per teacher, augmentation and seed"
    assert all(len({(r.rows[0]["teacher"], r.config.seed, r.config.augment) for r in u}) == 1 for u in multi)
    assert all({r.config.method for r in u} == {"kd", "dist", "dkd", "ctkd"} for u in multi)
    assert all(len(u) == 1 for u in units if u[0].config.method in ("ce", "mkd"))
    assert sum(len(u) for u in units) == len(inet.students)
    same = expand("degradation", "imagenet", data_root=str(tmp_path), axes=six, overrides={"holdout": "all"})
    assert all({r.config.method for r in u} == {"kd", "dist", "dkd", "ctkd", "mkd"}
               for u in plan_cohorts(same.students, "auto") if len(u) > 1), "one training set: MKD joins"
    tiny = expand("degradation", "tiny", tune=False)
    assert all(len(u) == 1 for u in plan_cohorts(tiny.students, "auto")), "cached teacher streams: no cohorts"
    assert any(len(u) == 2 for u in plan_cohorts(tiny.students, "on"))
    assert all(len(u) == 1 for u in plan_cohorts(inet.students, "off"))
    main = expand("imagenet_main", "imagenet", data_root=str(tmp_path), axes={"seed": [0, 1]})
    for u in plan_cohorts(main.students, "auto"):  # ViT-T/S/B/L of one stream: a cohort per student architecture
        assert len({r.config.student.replace("_distilled", "") for r in u}) == 1, [r.config.student for r in u]
    assert max(len(u) for u in plan_cohorts(main.students, "auto")) > 1


@pytest.mark.slow
def test_under_ddp_each_member_of_a_cohort_ends_bitwise_as_its_ddp_run_alone(tmp_path, teacher_ckpt):
    """Two processes (gloo): the cohort's members and the same runs trained alone with two processes end with
    identical weights and records."""
    from conftest import free_port, run_cli

    cfgs = _configs(teacher_ckpt)[:2]  # kd and mkd, drop path on
    dirs = _run_dirs(tmp_path / "cohort", [(c.method, c) for c in cfgs])
    _run_dirs(tmp_path / "alone", [(c.method, c) for c in cfgs])
    for c in cfgs:
        p = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
                    "mkd.train", "--config", str(tmp_path / "alone" / c.method / "config.yaml"),
                    "--out", str(tmp_path / "alone" / c.method))
        assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
                "mkd.cohort", *dirs)
    assert p.returncode == 0, p.stderr[-3000:]
    for c in cfgs:
        res = json.loads((tmp_path / "cohort" / c.method / "result.json").read_text())
        assert res["environment"]["world_size"] == 2
        _same_run(tmp_path / "cohort" / c.method, tmp_path / "alone" / c.method)


def test_a_cohort_of_runs_that_do_not_share_a_teacher_stream_is_refused(tmp_path, teacher_ckpt):
    from conftest import assert_user_error, run_cli

    kd, mkd = _configs(teacher_ckpt)[:2]
    other = load_config(overrides=["method=kd", "seed=1", "teacher=emb_vit_m", f"teacher_checkpoint={teacher_ckpt}",
                                   "epochs=2", "batch_size=64", "augment=strong", "holdout=all", *TINY])
    dirs = _run_dirs(tmp_path, (("kd", kd), ("other", other)))
    assert_user_error(run_cli("-m", "mkd.cohort", *dirs), "do not share one teacher stream", "separately")
