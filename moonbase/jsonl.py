"""JSON Lines files: reading each non-blank line's number and parsed value (a bad line named by file:line), and
writing a whole file atomically."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import MoonbaseError, SettingsError


def jsonl_rows(path: str | Path, error: type[MoonbaseError] = SettingsError) -> Iterator[tuple[int, Any]]:
    """(line number, value) per non-blank line; `error` (naming file:line) for a line that is not JSON."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not JSON ({e.msg})") from None


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """One JSON value per line, the file replaced atomically."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
