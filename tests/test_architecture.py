"""Structure the code promises: no import cycle in mkd/, an analysis that imports no training code."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, env


def _imports(tree):
    """Import statements anywhere (functions included: a deferred import is still a dependency), except under
    ``if TYPE_CHECKING`` and ``if __name__ == "__main__"``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ("TYPE_CHECKING" in ast.dump(node.test) or "__main__" in ast.dump(node.test)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _module_imports(path, package: str) -> set[str]:
    """Modules of mkd a module imports."""
    mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if mod.endswith(".__init__"):
        mod = mod[: -len(".__init__")]
        pkg = mod
    else:
        pkg = mod.rsplit(".", 1)[0]
    out = set()
    for node in _imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(package)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith(package):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("package", ["mkd", "analysis"])
def test_no_import_cycle(package):
    """Deferred imports (inside functions) count, and importing a.b.c runs the package a.b first."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for m, p in files.items():
        targets = _module_imports(p, package)
        # importing a.b.c runs the package a.b first, unless the importer lives in it (a package's own modules)
        targets |= {t.rsplit(".", 1)[0] for t in targets if not m.startswith(t.rsplit(".", 1)[0] + ".")}
        graph[m] = {t for t in targets if t in files and t not in (m, package)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    if package == "mkd":
        assert "mkd.methods.mkd" in graph and "mkd.meta" in graph["mkd.methods.mkd"]
    else:
        assert "analysis.findings" in graph and "analysis.tables" not in graph["analysis.findings"]


def test_the_analysis_imports_no_training_code():
    code = ("import sys; from analysis import make_tables, collect, tables, figures, findings, claims, stats; "
            "bad = [m for m in ('torch', 'timm', 'mkd.train', 'mkd.engine', 'mkd.methods') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_layering_contract_holds():
    """pyproject.toml's [tool.importlinter] contracts (the layers of docs/architecture.md), checked by
    import-linter: every import counts, deferred and TYPE_CHECKING ones included."""
    exe = Path(sys.executable).parent / "lint-imports"
    p = subprocess.run([str(exe) if exe.exists() else "lint-imports", "--no-cache"], cwd=ROOT, env=env(),
                       capture_output=True, text=True)
    assert p.returncode == 0 and "0 broken" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]
