"""The documentation a user follows works: every relative link and anchor in README.md and docs/ resolves (GitHub's
heading slugs), every command in a code block names a script, module or make target that exists and flags that
script accepts, and the README's suites table is what the suites expand to."""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "benchmarks").rglob("README.md"))]
DOCS = [d for d in DOCS if "reference/runs" not in d.as_posix()]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        s = slug(line.lstrip("#"))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    out |= set(re.findall(r'<a (?:name|id)="([^"]+)"', path.read_text()))
    return frozenset(out)


def links(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    for m in LINK.finditer(text):
        yield m.group(1) or m.group(2)


def test_the_slug_rule_matches_githubs():
    assert slug("What a plan costs (`--dry-run`)") == "what-a-plan-costs---dry-run"
    assert slug("Q3 cure: MKD's gain") == "q3-cure-mkds-gain"
    assert slug("A cluster, step by step") == "a-cluster-step-by-step"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


COMMAND = re.compile(r"^(sudo |env |[A-Z_]+=\S* )*(\S*python3?|make|\S+\.sh|\S+\.py)( |$)")


def commands(path):
    """The command lines of a document's shell and plain code blocks (synopses too) and inline code, continuations
    joined, comments dropped."""
    text = path.read_text()
    inline = [c for c in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
              if re.match(r"(\S*python3?|make) ", c)]  # inline paths may name other projects' files
    for block in [*re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S), *inline]:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip().removeprefix("$ ")
            if not COMMAND.match(line):
                continue  # a layout tree, output, a comment
            try:
                words = shlex.split(line, comments=True)
            except ValueError as e:  # an unbalanced quote is itself a documentation bug
                yield line, ["<unparsable>", str(e)]
                continue
            for part in " ".join(shlex.quote(w) if w not in ("&&", ";", "|") else w for w in words) \
                    .replace(" ; ", " && ").replace(" | ", " && ").split(" && "):
                yield line, shlex.split(part)


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


@functools.cache
def help_text(entry: tuple[str, ...]) -> str:
    p = subprocess.run([sys.executable, *entry, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{' '.join(entry)} --help failed: {p.stderr[-500:]}"
    return p.stdout


def check_command(words: list[str]) -> str | None:
    """None if the command is sound, otherwise what is wrong with it."""
    while words and re.match(r"^[A-Z_]+=", words[0]) or words[:1] in (["sudo"], ["env"], ["time"]):
        words = words[1:]
    if not words:
        return None
    head = words[0]
    if head == "<unparsable>":
        return words[1]
    if head == "make":
        targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        missing = [t for t in targets if t not in makefile_targets()]
        return f"make targets {missing} are not in the Makefile" if missing else None
    if re.search(r"(^|/)python3?$", head):
        if words[1:2] == ["-c"]:
            try:
                compile(words[2], "<doc>", "exec")
            except SyntaxError as e:
                return f"python -c code does not parse: {e}"
            return None
        if words[1:2] == ["-m"]:
            module = words[2]
            if not module.startswith("mkd"):
                return None  # pip, pytest: not ours
            entry, rest = ("-m", module), words[3:]
        else:
            script = words[1]
            if not (ROOT / script).exists():
                return f"{script} does not exist"
            entry, rest = (script,), words[2:]
        text = help_text(entry)
        flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", " ".join(rest))
        unknown = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
        return f"{' '.join(entry)} does not accept {unknown}" if unknown else None
    if "/" in head and not head.startswith(("/", "$", "~", ".venv")):
        return None if (ROOT / head).exists() else f"{head} does not exist"
    return None


def test_a_bad_command_is_caught():
    assert check_command(["python", "benchmarks/run.py", "--suite", "x", "--no-such-flag"]) is not None
    assert check_command(["make", "no-such-target"]) is not None
    assert check_command(["python", "benchmarks/nope.py"]) is not None
    assert check_command(["python", "benchmarks/run.py", "--suite", "degradation", "--dry-run"]) is None


@pytest.mark.parametrize("doc", [d for d in DOCS if list(commands(d))], ids=lambda d: d.relative_to(ROOT).as_posix())
def test_every_documented_command_names_what_exists(doc):
    wrong = [f"`{line}`: {why}" for line, words in commands(doc) if (why := check_command(words))]
    assert not wrong, f"{doc.relative_to(ROOT)}:\n" + "\n".join(wrong)


def test_the_price_book_and_the_readme_suites_table_are_what_the_plans_give(tmp_path):
    """benchmarks/prices.json (the scoreboard's prices) is what the cost model makes of the suites as committed, and
    the README's suites table is rendered from it: a suite or cost change without `make prices` fails here."""
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import prices

    out = tmp_path / "prices.json"
    assert prices.main(["--out", str(out)]) == 0
    fresh, held = json.loads(out.read_text()), json.loads((ROOT / "benchmarks" / "prices.json").read_text())
    fresh.pop("date"), held.pop("date")

    def close(a, b) -> bool:  # FLOP counts move by ~1% between torch versions (make test-lowest): not staleness
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        if isinstance(a, float) or isinstance(b, float):
            return abs(a - b) <= 0.03 * max(abs(a), abs(b)) + 1e-4
        return a == b

    assert close(fresh, held), "benchmarks/prices.json is stale: run make prices"
    readme = (ROOT / "README.md").read_text()
    assert prices.readme_with_table(readme, held) == readme, "the README's suites table is stale: run make prices"
    table = prices.suites_table(held)
    assert table.count("\n") == 2 + len(held["plans"]) and "| `degradation` |" in table
