"""Typed, documented config fields: ``option(default, doc, choices, hashed)``.

Shared by the run config (mkd/config.py) and the option sections that methods declare (mkd/methods/), so a
method can define its own section without the config module knowing it.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import field
from typing import Any


def option(default: Any, doc: str, choices: tuple | None = None, hashed: bool = True, **kw):
    """A dataclass field carrying its documentation, allowed values and whether it enters the run id."""
    meta = {"doc": doc, "choices": choices, "hashed": hashed}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        factory = type(default) if dataclasses.is_dataclass(default) else (lambda d=default: copy.deepcopy(d))
        return field(default_factory=factory, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)
