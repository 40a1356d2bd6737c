"""Distillation methods, one module per method, registered by name (mdistiller's ``distillers/`` layout).

To add a method: write ``mkd/methods/NAME.py`` with a ``Method`` subclass (its ``name``, declarations and, if
it has options, a dataclass section) decorated with ``@register(sections={"NAME": NameConfig})``, and add
NAME to ``BUILTIN``.  A method outside this package registers the same way from its own module, named in the
environment variable ``MKD_METHODS`` (comma-separated module paths) so that every process imports it.

Built-ins are imported on first use, so ``mkd.meta`` can import ``mkd.methods.common`` while the MKD method
imports ``mkd.meta``, with no import cycle.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Callable, Optional

from .base import Method, Progress, StepContext

if TYPE_CHECKING:
    from ..fields import GeneralConfig as RunConfig  # a run's config: these fields and the methods' sections

BUILTIN = ("ce", "kd", "hard", "dist", "dkd", "ctkd", "mkd")
REGISTRY: dict[str, type[Method]] = {}
SECTIONS: dict[str, type] = {}  # option section name -> dataclass, in registration order
_loaded = False


def register(cls: Optional[type[Method]] = None, *, sections: Optional[dict[str, type]] = None) -> Callable:
    """Class decorator: ``@register`` or ``@register(sections={"name": OptionsDataclass})``."""

    def add(c: type[Method]) -> type[Method]:
        if not c.name:
            raise ValueError(f"{c.__name__} needs a class attribute name = '...'")
        for sec, dc in (sections or {}).items():
            if SECTIONS.setdefault(sec, dc) is not dc:
                raise ValueError(f"option section '{sec}' is already defined by another class")
        REGISTRY[c.name] = c
        return c

    return add(cls) if cls is not None else add


def load() -> None:
    """Import the built-in methods and those named in ``MKD_METHODS`` (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:
        importlib.import_module(f"{__name__}.{name}")
    for mod in filter(None, (m.strip() for m in os.environ.get("MKD_METHODS", "").split(","))):
        importlib.import_module(mod)


def names() -> tuple[str, ...]:
    load()
    return tuple(REGISTRY)


def get(name: str) -> type[Method]:
    load()
    return REGISTRY[name]


def sections() -> dict[str, type]:
    load()
    return dict(SECTIONS)


def build_method(cfg: "RunConfig", num_classes: int) -> Method:
    return get(cfg.method)(cfg, num_classes)


__all__ = ["Method", "Progress", "StepContext", "register", "load", "names", "get", "sections", "build_method"]
