"""The committed reference reports are what the analysis makes of the committed reference results, and the README and
study pages quote them rather than copying numbers by hand (`make reference` rebuilds them)."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT, run_cli

MAKE = str(ROOT / "analysis" / "make_tables.py")
REF = ROOT / "docs" / "reference"
SUITES = ("degradation", "gap_ladder", "temperature_grid", "data_fraction")
REPORTS = tuple(f"{s}_tiny.md" for s in SUITES) + ("claims.md",)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The whole report (md and html) made from the committed reference runs, once for the module."""
    out = tmp_path_factory.mktemp("reference")
    p = run_cli(MAKE, "--results", str(REF / "runs"), "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.mark.parametrize("name", REPORTS)
def test_the_reference_report_is_what_the_analysis_makes_of_the_reference_results(made, name):
    assert (made / name).read_text() == (REF / name).read_text(), \
        f"docs/reference/{name} was edited by hand or the analysis changed: run make reference"


QUOTES = [("README.md", "claims.md"), ("docs/claims.md", "claims.md"),
          ("docs/studies/embedded_degradation.md", "degradation_tiny.md"),
          ("docs/studies/gap_ladder.md", "gap_ladder_tiny.md"),
          ("docs/studies/temperature_grid.md", "temperature_grid_tiny.md"),
          ("docs/studies/data_fraction.md", "data_fraction_tiny.md")]


@pytest.mark.parametrize("doc, report", QUOTES)
def test_the_documentation_quotes_the_reference_report(doc, report):
    """Every block between reference markers is lines of the reference report, not numbers copied by hand."""
    text = (ROOT / doc).read_text()
    blocks = [b.split("<!-- reference:end -->")[0] for b in text.split("<!-- reference:begin -->")[1:]]
    assert blocks, f"{doc} quotes no reference block"
    held = (REF / report).read_text()
    for block in blocks:
        quoted = [l.removeprefix(">").strip() for l in block.splitlines() if l.strip() and l.strip() != ">"]
        assert quoted
        for line in quoted:
            assert line in held, f"{doc} quotes a line {report} does not hold: {line[:80]}"


def test_every_claim_has_a_row_and_every_open_one_a_price():
    """The scoreboard names every claim of docs/claims.md once; a claim not resolved says how many seeds (for the
    suite's smallest effect of interest) and what they cost at each scale."""
    from analysis.claims import CLAIMS

    glance, full = (REF / "claims.md").read_text().split("### The paper's claims: what this study can say")
    keys = [c.key for c in CLAIMS]
    for table in (glance, full):
        rows = [l for l in table.splitlines() if l.startswith("| **")]
        assert [re.match(r"\| \*\*(.+?)\*\*", r).group(1) for r in rows] == keys
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split(" | ")]
        verdict, resolve = cells[3], cells[4]
        assert verdict in ("supported", "contradicted", "mixed", "not resolved", "not answerable", "not run",
                           "not tested"), r[:80]
        if verdict == "not resolved":
            assert re.search(r"about \d+ seeds \(delta [\d.]+, paired SD [\d.]+\).*tiny: [\d.,-]+ CPU-min.*"
                             r"(cifar|imagenet): [\d.,-]+ H100 GPU-h", resolve), resolve  # the scales it has


def test_every_unresolved_finding_says_how_many_seeds_would_resolve_it():
    for name in REPORTS[:-1]:
        report = (REF / name).read_text().splitlines()
        heads = [l for l in report if l.startswith("**Q")]
        assert heads, name
        unresolved = [h for h in heads if "Not resolved" in h or "not resolved (" in h]
        assert all("paired SD" in h and "seeds would detect an effect of" in h for h in unresolved), name
    degradation = (REF / "degradation_tiny.md").read_text()
    assert [h.split(".**")[0] for h in degradation.splitlines() if h.startswith("**Q")] == \
        ["**Q1 gap", "**Q2 augmentation", "**Q3 cure", "**Q4 rivals"]


def test_the_html_report_opens_with_the_answer(made):
    """index.html: the claims scoreboard first, then the forest plot of every cure against KD, then the studies, the
    provenance last; each suite page a whole page with its provenance, findings (a headline with its per-setting
    lines), tables, figures with captions, and a link back."""
    html = (made / "index.html").read_text()
    heads = re.findall(r"<h2>(.*?)</h2>", html)
    assert heads[:2] == ["The claims scoreboard", "Every cure against KD, setting by setting"], heads
    assert heads[-1] == "Where the numbers come from"
    board = html.split("<h2>The claims scoreboard</h2>")[1].split("<h2>")[0]
    from analysis.claims import CLAIMS

    assert board.count("<tr><td><strong>") == len(CLAIMS)
    assert 'class="verdict v-contradicted"' in board and 'class="verdict v-not-resolved"' in board
    assert "forest.png" in html
    across = html.split("<h2>Findings across suites</h2>")[1].split("<h2>")[0]  # no suite page holds Q8
    assert "Q8 architectures" in across and "so a difference is not the architecture" in across
    page = (made / "degradation_tiny.html").read_text()
    assert page.lower().startswith("<!doctype html>") and '<a href="index.html"' in page and "<style>" in page
    assert re.search(r'class="provenance">Suite degradation, scale tiny: 110 finished runs \(seeds 0, 1, 2, 3, 4\); '
                     r"commit b0e9c29724f7; torch [^;]+, cpu AVX512 \(Intel\(R\) Xeon\(R\) Processor\), 1 thread; "
                     r"finished 2026-12-05\.", page)
    findings = page.split('<div class="findings">')[1].split("</div>")[0]
    blocks = re.findall(r'<p class="finding"><strong>(Q\d [a-z]+)\.</strong>.*?</p>\s*<ul>(.*?)</ul>', findings, re.S)
    assert [q for q, _ in blocks] == ["Q1 gap", "Q2 augmentation", "Q3 cure", "Q4 rivals"]
    assert all(items.count("<li>") >= 2 for _, items in blocks), "each headline keeps its per-setting lines"
    captions = re.findall(r"<figcaption><strong>(.*?)\.</strong> (.*?)</figcaption>", page)
    assert len(captions) == 2 and all("95% t" in c for _, c in captions), captions


def test_the_demo_runs_the_seeds_the_reference_pilot_says_answer_its_claim():
    """`make demo` answers the gap claim at the seed count `--seeds-for gap` computes from the reference runs of its
    setting (prospective: the suite's smallest effect of interest at the measured paired SD, 80% power)."""
    demo = re.search(r"^DEMO \?= (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    seeds = demo[demo.index("--axis") + 1]
    assert seeds.startswith("seed=0..")
    setting = [w for w in demo if not w.startswith("seed=") and w != "--axis"]
    p = run_cli(str(ROOT / "benchmarks" / "run.py"), *setting, "--results", str(REF / "runs"), "--seeds-for", "gap")
    assert p.returncode == 0, p.stderr[-2000:]
    need = int(re.search(r"seeds needed: (\d+)", p.stdout).group(1))
    assert need == int(seeds.removeprefix("seed=0..")) + 1, p.stdout
    assert "now: resolved: an effect" in p.stdout  # the pilot (5 seeds) already resolves it on the reference CPU
