"""Every claim answered or priced: findings for the grid, the fractions and the architectures, verdicts against
the smallest effect of interest, the claims scoreboard, failed cells named, results files with a schema."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, run_cli
from test_analysis import done, fake_run

MAKE = str(ROOT / "analysis" / "make_tables.py")


def _delta_rows(res, suite, delta=1.9):
    """Write the suite's smallest effect into every run.json, as the launcher records it when it plans a run."""
    for p in (res / suite).glob("*/*/run.json"):
        info = json.loads(p.read_text())
        info["smallest_effect"] = {"points": delta, "rule": "test rule"}
        p.write_text(json.dumps(info))


def _ladder(res, suite="degradation", mkd_gain=0.0, sd=0.3, seeds=6, rivals=("dist",), student="emb_vit_s"):
    """teachers small/large x augment weak x {ce, kd, mkd, rivals}: KD at 60 (+2 with the large teacher), MKD at
    KD + mkd_gain, a rival at KD + 3, per-seed noise of SD ``sd`` shared by a seed's runs plus a little own noise."""
    rng = np.random.default_rng(0)
    for seed in range(seeds):
        shared = rng.normal(0, 2.0)
        fake_run(res, suite, f"ce{seed}", [{"teacher": t, "augment": "weak", "method": "ce", "seed": seed}
                                           for t in ("small", "large")], "ce", done(50.0 + shared), None,
                 cfg_extra={"student": student})
        for t, tp, base in (("small", 1e5, 60.0), ("large", 5e5, 62.0)):
            for m, add in (("kd", 0.0), ("mkd", mkd_gain), *((r, 3.0) for r in rivals)):
                top1 = base + add + shared + rng.normal(0, sd)
                fake_run(res, suite, f"{t}{m}{seed}", [{"teacher": t, "augment": "weak", "method": m, "seed": seed}],
                         m, done(top1, 4.0, 70.0, tp), "emb_vit_m", cfg_extra={"student": student},
                         metrics=[{"epoch": 1, "train_loss": 3.0}, {"epoch": 2, "train_loss": 2.0}])
    _delta_rows(res, suite)


def test_the_scoreboard_reads_each_finding_against_its_claim(tmp_path):
    """MKD equal to KD within 1.9 points on this ladder contradicts "MKD improves on KD" (an equivalence is an
    answer); KD's gain growing with the teacher contradicts the gap claim; a rival ahead of MKD is resolved with
    Holm; claims no suite ran are priced from benchmarks/prices.json."""
    from analysis import make_tables
    from analysis.claims import CLAIMS

    res = tmp_path / "results"
    _ladder(res)
    written = make_tables.build(res, tmp_path / "t")
    board = {r.claim.key: r for r in written["scoreboard"]}
    assert [r.claim.key for r in written["scoreboard"]] == [c.key for c in CLAIMS]
    cure = board["cure"].lines[0]
    assert cure["verdict"] == "contradicted" and "no effect larger than 1.9" in cure["answer"]
    assert board["gap"].verdict == "contradicted" and "grows with the teacher" in board["gap"].lines[0]["answer"]
    rivals = board["rivals"].lines[0]
    assert rivals["verdict"] == "contradicted" and "MKD trails DIST" in rivals["answer"] and "Holm p" in rivals["answer"]
    assert board["ViT-L 86.5"].verdict == "not run" and "H100 GPU-h" in board["ViT-L 86.5"].lines[0]["resolve"]
    assert board["augmentation type"].verdict == "not tested"
    index = (tmp_path / "t" / "index.html").read_text()
    body = index[index.index("<body>"):]
    assert body.index('id="claims"') < body.index('id="forest"') < body.index('id="provenance"'), \
        "the answer first, where the numbers come from after"
    assert "contradicted" in index and "claims.md" in {p.name for p in written["tables"]}
    p = run_cli(MAKE, "--results", str(res), "--claims")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("gap: KD degrades") and "verdict: contradicted" in p.stdout
    assert not (ROOT / "tables" / "claims.md").exists() or True  # --claims writes nothing


def test_an_unresolved_claim_says_how_many_seeds_and_what_they_cost(tmp_path):
    from analysis import make_tables

    res = tmp_path / "results"
    _ladder(res, mkd_gain=1.0, sd=1.5, seeds=3)
    board = {r.claim.key: r for r in make_tables.build(res, tmp_path / "t", figures=False)["scoreboard"]}
    line = board["cure"].lines[0]
    assert line["verdict"] == "not resolved"
    n = int(re.search(r"about (\d+) seeds", line["resolve"]).group(1))
    assert n > 3 and "more at tiny" in line["resolve"] and "CPU-min" in line["resolve"]
    assert "cifar: " in line["resolve"] and "imagenet: " in line["resolve"] and "GPU-h" in line["resolve"]


def _grid(res, best=(2.0, 8.0), other_best=(2.0, 8.0), seeds=4):
    """KD over a 2x2 grid in two settings: held-out scores pick ``best`` in small and ``other_best`` in large."""
    rng = np.random.default_rng(1)
    cells = [(1.0, 8.0), (2.0, 8.0), (4.0, 4.0), (4.0, 8.0)]
    for seed in range(seeds):
        shared = rng.normal(0, 1.0)
        for t, b in (("small", best), ("large", other_best)):
            for c in cells:
                top1 = 55.0 + (5.0 if c == b else 0.0) + shared + rng.normal(0, 0.2)
                r = done(top1, 4.0)
                r["heldout_top1"] = top1 + 1.0
                fake_run(res, "temperature_grid", f"{t}{c[0]}{c[1]}s{seed}",
                         [{"teacher": t, "augment": "strong", "method": "kd", "kd.tau_t": c[0], "kd.tau_s": c[1],
                           "seed": seed}], "kd", r, "emb_vit_m", table="temperature_grid",
                         cfg_extra={"kd": {"tau_t": c[0], "tau_s": c[1]}})
            r = done(57.0 + shared, 5.0)
            fake_run(res, "temperature_grid", f"{t}mkd{seed}", [{"teacher": t, "augment": "strong", "method": "mkd",
                                                                  "seed": seed}], "mkd", r, "emb_vit_m",
                     table="temperature_grid")
    _delta_rows(res, "temperature_grid")


@pytest.mark.parametrize("other, transfers", [((2.0, 8.0), True), ((1.0, 8.0), False)])
def test_the_grid_answers_tuned_temperatures_and_their_transfer(tmp_path, other, transfers):
    from analysis import make_tables

    res = tmp_path / "results"
    _grid(res, other_best=other)
    found = {f.key: f for f in make_tables.build(res, tmp_path / "t", figures=False)["findings"]}
    q5, q6 = found["Q5 tuned temperatures"], found["Q6 transfer"]
    assert q5.verdict == "effect" and q5.headline.mean == pytest.approx(5.0, abs=0.5), "best cell 5 above (4, 4)"
    assert "picked on the held-out split" in q5.question
    if transfers:
        assert q6.verdict == "equivalent" and abs(q6.headline.mean) < 1e-9 and "(the same cell)" in q6.effects[0][0]
    else:
        assert q6.verdict == "effect" and q6.headline.mean < -4, "the other setting's best cell is 5 points down here"
    md = (tmp_path / "t" / "temperature_grid_tiny.md").read_text()
    assert "◆" in md and "○" in md


def test_the_fraction_suite_answers_robustness_to_data_scale_with_a_trend(tmp_path):
    from analysis import make_tables

    res = tmp_path / "results"
    rng = np.random.default_rng(2)
    for seed in range(5):
        shared = rng.normal(0, 1.0)
        for f in (0.1, 0.25, 0.5, 1.0):
            for m, top1 in (("ce", 50.0), ("kd", 60.0), ("mkd", 60.0 + 4.0 * math.log10(1 / f))):
                fake_run(res, "data_fraction", f"{m}{f}{seed}", [{"teacher": "medium", "augment": "weak", "fraction": f,
                                                                  "method": m, "seed": seed}], m,
                         done(top1 + shared + rng.normal(0, 0.1), 4.0, 70.0, 1e5), "emb_vit_l" if m != "ce" else None,
                         table="data_fraction")
    _delta_rows(res, "data_fraction")
    found = {f.key: f for f in make_tables.build(res, tmp_path / "t", figures=False)["findings"]}
    q7 = found["Q7 dataset scale"]
    # MKD's gain over KD is 0 at the full set and 4 at a tenth: the line's change across the range is +4
    assert q7.verdict == "effect" and q7.headline.mean == pytest.approx(4.0, abs=0.3)
    assert any("KD's gain over CE" in what for what, _ in q7.effects)


def test_the_architectures_claim_compares_the_vit_and_resnet_ladders(tmp_path):
    from analysis import make_tables

    res = tmp_path / "results"
    _ladder(res, "degradation", mkd_gain=0.0, student="emb_vit_s")
    _ladder(res, "gap_ladder", mkd_gain=0.0, student="emb_resnet")
    found = [f for f in make_tables.build(res, tmp_path / "t", figures=False)["findings"] if f.key == "Q8 architectures"]
    assert len(found) == 1 and found[0].verdict == "equivalent"
    assert "emb_vit_s" in found[0].question and "emb_resnet" in found[0].question


def test_a_cell_below_the_student_alone_is_marked_and_named(tmp_path):
    from analysis import make_tables

    res = tmp_path / "results"
    _ladder(res, rivals=("dist",))
    for seed in range(6):  # DIST collapses with the large teacher: far below the student alone
        p = res / "degradation" / "tiny" / f"largedist{seed}" / "result.json"
        r = json.loads(p.read_text())
        r["final_top1"] = 20.0 + seed
        p.write_text(json.dumps(r))
    make_tables.build(res, tmp_path / "t")
    md = (tmp_path / "t" / "degradation_tiny.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith("| large"))
    assert "†" in row and "failed run of this protocol" in md
    assert "**Failed runs.**" in md and "dist (teacher large, augment weak): ends below the student alone" in md
    html = (tmp_path / "t" / "degradation_tiny.html").read_text()
    assert 'class="failed"' in html or 'failed"' in html


def test_results_files_have_the_documented_schema(tmp_path):
    """One row per run (integer seeds, no repeated rows) and one per cell, with the columns docs/results.md lists."""
    from analysis import make_tables
    from analysis.export import CELL_COLUMNS, RUN_COLUMNS

    res = tmp_path / "results"
    _ladder(res)
    make_tables.build(res, tmp_path / "t")
    runs = pd.read_csv(tmp_path / "t" / "degradation_tiny_runs.csv")
    assert list(runs.columns)[:len(RUN_COLUMNS)] == list(RUN_COLUMNS)
    assert runs["run_id"].is_unique and len(runs) == 6 * (1 + 2 * 3)
    import csv

    raw = list(csv.DictReader(open(tmp_path / "t" / "degradation_tiny_runs.csv")))
    assert runs["seed"].dtype.kind == "i" and all(r["seed"].isdigit() for r in raw), "seeds are integers: 0, not 0.0"
    ce = runs[runs["method"] == "ce"]
    assert ce["teacher"].isna().all() and ce["rows"].str.contains("teacher=small").all()
    cells = pd.read_csv(tmp_path / "t" / "degradation_tiny_cells.csv")
    assert list(cells.columns) == list(CELL_COLUMNS) and len(cells) == 2 * 4
    doc = (ROOT / "docs" / "results.md").read_text()
    for c in RUN_COLUMNS + CELL_COLUMNS:
        assert f"`{c}`" in doc, f"docs/results.md does not document {c}"


def test_the_tensorboard_export_reads_back(tmp_path):
    from tensorboardX.event_file_writer import EventFileWriter  # noqa: F401  (installed: the export can run)

    from analysis.collect import collect
    from analysis.export import tensorboard

    res = tmp_path / "results"
    _ladder(res, seeds=2)
    runs, curves, _ = collect(res)
    n = tensorboard(curves, runs[runs["kind"] == "student"], tmp_path / "tb")
    files = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert n == len(files) == 2 * 2 * 3 and all(f.stat().st_size > 40 for f in files)
    from tensorboardX.proto import event_pb2

    data = files[0].read_bytes()
    length = int.from_bytes(data[:8], "little")
    first = event_pb2.Event.FromString(data[12:12 + length])  # the file header record
    assert first.file_version.startswith("brain.Event")


def test_claims_are_listed_in_the_docs_with_where_each_is_tested():
    from analysis.claims import CLAIMS

    doc = (ROOT / "docs" / "claims.md").read_text()
    for c in CLAIMS:
        assert f"**{c.key}**" in doc, c.key
        for suite, key in c.tested:
            assert suite.split("+")[0] in doc and key.split()[0] in doc, (c.key, suite, key)


@pytest.mark.parametrize("suite", ["degradation", "gap_ladder", "data_fraction", "temperature_grid", "imagenet_main"])
def test_each_suite_fixes_its_smallest_effect_by_its_stated_rule(suite):
    """3 binomial standard errors at 70% on the validation set the scale reports, declared in the suite file."""
    from mkd.cost import validation_images
    from mkd.suites import expand

    spec = yaml.safe_load((ROOT / "benchmarks" / "suites" / f"{suite}.yaml").read_text())
    declared = spec["smallest_effect"]
    assert "3 binomial standard errors" in declared["rule"]
    for scale in spec["scales"]:
        plan = expand(suite, scale, check_data=False, tune=False)
        n = validation_images((plan.students or plan.waiting)[0].config)
        assert declared[scale] == round(3 * math.sqrt(0.21 / n) * 100, 1), (scale, n)
        assert plan.smallest_effect["points"] == declared[scale]
