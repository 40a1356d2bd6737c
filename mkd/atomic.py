"""Atomic file writes: write to a temp name in the same folder, then rename.

A killed process therefore never leaves a half-written result, metrics or checkpoint file.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_bytes(path: str | os.PathLike, data: bytes, keep_previous: str | os.PathLike | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def write_dumped(path: str | os.PathLike, dump: Callable[[io.BytesIO], Any],
                 keep_previous: str | os.PathLike | None = None) -> None:
    """What ``dump(file)`` writes (e.g. ``lambda f: torch.save(obj, f)``), atomically; with ``keep_previous`` the file
    it replaces stays there until the new one is whole (a damaged newest checkpoint then falls back to it).  This
    module imports no torch: the analysis writes its files through it too."""
    buf = io.BytesIO()
    dump(buf)
    write_bytes(path, buf.getvalue(), keep_previous)


class Damaged(ValueError):
    """A file exists but cannot be read whole (cut short by a crash of another tool, a copy, a full disk)."""


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed file, or None when it is missing; ``Damaged`` when it cannot be parsed."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Damaged(f"{path} is damaged ({type(e).__name__})") from None


def move_aside(path: str | os.PathLike) -> Path:
    """Keep a damaged file for inspection under ``NAME.damaged.<time>`` instead of deleting it."""
    import time

    path = Path(path)
    dest = path.with_name(f"{path.name}.damaged.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}")
    os.replace(path, dest)
    return dest
