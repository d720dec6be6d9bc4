"""Fine-tuning data: JSONL files or Python iterables of rows, as typed examples.

One row per example, keys by skill (image paths are relative to the JSONL file):

    {"image": "a.jpg", "question": "What is this?", "answer": "a cat"}             query
    {"image": "a.jpg", "question": "...", "answer": "...", "reasoning": "..."}      query with a trace
    {"image": "a.jpg", "object": "cat", "boxes": [[x_min, y_min, x_max, y_max]]}   detect
    {"image": "a.jpg", "object": "cat eye", "points": [[x, y]]}                    point
    {"image": "a.jpg", "object": "cat", "points": [], "boxes": [...], "skill": "point"}  point, scored by boxes

Optional: "skill" (overrides the inference from keys), "spatial_refs", "settings". Boxes may also be
{"x_min", ...} objects and points {"x", "y"}. Errors name the file and line.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TuningError
from .types import SkillRequest, Target, parse_request, parse_target


@dataclass(frozen=True)
class Example:
    request: SkillRequest
    target: Target
    row: dict[str, Any]  # the row as given (a user reward function receives it)
    where: str  # file:line, or <iterable>:index


def _skill(row: dict[str, Any]) -> str | None:
    if "skill" in row:
        return row["skill"]
    if "question" in row:
        return "query"
    if "points" in row:
        return "point"
    if "boxes" in row:
        return "detect"
    return None


def parse_row(row: Any, base_dir: Path | None, where: str) -> Example:
    try:
        if not isinstance(row, dict):
            raise TuningError(f"a row must be a JSON object, got {type(row).__name__}")
        skill = _skill(row)
        if skill is None:
            raise TuningError("cannot tell the skill: give question+answer, object+boxes, object+points, or skill")
        image = row.get("image")
        if image is None:
            raise TuningError("image is required")
        if isinstance(image, str):
            path = Path(image).expanduser()
            path = path if path.is_absolute() or base_dir is None else base_dir / path
            if not path.is_file():
                raise TuningError(f"no such image file: {path}")
            image = path
        request = {k: row[k] for k in ("question", "object", "spatial_refs", "reasoning", "settings") if k in row}
        request = parse_request(
            {"skill": skill, "image": image} | {k: v for k, v in request.items() if k != "reasoning"}, lambda v: v
        )
        target_keys = ("answer", "reasoning") if skill == "query" else ("boxes", "points")
        target = parse_target(skill, {k: row[k] for k in target_keys if k in row})
        return Example(request, target, row, where)
    except TuningError as e:
        raise TuningError(f"{where}: {e}") from None


def load_jsonl(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise TuningError(f"no such data file: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TuningError(f"{path}:{n}: not JSON ({e.msg})") from None
        out.append(parse_row(row, path.parent, f"{path}:{n}"))
    if not out:
        raise TuningError(f"{path} holds no examples")
    return out


def from_iterable(rows: Iterable[Any], base_dir: str | Path | None = None) -> list[Example]:
    """Rows as dicts; images may be paths, PIL images or HxWx3 uint8 arrays."""
    base = None if base_dir is None else Path(base_dir)
    return [parse_row(row, base, f"<iterable>:{i}") for i, row in enumerate(rows)]


def split(examples: list[Example], held_out: float | int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held out): a fraction (< 1) or a count of examples, drawn with `seed`."""
    n = len(examples)
    k = int(round(held_out * n)) if isinstance(held_out, float) and held_out < 1 else int(held_out)
    k = max(0, min(k, n - 1))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
