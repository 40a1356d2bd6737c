"""Results in, tables, findings, the claims scoreboard and figures out: the analysis reads run directories
(``mkd/results.py``, ``mkd/rundir.py``) and never imports training code (``pyproject.toml``: import-linter)."""
