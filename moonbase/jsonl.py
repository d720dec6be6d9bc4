"""Reading JSON Lines files: each non-blank line's number and parsed value, a bad line named by file:line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
