"""The committed reference report is what the analysis makes of the committed reference results, and the README
quotes it rather than copying numbers by hand (`make reference` rebuilds it)."""
from __future__ import annotations

import pytest

from conftest import ROOT, run_cli

MAKE = str(ROOT / "analysis" / "make_tables.py")
REF = ROOT / "docs" / "reference"


REPORTS = ("degradation_tiny.md", "gap_ladder_tiny.md")


def test_the_reference_report_is_what_the_analysis_makes_of_the_reference_results(tmp_path):
    p = run_cli(MAKE, "--results", str(REF / "runs"), "--out", str(tmp_path), "--format", "md")
    assert p.returncode == 0, p.stderr[-2000:]
    for name in REPORTS:
        assert (tmp_path / name).read_text() == (REF / name).read_text(), \
            f"docs/reference/{name} was edited by hand or the analysis changed: run make reference"


@pytest.mark.parametrize("doc, report", [("README.md", "degradation_tiny.md"),
                                         ("docs/studies/gap_ladder.md", "gap_ladder_tiny.md"),
                                         ("docs/studies/embedded_degradation.md", "degradation_tiny.md")])
def test_the_documentation_quotes_the_reference_report(doc, report):
    """Every block between reference markers is lines of the reference report, not numbers copied by hand."""
    text = (ROOT / doc).read_text()
    blocks = [b.split("<!-- reference:end -->")[0] for b in text.split("<!-- reference:begin -->")[1:]]
    assert blocks, f"{doc} quotes no reference block"
    held = (REF / report).read_text()
    for block in blocks:
        quoted = [l.removeprefix(">").strip() for l in block.splitlines() if l.strip() and l.strip() != ">"]
        assert len(quoted) >= 3
        for line in quoted:
            assert line in held, f"{doc} quotes a line {report} does not hold: {line[:80]}"


def test_every_unresolved_finding_says_how_many_seeds_would_resolve_it():
    report = (REF / "degradation_tiny.md").read_text().splitlines()
    heads = [l for l in report if l.startswith("**Q")]
    assert [h.split(".**")[0] for h in heads] == ["**Q1 gap", "**Q2 augmentation", "**Q3 cure", "**Q4 rivals"]
    unresolved = [h for h in heads if "not resolved at this budget" in h]
    assert unresolved and all("paired SD" in h and "seeds would resolve" in h for h in unresolved)
    effects = [l for l in report if l.startswith("- ") and "P(improvement)" in l]
    assert effects and all("seeds for 80% power" in l for l in effects)


def test_the_html_report_reads_as_a_report(tmp_path):
    """index.html: a header naming the runs (suite, scale, commit, environment, dates), each finding a headline
    with its per-setting lines under it, figures with captions saying what a point is."""
    import re

    p = run_cli(MAKE, "--results", str(REF / "runs"), "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    html = (tmp_path / "index.html").read_text()
    head = html.split("<h2>Tables</h2>")[0]
    assert re.search(r'class="provenance">Suite degradation, scale tiny: 66 finished runs \(seeds 0, 1, 2\); '
                     r"commit 29054d3a35dc; torch [^;]+, cpu AVX512 \(Intel\(R\) Xeon\(R\) Processor\), 1 thread; "
                     r"finished 2026-12-02\.", head), head
    findings = html.split('<div class="findings">')[1].split("</div>")[0]
    blocks = re.findall(r'<p class="finding"><strong>(Q\d [a-z]+)\.</strong>.*?</p>\s*<ul>(.*?)</ul>', findings, re.S)
    assert [q for q, _ in blocks] == ["Q1 gap", "Q2 augmentation", "Q3 cure", "Q4 rivals"]
    assert [items.count("<li>") for _, items in blocks] == [3, 3, 3, 4], "each headline keeps its per-setting lines"
    assert "<code>--axis seed=0..N</code>" in findings
    captions = re.findall(r"<figcaption><strong>(.*?)\.</strong> (.*?)</figcaption>", html)
    assert len(captions) == 4 and all("95% t" in c for _, c in captions), captions  # two per suite
