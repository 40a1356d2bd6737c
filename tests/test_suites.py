"""Suites as data and the local runner: expansion, validation, skip/resume/retry, locks, status."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, RUN, assert_user_error, cli_error, env, load_script, run_cli, write_suite
from mkd.results import Result
from mkd.suites import expand, known_suites

def test_degradation_suite_expands_to_a_teacher_ladder_and_shares_ce_runs():
    plan = expand("degradation", "tiny", tune=False)
    assert len(plan.teachers) == 2 and len(plan.students) == 5 * (2 + 2 * 2 * 2), "5 seeds by default"
    assert {r.config.seed for r in plan.students} == {0, 1, 2, 3, 4}
    ce = [r for r in plan.students if r.config.method == "ce"]
    assert len(ce) == 2 * 5 and all(len(r.rows) == 2 for r in ce), \
        "one CE run per augmentation and seed serves every teacher row"
    sizes = {r.rows[0]["teacher"]: r.config.student for r in plan.teachers}
    assert sizes == {"small": "emb_vit_m", "large": "emb_vit_xl"}
    assert len(expand("degradation", "tiny", axes={"teacher": ["small", "medium", "large"]}, tune=False).teachers) == 3
    for r in plan.students:
        if r.config.method != "ce":
            t = next(t for t in plan.teachers if t.run_id == r.teacher)
            assert r.config.teacher_checkpoint == str(t.out / "model.pt")
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)
    assert set(known_suites()) >= {"degradation", "data_fraction", "temperature_grid", "imagenet_main"}


def test_imagenet_hard_rows_train_the_distillation_token_students_of_the_published_numbers(tmp_path):
    plan = expand("imagenet_main", "imagenet", data_root=str(tmp_path))
    student = {(r.rows[0]["student"], r.config.method): r.config.student for r in plan.students}
    assert student[("ViT-T", "hard")] == "deit_tiny_distilled_patch16_224"
    assert student[("ViT-B", "hard")] == "deit_base_distilled_patch16_224"
    assert student[("ViT-T", "kd")] == student[("ViT-T", "ce")] == "deit_tiny_patch16_224"
    assert student[("ViT-L", "hard")] == "vit_large_patch16_224"  # no published ViT-L hard number to match


def test_gap_ladder_plans_the_published_ladder_at_each_scale_offline(tmp_path):
    """imagenet: the DIST README's ladder (ResNet-18 from scratch, torchvision ResNet-34..152 teachers through timm,
    DIST's recipe); cifar: the CIFAR-stem ResNets; tiny: a BatchNorm ResNet width ladder. Planning needs no
    network (pretrained teachers are not downloaded to plan)."""
    inet = expand("gap_ladder", "imagenet", data_root=str(tmp_path))
    teachers = {r.rows[0]["teacher"]: (r.config.student, r.config.pretrained) for r in inet.teachers}
    assert teachers == {f"t{i}": (f"resnet{d}.tv_in1k", True) for i, d in enumerate((34, 50, 101, 152), 1)}
    methods = {r.config.method for r in inet.students}
    assert methods == {"ce", "kd", "dist", "dkd", "ctkd", "mkd"}
    c = next(r.config for r in inet.students if r.config.method == "kd")
    assert (c.student, c.epochs, c.batch_size, c.optimizer, c.lr, c.weight_decay, c.lr_schedule, c.decay_epochs) == \
        ("resnet18", 100, 256, "sgd", 0.1, 1e-4, "step", 30), "DIST's ImageNet recipe (resnet_dist.yaml)"
    assert (c.kd.tau_t, c.kd.tau_s, c.kd.weights()) == (4.0, 4.0, (0.9, 1.0)), \
        "the ladder's KD baseline is KD (T=4) as DIST ran it (resnet_kdt4.yaml: CE 0.9, KD 1.0)"
    d = next(r.config for r in inet.students if r.config.method == "dist")
    assert d.dist.tau == 1.0 and d.dist.loss_weight == 2.0
    k = next(r.config for r in inet.students if r.config.method == "dkd")
    assert (k.dkd.beta, k.dkd.T) == (0.5, 1.0)
    cifar = expand("gap_ladder", "cifar", data_root=str(tmp_path))
    assert {r.config.student for r in cifar.teachers} == {f"cifar_resnet{d}" for d in (34, 50, 101, 152)}
    assert next(r.config for r in cifar.students if r.config.method == "dkd").dkd.beta == 8.0
    cc = cifar.students[0].config
    assert (cc.lr_schedule, cc.decay_milestones, cc.nesterov) == ("multistep", [150, 180, 210], False)
    tiny = expand("gap_ladder", "tiny", tune=False)
    assert len(tiny.teachers) == 4 and len(tiny.students) == 5 * (1 + 4 * 5)
    tuned = expand("gap_ladder", "tiny")
    assert len(tuned.trials) == 6 * (1 + 4 * 5) and len(tuned.waiting) == 5 * (1 + 4 * 5) and not tuned.students


def test_teachers_are_shared_across_suites():
    a = {r.run_id for r in expand("degradation", "tiny", axes={"teacher": ["small", "medium", "large"]}).teachers}
    b = {r.run_id for r in expand("temperature_grid", "tiny").teachers}
    c = {r.run_id for r in expand("data_fraction", "tiny").teachers}
    assert b <= a and c <= a


def test_other_suites_expand_as_described():
    grid = expand("temperature_grid", "tiny")
    kd = [r for r in grid.students if r.config.method == "kd"]
    assert len(kd) == 2 * 16 * 5 and len([r for r in grid.students if r.config.method == "mkd"]) == 2 * 5
    assert all(r.config.tune_holdout == 0.1 for r in grid.students), "the best cell is picked on a held-out split"
    assert {(r.config.kd.tau_t, r.config.kd.tau_s) for r in kd} == {(a, b) for a in (1, 2, 4, 8) for b in (1, 2, 4, 8)}
    frac = expand("data_fraction", "tiny", tune=False)
    assert sorted({r.config.fraction for r in frac.students}) == [0.1, 0.25, 0.5, 1.0] and len(frac.students) == 12 * 5
    # equal optimizer steps: epochs x 1/fraction, so every fraction trains for as many steps as the full set
    # (20 classes x 300 images, 10% held out per class; whole batches of 64: 8 steps at 0.1 where 8.4 would be exact)
    steps = {(r.config.fraction, r.config.epochs * (20 * round(r.config.fraction * 270) // 64)) for r in frac.students}
    assert len(expand("data_fraction", "tiny").trials) == 4 * 3 * 6, "6 trials per method and fraction"
    full = next(s for f, s in steps if f == 1.0)
    assert full == 15 * 84 and all(abs(s - full) / full <= 0.05 for _, s in steps), steps


def test_dry_run_prints_one_line_per_run_and_filters(tmp_path, capsys):
    main = load_script(Path(RUN)).main

    def dry(*args):
        capsys.readouterr()
        assert main(["--suite", "degradation", "--dry-run", "--results", str(tmp_path), *args]) == 0
        return capsys.readouterr().out.strip().splitlines()

    lines = dry("--no-tuning")
    assert len(lines) == 1 + 2 + 50 + 1 and not any(tmp_path.iterdir()), "a dry run writes nothing"
    assert all("CPU-min" in l for l in lines[1:-1]) and lines[-1].startswith("estimated cost: ")
    assert len(dry("--no-tuning", "--filter", "method=mkd", "--filter", "teacher=large")) == 1 + 1 + 2 * 5 + 1
    assert len(dry("--no-tuning", "--axis", "seed=0,1", "--filter", "method=ce")) == 1 + 2 * 2 + 1
    tuned = dry("--filter", "method=ce")  # 6 trials per augmentation (one run serves both teachers), then 6 finals
    assert sum(l.startswith("trial") for l in tuned) == 2 * 6 and sum("waits for its tuning" in l for l in tuned) == 10


def _range(line: str) -> tuple[float, float]:
    lo, hi = line.split("estimated cost: ")[1].split()[0].replace(",", "").split("-")
    return float(lo), float(hi)


def test_dry_run_at_the_imagenet_scale_prices_each_unit_as_a_range_offline(tmp_path, capsys):
    """No dataset on disk, no network: each line a low-high range with what binds it; a cohort is priced as one
    process (one teacher forward, one decoded batch per step); staging the input removes the I/O bound."""
    from mkd.cost import Machine, forward_flops, price_unit
    from mkd.suites import expand

    main = load_script(Path(RUN)).main
    capsys.readouterr()
    args = ["--suite", "degradation", "--scale", "imagenet", "--dry-run", "--axis", "teacher=large_in21k",
            "--axis", "seed=0", "--axis", "augment=strong", "--axis", "method=kd,dist,dkd,ctkd"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "H100, 10 CPU cores per GPU, shared storage" in lines[0]
    assert sum("[cohort" in l for l in lines) == 4 and sum("in cohort" in l for l in lines) == 3
    lo, hi = _range(lines[-1])
    assert 0 < lo < hi < 3 * lo
    assert main([*args, "--no-cohorts"]) == 0
    alone = capsys.readouterr().out.strip().splitlines()
    lo_alone, hi_alone = _range(alone[-1])
    assert lo_alone > 1.8 * lo, "four runs alone pay the ViT-L teacher four times"
    assert main([*args, "--storage", "staged", "--cores", "32"]) == 0
    staged = capsys.readouterr().out.strip().splitlines()
    assert "binds GPU" in " ".join(staged) and _range(staged[-1])[1] <= hi
    import torch

    f_l = forward_flops("vit_large_patch16_224.augreg_in21k_ft_in1k", "{}", 1000, 224)
    old = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5)  # its FLOP counter misses part of SDPA
    assert abs(f_l / 2 / 61.6e9 - 1) < (0.04 if old else 0.01), "ViT-L/16 at 224 px: 61.6 GMACs (timm's model card)"
    plan = expand("degradation", "imagenet", check_data=False, axes={"teacher": ["large_in21k"], "seed": [0]})
    kd = next(r for r in plan.students if r.config.method == "kd" and r.config.augment == "strong")
    fast = Machine("H100", 64, "staged")
    own, cached = price_unit([kd.config], fast), price_unit([kd.config], fast, [True])
    assert own.binds == "GPU" and own.low > 4 * cached.low, "the ViT-L teacher's forward dominates KD's step"


def test_a_recorded_loader_rate_replaces_the_decode_prior(monkeypatch):
    """gpu_check --record's loader rows (benchmarks/pipeline.py on the card's host) price an ImageNet run's decoding:
    a slow measured loader makes decode what binds, where the prior left the GPU binding."""
    from mkd import cost
    from mkd.suites import expand

    plan = expand("degradation", "imagenet", check_data=False, axes={"teacher": ["small"], "seed": [0]})
    kd = next(r for r in plan.students if r.config.method == "kd" and r.config.augment == "weak")
    fast = cost.Machine("H100", 64, "staged")
    prior = cost.price_unit([kd.config], fast)
    assert cost.per_core("imagenet", "weak", "H100") == cost.PER_CORE["imagenet"]["weak"]
    monkeypatch.setattr(cost, "measured_on", lambda card: {"loader": {"rows": [{"recipe": "weak",
                                                                                "mkd_img_s_per_core": 20.0}]}})
    assert cost.per_core("imagenet", "weak", "H100") == pytest.approx((18.0, 22.0))
    assert cost.per_core("imagenet", "strong", "H100") == cost.PER_CORE["imagenet"]["strong"]  # not measured
    slow = cost.price_unit([kd.config], fast)
    assert slow.binds == "decode" and slow.low > prior.low


def test_the_tiny_scale_is_priced_in_cpu_minutes_from_measured_rates(capsys):
    main = load_script(Path(RUN)).main
    capsys.readouterr()
    assert main(["--suite", "degradation", "--dry-run", "--no-tuning", "--rates"]) == 0
    out = capsys.readouterr().out
    assert "one CPU thread per run" in out and "CPU-min" in out.splitlines()[-1]
    assert "rate emb_vit_s train" in out and "measured" in out


@pytest.mark.parametrize("args,fragments", [
    (["--suite", "degradaton"], ["unknown suite 'degradaton'", "degradation"]),
    (["--suite", "degradation", "--filter", "method=mdk"], ["method=mdk", "mkd"]),
    (["--suite", "degradation", "--scale", "imagenet"], ["--scale imagenet needs a dataset root", "--data-root"]),
    (["--suite", "degradation", "--scale", "imagenet", "--data-root", "/nonexistent/imagenet"], ["does not exist"]),
    (["--suite", "imagenet_main"], ["has no 'tiny' scale", "imagenet"]),
    (["--suite", "degradation", "--executor", "slurm"], ["needs --profile"]),
    (["--suite", "degradation", "--axis", "sed=0,1"], ["no axis 'sed'", "seed"]),
    (["--suite", "degradation", "--teacher-checkpoint", "larg=/x.pth"], ["no teacher 'larg'", "large"]),
    (["--suite", "degradation", "--teacher-checkpoint", "large=/x.pth"], ["trained by the suite"]),
    (["--suite", "degradation", "--dry-run", "--gpu", "H1000"], ["--gpu H1000", "H100"]),
    (["--suite", "degradation", "--set", "augment=strong"], ["--set augment", "--axis augment="]),
])
def test_runner_bad_input_is_one_clear_line(tmp_path, args, fragments, capsys):
    cli_error(load_script(Path(RUN)).main, [*args, "--results", str(tmp_path)], capsys, *fragments)
    assert not any(tmp_path.iterdir()), "nothing launched"


@pytest.mark.slow
def test_runner_error_in_a_real_process_has_no_traceback(tmp_path):
    assert_user_error(run_cli(RUN, "--suite", "degradation", "--filter", "augment=strnog", "--results", str(tmp_path)),
                      "augment=strnog", "strong")


@pytest.mark.parametrize("change,fragments", [
    ({"axes/augment": ["weak", "strnog"]}, ["axes.augment", "'strong'"]),
    ({"axes/fraction": [1.5]}, ["fraction", "outside (0, 1]"]),
    ({"scales/tiny/teachers/small/model": "vit_tiny_patch16_24"}, ["unknown model", "vit_tiny_patch16_224"]),
    ({"scales/tiny/student": "emb_vit_ss"}, ["unknown model", "emb_vit_s"]),
    ({"axes/teacher": ["smal"]}, ["axes.teacher", "'small'"]),
    ({"axes/kd.tau_tt": [1.0]}, ["unknown config key", "tau_t"]),
    ({"scales/tiny/config/epochs": "many"}, ["epochs", "int"]),
    ({"scales/tiny/config/augment": "strong"}, ["scales.tiny.config.augment", "is an axis of the suite"]),
    ({"scales/tiny/teachers/small/train": None, "scales/tiny/teachers/small/checkpoint": "/nonexistent.pt"},
     ["checkpoint", "not found"]),
])
def test_suite_validation_names_file_key_and_allowed_values(tmp_path, change, fragments, capsys):
    suite = write_suite(tmp_path / "bad.yaml", **change)
    cli_error(load_script(Path(RUN)).main, ["--suite", str(suite), "--results", str(tmp_path / "results")], capsys,
              "bad.yaml", *fragments)
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_slurm_unreachable_is_one_clear_line(tmp_path):
    import subprocess
    import sys

    e = dict(env(), SLURM_CONF=str(tmp_path / "missing.conf"))
    p = subprocess.run([sys.executable, RUN, "--suite", "degradation", "--executor", "slurm", "--profile",
                        str(ROOT / "slurm" / "local.yaml"), "--results", str(tmp_path / "r")],
                       env=e, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_user_error(p, "--executor slurm")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("small_suite")  # one worker runs the shared suite
def test_local_suite_runs_teacher_first_and_finishes(small_suite_results):
    d, suite, p = small_suite_results
    res = d / "results"
    students = [json.loads(f.read_text()) for f in (res / "small" / "tiny").glob("*/result.json")]
    teachers = [json.loads(f.read_text()) for f in (res / "teachers" / "tiny").glob("*/result.json")]
    assert len(students) == 6 and len(teachers) == 1
    assert all(r["status"] == "done" for r in students + teachers)
    t_done = json.loads(next((res / "teachers" / "tiny").glob("*/result.json")).read_text())["finished_at"]
    distilled = [r for r in students if r["method"] != "ce"]
    assert all(r["teacher_top1"] == pytest.approx(teachers[0]["final_top1"]) for r in distilled)
    assert all(r["finished_at"] >= t_done for r in distilled), "students wait for their teacher"
    assert "7/7 runs finished" in p.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("small_suite")  # one worker runs the shared suite
def test_second_invocation_of_a_finished_suite_does_nothing(small_suite_results):
    d, suite, _ = small_suite_results
    p = run_cli(RUN, "--suite", str(suite), "--results", str(d / "results"))
    assert p.returncode == 0 and "nothing to do" in p.stdout, p.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("small_suite")  # one worker runs the shared suite
def test_status_lists_every_run(small_suite_results):
    d, suite, _ = small_suite_results
    p = run_cli(RUN, "--suite", str(suite), "--results", str(d / "results"), "--status")
    assert p.returncode == 0
    lines = p.stdout.strip().splitlines()
    assert "7 runs: 7 done" in lines[0] and len(lines) == 2 + 7
    assert all(l.startswith("done") for l in lines[2:]) and "train.log" in lines[2]


@pytest.mark.slow
@pytest.mark.xdist_group("small_suite")  # one worker runs the shared suite
def test_failed_runs_are_retried_and_locked_runs_skipped(small_suite_results, tmp_path):
    from mkd.rundir import RunDir

    d, suite, _ = small_suite_results
    res = tmp_path / "results"
    shutil.copytree(d / "results", res)
    runs = sorted((res / "small" / "tiny").glob("*/result.json"))
    failed_dir, locked_dir = runs[0].parent, runs[1].parent
    failed_dir.joinpath("result.json").write_text(json.dumps(Result.failed(failed_dir.name, "test").to_dict()))
    locked_dir.joinpath("result.json").unlink()
    p = run_cli(RUN, "--suite", str(suite), "--results", str(res), "--status")
    assert p.returncode == 1 and "failed" in p.stdout and "pending" in p.stdout
    with RunDir(locked_dir).lock():
        p = run_cli(RUN, "--suite", str(suite), "--results", str(res))
        status = run_cli(RUN, "--suite", str(suite), "--results", str(res), "--status").stdout
    assert p.returncode == 0, p.stdout + p.stderr
    assert "running in another process" in p.stderr and "1/1 runs finished" in p.stdout
    assert json.loads((failed_dir / "result.json").read_text())["status"] == "done"
    assert list(failed_dir.glob("result.failed.*.json")), "the failure record is kept"
    assert not (locked_dir / "result.json").exists(), "a locked run is left to its owner"
    assert "running" in status


@pytest.mark.slow
def test_failed_teacher_blocks_its_students_and_exit_is_nonzero(tmp_path):
    suite = write_suite(tmp_path / "fails.yaml", **{"scales/tiny/teachers/small/train": {"epochs": 2, "lr": 1e30,
                                                                                        "warmup_epochs": 0, "log_every": 1}})
    p = run_cli(RUN, "--suite", str(suite), "--results", str(tmp_path / "r"), "--filter", "seed=0",
                "--filter", "method=kd,mkd")
    assert p.returncode == 1
    assert "3 run(s) failed" in p.stderr and "teacher" in p.stdout and "non-finite" in p.stderr


@pytest.mark.slow
def test_a_method_added_as_one_file_runs_through_a_suite_and_the_tables_without_changing_other_run_ids(tmp_path):
    import os
    import subprocess
    import sys

    from mkd.errors import UserError

    # under Mixup/CutMix (augment=strong): the toy method reads the hard labels of both mixed images
    suite = write_suite(tmp_path / "toy.yaml", **{"axes/method": ["ce", "kd", "toy"], "axes/seed": [0],
                                                  "axes/augment": ["strong"], "table": "degradation"})
    res = tmp_path / "r"
    with pytest.raises(UserError, match="toy"):  # this process has not imported it: an unknown method
        expand(str(suite), "tiny", res)
    e = dict(env(), MKD_METHODS="toy_method", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))

    def cli(*args):
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)

    p = cli(RUN, "--suite", str(suite), "--results", str(res))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    p = cli(str(ROOT / "analysis" / "make_tables.py"), "--results", str(res), "--out", str(tmp_path / "t"))
    assert p.returncode == 0, p.stderr
    # the runs of the other methods have the ids they have without the toy method and its option section
    without = expand(str(write_suite(tmp_path / "toy.yaml", **{"axes/method": ["ce", "kd"], "axes/seed": [0],
                                                               "axes/augment": ["strong"]})), "tiny", res)
    trained = {d.name for d in (res / "toy" / "tiny").iterdir() if d.is_dir() and not d.name.startswith(".")}
    assert {r.run_id for r in without.students} < trained and len(trained) == len(without.students) + 1
    md = (tmp_path / "t" / "toy_tiny.md").read_text()
    header = next(l for l in md.splitlines() if l.startswith("| teacher"))
    row = next(l for l in md.splitlines() if l.startswith("| small"))
    assert "| Toy KD |" in header and "augment=strong" in md and len(row.split("|")) == len(header.split("|"))
    toy = json.loads(next(f for f in (res / "toy" / "tiny").glob("*/result.json")
                          if json.loads(f.read_text())["method"] == "toy").read_text())
    assert f"{toy['final_top1']:.2f}" in row
    info = json.loads(next((res / "toy" / "tiny").glob("*/run.json")).read_text())
    assert info["table"] == "degradation" and "label" in info["method"]


@pytest.mark.slow
def test_a_cpu_run_gives_the_same_weights_whatever_the_pool_parallelism(tmp_path):
    """Each CPU run has a fixed intra-op thread count (MKD_CPU_THREADS, default 1), so --max-parallel 1 and 2
    train the same runs to the same weights."""
    import torch

    suite = write_suite(tmp_path / "s.yaml", **{"axes/method": ["ce"], "axes/seed": [0, 1]})
    for n in (1, 2):
        p = run_cli(RUN, "--suite", str(suite), "--results", str(tmp_path / f"r{n}"), "--max-parallel", str(n))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    runs = sorted((tmp_path / "r1" / "s" / "tiny").glob("*/model.pt"))
    assert len(runs) == 2
    for m1 in runs:
        m2 = tmp_path / "r2" / "s" / "tiny" / m1.parent.name / "model.pt"
        w1, w2 = torch.load(m1)["model"], torch.load(m2)["model"]
        assert all(torch.equal(w1[k], w2[k]) for k in w1), m1.parent.name
        for r in (m1.parent, m2.parent):
            assert json.loads((r / "result.json").read_text())["environment"]["cpu_threads"] == 1


def test_a_suite_whose_runs_are_all_finished_still_records_them_in_run_json(tmp_path):
    """Finished runs a suite reuses (another suite's, an older launcher's) get the current run.json: the rows they
    serve, the suite, the method's declarations the analysis reads (e.g. its starting temperatures for epoch 0)."""
    from mkd.launch import run_local
    from mkd.results import Result

    plan = expand("degradation", "tiny", tmp_path, filters={"augment": ["weak"]}, axes={"seed": [0]}, tune=False)
    for r in plan.runs:
        r.dir.path.mkdir(parents=True, exist_ok=True)
        r.dir.result.write_text(json.dumps({**Result.failed(r.run_id, "").to_dict(), "status": "done"}))
    assert run_local(plan, max_parallel=1, quiet=True) == []
    for r in plan.runs:
        info = json.loads(r.dir.info.read_text())
        assert info["suite"] == ("degradation" if r.kind != "teacher" else None) and r.rows[0] in info["rows"]
        if r.config.method == "mkd":
            assert info["method"]["initial_temperatures"] == {"tau_t": r.config.kd.tau_t or r.config.kd.tau,
                                                              "tau_s": r.config.kd.tau_s or r.config.kd.tau}
