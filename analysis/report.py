"""Rendering: tables, suite pages and the index through jinja2 templates (``analysis/templates/``).

- ``<suite>_<scale>.html``: a whole page for one suite (its answer first: the findings' headlines; then its tables,
  figures with captions, the notes, the runs behind it, a link back to the index);
- ``<suite>_<scale>.md``: the same tables with the full numbers, and the findings (what ``make reference`` keeps);
- ``<table>.tex``: each table for a paper (booktabs);
- ``index.html``: the claims scoreboard first, then the forest plot of every method's paired difference to KD,
  each suite's headline findings with a link to its page, then where every number comes from.
"""
from __future__ import annotations

import re
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from analysis.tables import CellView, Table

TEMPLATES = Path(__file__).resolve().parent / "templates"
PX_PER_INCH = 100  # figures are drawn at 200 dpi and shown at 100 px per inch: 9 pt text is 12.5 px on screen


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=jinja2.select_autoescape(["html"]),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["tex"] = lambda s: (str(s).replace("\\", "\\textbackslash{}").replace("&", "\\&").replace("%", "\\%")
                                    .replace("_", "\\_").replace("#", "\\#").replace("±", "$\\pm$")
                                    .replace("—", "---").replace("−", "$-$").replace("†", "$^\\dagger$")
                                    .replace("◆", "$\\blacklozenge$").replace("○", "$\\circ$"))
    env.globals["spans"] = spans
    env.globals["is_view"] = lambda c: isinstance(c, CellView)
    env.filters["mdinline"] = md_inline
    return env


def md_inline(line: str) -> Markup:
    """A findings line (Markdown: **bold**, `code`, leading '- ') as HTML, escaped."""
    text = str(escape(str(line).removeprefix("- ")))
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return Markup(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text))


def spans(row: list) -> list[tuple[object, int]]:
    """Merge runs of equal neighbouring labels of a header row: [(label, colspan)]."""
    out: list[list] = []
    for label in row:
        if out and str(out[-1][0]) == str(label) and str(label) and not isinstance(label, CellView):
            out[-1][1] += 1
        else:
            out.append([label, 1])
    return [(a, b) for a, b in out]


def render_table(table: Table, fmt: str) -> str:
    """One table: Markdown (full numbers), LaTeX (full numbers) or an HTML fragment (scannable cells)."""
    return _env().get_template(f"table.{fmt}.j2").render(t=table, ncols=len(table.header[-1]))


def render_suite(page: dict, fmt: str) -> str:
    """A suite's page: ``page`` holds title, tables, findings (Markdown lines), figures, provenance, files."""
    return _env().get_template(f"suite.{fmt}.j2").render(p=page, md=lambda t: render_table(t, "md"),
                                                          tables_html=[render_table(t, "html") for t in page["tables"]])


def render_index(pages: list[dict], board: list, forest: dict | None, generated: str, across: list = ()) -> str:
    """``across``: the findings that span suites (no suite page holds them), as ``findings_lines``."""
    return _env().get_template("index.html.j2").render(pages=pages, board=board, forest=forest, generated=generated,
                                                       across=list(across))


def render_claims(board: list, fmt: str = "md", across: list = ()) -> str:
    """The claims scoreboard (``claims.py``) as Markdown, with the findings that span suites."""
    return _env().get_template(f"claims.{fmt}.j2").render(board=board, across=list(across))


def figure_entry(title: str, caption: str, paths: dict, width_in: float) -> dict:
    """A figure as the pages show it: at its own size (PX_PER_INCH), never stretched to the column."""
    return {"title": title, "caption": caption, "png": paths["png"].name, "pdf": paths["pdf"].name,
            "width": int(round(width_in * PX_PER_INCH))}
