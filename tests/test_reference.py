"""The committed reference report is what the analysis makes of the committed reference results, and the README
quotes it rather than copying numbers by hand (`make reference` rebuilds it)."""
from __future__ import annotations

from conftest import ROOT, run_cli

MAKE = str(ROOT / "analysis" / "make_tables.py")
REF = ROOT / "docs" / "reference"


def test_the_reference_report_is_what_the_analysis_makes_of_the_reference_results(tmp_path):
    p = run_cli(MAKE, "--results", str(REF / "runs"), "--out", str(tmp_path), "--format", "md")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "degradation_tiny.md").read_text() == (REF / "degradation_tiny.md").read_text(), \
        "docs/reference/degradation_tiny.md was edited by hand or the analysis changed: run make reference"


def test_the_readme_quotes_the_reference_report():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- reference:begin -->")[1].split("<!-- reference:end -->")[0]
    quoted = [l.removeprefix(">").strip() for l in block.splitlines() if l.strip() and l.strip() != ">"]
    report = (REF / "degradation_tiny.md").read_text()
    assert len(quoted) >= 4
    for line in quoted:
        assert line in report, f"README quotes a line the reference report does not hold: {line[:80]}"


def test_every_unresolved_finding_says_how_many_seeds_would_resolve_it():
    report = (REF / "degradation_tiny.md").read_text().splitlines()
    heads = [l for l in report if l.startswith("**Q")]
    assert len(heads) == 3
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
    assert re.search(r'class="provenance">Suite degradation, scale tiny: 30 finished runs \(seeds 0, 1, 2\); '
                     r"commit a49d78a2138d; torch [^;]+, cpu AVX512; finished 2026-12-02\.", head), head
    findings = html.split('<div class="findings">')[1].split("</div>")[0]
    blocks = re.findall(r'<p class="finding"><strong>(Q\d [a-z]+)\.</strong>.*?</p>\s*<ul>(.*?)</ul>', findings, re.S)
    assert [q for q, _ in blocks] == ["Q1 gap", "Q2 augmentation", "Q3 cure"]
    assert all(items.count("<li>") == 3 for _, items in blocks), "each headline keeps its three per-setting lines"
    assert "<code>--axis seed=0..N</code>" in findings
    captions = re.findall(r"<figcaption><strong>(.*?)\.</strong> (.*?)</figcaption>", html)
    assert len(captions) == 2 and all("95% t" in c for _, c in captions), captions
