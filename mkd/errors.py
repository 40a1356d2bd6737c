"""User errors: one clear line naming the problem and the fix, exit status 2, never a traceback."""
from __future__ import annotations

import difflib
import functools
import sys
from typing import Callable, Iterable


class UserError(Exception):
    """A problem with the user's input (config, paths, suite); its message says how to fix it."""


def suggest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean X?)' for the closest choices, or ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI entry point: a UserError becomes one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return int(main(*args, **kwargs) or 0)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # output piped into head & co.
            sys.stderr.close()
            return 0
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
