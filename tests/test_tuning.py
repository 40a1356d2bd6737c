"""The same tuning budget for every method: trials as ordinary runs, scored on a held-out split of the training set,
the chosen setting recorded in each final run and printed in the table's notes."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import RUN, cli_error, load_script, run_cli, write_suite
from mkd.results import Result
from mkd.tuning import choose, parse

TUNING = {"scales": ["tiny"], "seeds": [0], "holdout": 0.2,
          "grid": {"ce": {"lr": [1.0e-3, 8.0e-3]},
                   "kd": {"lr": [2.0e-3], "setting": [{"kd.tau": 4}, {"kd.tau": 1}]}}}


def _suite(tmp_path, **changes):
    return write_suite(tmp_path / "tuned.yaml", **{"axes/method": ["ce", "kd"], "tuning": TUNING, **changes})


def test_a_tuned_suite_trains_its_trials_then_the_finals_with_the_best_held_out_setting(tmp_path):
    suite, results = _suite(tmp_path), tmp_path / "results"
    p = run_cli(RUN, "--suite", str(suite), "--results", str(results), "--max-parallel", "2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = {d.name: (json.loads((d / "run.json").read_text()), json.loads((d / "result.json").read_text()))
            for d in (results / "tuned" / "tiny").iterdir() if (d / "run.json").exists()}
    trials = {k: v for k, v in runs.items() if v[0]["kind"] == "trial"}
    finals = {k: v for k, v in runs.items() if v[0]["kind"] == "student"}
    assert len(trials) == 2 + 2 and len(finals) == 2 * 2, "2 trials per method (seed 0), then 2 seeds of each"
    for info, res in trials.values():
        assert res["heldout_top1"] is not None and res["train_images"] == 20 * 28  # 40 - 10% meta - 20% held out
    for info, res in finals.values():
        assert "heldout_top1" not in res and res["train_images"] == 20 * 36
        tuned = info["tuned"]
        scores = [t["score"] for t in tuned["trials"]]
        best = tuned["trials"][int(np.argmax(scores))]["setting"]
        assert tuned["setting"] == best and tuned["score"] == "heldout_top1"
        cfg = (results / "tuned" / "tiny" / res["run_id"] / "config.yaml").read_text()
        assert f"lr: {best['lr']}" in cfg
        for t in tuned["trials"]:  # each score is its trial's held-out top-1, never the validation top-1
            assert t["score"] == trials[t["runs"][0]][1]["heldout_top1"]
    out = tmp_path / "tables"
    make = load_script(__import__("pathlib").Path(RUN).parent.parent / "analysis" / "make_tables.py")
    assert make.main(["--results", str(results), "--out", str(out), "--format", "md,csv"]) == 0
    md = (out / "tuned_tiny.md").read_text()
    assert "Tuning:" in md and "held-out 20% of the training set" in md
    chosen = {info["method"]["name"]: info["tuned"]["setting"] for info, _ in finals.values()}
    assert f"KD: lr 0.002, kd.tau {chosen['kd']['kd.tau']:g}" in md or f"KD: lr 0.002, kd.tau {chosen['kd']['kd.tau']}" in md
    runs_csv = (out / "tuned_tiny_runs.csv").read_text()
    assert not any(t in runs_csv for t in trials), "trials are not rows of the table"
    again = run_cli(RUN, "--suite", str(suite), "--results", str(results))
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_until_its_trials_end_a_final_waits_and_says_so(tmp_path, capsys):
    suite = _suite(tmp_path)
    main = load_script(__import__("pathlib").Path(RUN)).main
    capsys.readouterr()
    assert main(["--suite", str(suite), "--results", str(tmp_path / "r"), "--status"]) == 0
    out = capsys.readouterr().out
    assert "5 pending, 4 waiting" in out  # the teacher and 4 trials, then 4 finals and out.count("waiting ") == 4
    assert "trial lr=" in out


@pytest.mark.parametrize("change, says", [
    ({"grid": {"ce": {"lr": [1e-3]}, "kd": {"lr": [1e-3, 2e-3]}}}, "every method gets the same number of trials"),
    ({"grid": {"ce": {"lr": [1e-3, 2e-3]}}}, "has no grid for method 'kd'"),
    ({"grid": {"ce": {"lr": [1e-3, 1e-3]}, "kd": {"lr": [1e-3, 2e-3]}}}, "each trial must differ"),
    ({"holdout": 1.5}, "a share of the training set in (0, 1)"),
    ({"seeds": []}, "give a list of integer seeds"),
])
def test_a_malformed_tuning_section_is_one_clear_error(tmp_path, capsys, change, says):
    suite = _suite(tmp_path, tuning={**TUNING, **change})
    main = load_script(__import__("pathlib").Path(RUN)).main
    cli_error(main, ["--suite", str(suite), "--dry-run"], capsys, says)


def test_a_tuned_key_cannot_also_be_set(tmp_path, capsys):
    main = load_script(__import__("pathlib").Path(RUN)).main
    cli_error(main, ["--suite", str(_suite(tmp_path)), "--dry-run", "--set", "lr=0.1"], capsys,
              "tunes 'lr'", "--no-tuning")
    capsys.readouterr()
    assert main(["--suite", str(_suite(tmp_path)), "--dry-run", "--set", "lr=0.1", "--no-tuning"]) == 0


def _run(run_id, status=None, score=None):
    res = None if status is None else Result(status, run_id=run_id, heldout_top1=score)
    return SimpleNamespace(run_id=run_id, res=res)


def test_choose_takes_the_best_mean_held_out_score_and_never_a_failed_trial():
    out = lambda r: r.res  # noqa: E731
    trials = [([_run("a", "done", 50.0), _run("b", "done", 60.0)], {"lr": 1}),  # mean 55
              ([_run("c", "done", 70.0), _run("d", "failed")], {"lr": 2}),     # one seed diverged: never chosen
              ([_run("e", "done", 55.0), _run("f", "done", 55.0)], {"lr": 3})]  # a tie with the first: the first wins
    c = choose(trials, out)
    assert c.overrides == {"lr": 1} and [t["score"] for t in c.scores] == [55.0, None, 55.0]
    assert choose([([_run("g")], {"lr": 1})], out).overrides is None  # not ended: waits
    assert "every trial failed" in choose([([_run("h", "failed")], {"lr": 1})], out).reason


def test_a_setting_bundle_is_one_trial_and_the_grid_is_their_product():
    t = parse(__import__("pathlib").Path("s.yaml"), {
        "scales": ["tiny"], "grid": {"dkd": {"lr": [1, 2], "setting": [{"dkd.beta": 8, "dkd.T": 4},
                                                                         {"dkd.beta": 0.5, "dkd.T": 1}]}}}, ("dkd",))
    assert t.grid["dkd"] == [{"lr": 1, "dkd.beta": 8, "dkd.T": 4}, {"lr": 1, "dkd.beta": 0.5, "dkd.T": 1},
                             {"lr": 2, "dkd.beta": 8, "dkd.T": 4}, {"lr": 2, "dkd.beta": 0.5, "dkd.T": 1}]


def test_the_held_out_split_is_class_balanced_and_disjoint_from_training_and_meta():
    from mkd.data import make_split

    labels = np.repeat(np.arange(5), 40)
    s = make_split(labels, 1.0, 0.1, 0, tune=0.2)
    assert not set(s["tune"]) & set(s["train"]) and not set(s["tune"]) & set(s["meta"])
    assert np.bincount(labels[s["tune"]]).tolist() == [8] * 5 and len(s["train"]) == 5 * 28
    plain = make_split(labels, 1.0, 0.1, 0)
    assert "tune" not in plain and set(s["train"]) < set(plain["train"]), "a trial trains on a subset of the final's"
