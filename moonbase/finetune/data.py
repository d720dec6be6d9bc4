"""Fine-tuning data: JSONL files or Python iterables of rows, as typed examples.

One row per example, keys by skill (image paths are relative to the JSONL file):

    {"image": "a.jpg", "question": "What is this?", "answer": "a cat"}             query
    {"image": "a.jpg", "question": "...", "answer": "...", "reasoning": "..."}      query with a trace
    {"image": "a.jpg", "object": "cat", "boxes": [[x_min, y_min, x_max, y_max]]}   detect
    {"image": "a.jpg", "object": "cat eye", "points": [[x, y]]}                    point
    {"image": "a.jpg", "object": "cat", "points": [], "boxes": [...], "skill": "point"}  point, scored by boxes
    {"image": "a.jpg", "object": "cat", "path": "M 0.1 0.2 L ...", "bbox": {...}}     segment (Moondream 3)

Optional: "skill" (overrides the inference from keys), "spatial_refs", "settings". Boxes may also be
{"x_min", ...} objects and points {"x", "y"}. The names of the public fine-tuning walkthroughs are accepted
too: "image_path" for "image", "prompt" for "question", "response" for "answer". Errors name the file and line.

COCO detection annotations (`load_coco`) become detect rows: one per image and category it contains, the
category name as the object, the boxes normalized.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TuningError
from ..jsonl import jsonl_rows
from ..skills import SkillRequest
from ..skills.training import Target
from .types import parse_target, parse_tuning_request

SKILL_OF_KEY = {"question": "query", "path": "segment", "points": "point", "boxes": "detect"}  # first key present wins
TARGET_KEYS = ("answer", "reasoning", "boxes", "points", "path", "bbox")
ALIASES = {"image_path": "image", "prompt": "question", "response": "answer"}  # the walkthroughs' names


@dataclass(frozen=True)
class LabeledRequest:
    request: SkillRequest
    target: Target
    row: dict[str, Any]  # the row as given (a user reward function receives it)
    where: str  # file:line, or <iterable>:index


def _canonical(row: dict[str, Any]) -> dict[str, Any]:
    for alias, key in ALIASES.items():
        if alias in row and key in row:
            raise TuningError(f"give {key} or {alias}, not both")
    return {ALIASES.get(k, k): v for k, v in row.items()}


def parse_row(row: Any, base_dir: Path | None, where: str) -> LabeledRequest:
    given = row
    try:
        if not isinstance(row, dict):
            raise TuningError(f"a row must be a JSON object, got {type(row).__name__}")
        row = _canonical(row)
        skill = row.get("skill") or next((s for k, s in SKILL_OF_KEY.items() if k in row), None)
        if skill is None:
            raise TuningError("cannot tell the skill: give question+answer, object+boxes, object+points, object+path, or skill")
        image = row.get("image")
        if image is None:
            raise TuningError("image is required")
        if isinstance(image, str):
            path = Path(image).expanduser()
            path = path if path.is_absolute() or base_dir is None else base_dir / path
            if not path.is_file():
                raise TuningError(f"no such image file: {path}")
            image = path
        fields = {k: row[k] for k in ("question", "object", "spatial_refs", "settings") if k in row}
        request = parse_tuning_request({"skill": skill, "image": image} | fields, lambda v: v)  # loaded when used
        target = parse_target(request, {k: row[k] for k in TARGET_KEYS if k in row})
        return LabeledRequest(request, target, given, where)
    except TuningError as e:
        raise TuningError(f"{where}: {e}") from None


def load_jsonl(path: str | Path) -> list[LabeledRequest]:
    path = Path(path)
    if not path.is_file():
        raise TuningError(f"no such data file: {path}")
    out = [parse_row(row, path.parent, f"{path}:{n}") for n, row in jsonl_rows(path, TuningError)]
    if not out:
        raise TuningError(f"{path} holds no examples")
    return out


def load_coco(annotations: str | Path, images: str | Path) -> list[LabeledRequest]:
    """Detect examples from COCO annotations: per image, one per category present (crowd boxes left out)."""
    path, images = Path(annotations), Path(images)
    try:
        coco = json.loads(path.read_text())
        cats = {c["id"]: c["name"] for c in coco["categories"]}
        info = {i["id"]: i for i in coco["images"]}
        boxes: dict[tuple[int, int], list[list[float]]] = {}
        for k, a in enumerate(coco["annotations"]):
            if a.get("iscrowd"):
                continue
            img = info.get(a["image_id"])
            if img is None or a["category_id"] not in cats:
                raise TuningError(f"annotations[{k}] names an image or category the file does not list")
            x, y, w, h = a["bbox"]
            W, H = img["width"], img["height"]
            boxes.setdefault((a["image_id"], a["category_id"]), []).append([x / W, y / H, (x + w) / W, (y + h) / H])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TuningError(f"{path}: not COCO detection annotations ({type(e).__name__}: {e})") from None
    rows = [
        ({"image": str(images / info[i]["file_name"]), "object": cats[c], "boxes": b}, f"{path}:image {i}, {cats[c]}")
        for (i, c), b in sorted(boxes.items())
    ]
    if not rows:
        raise TuningError(f"{path} holds no boxes")
    return [parse_row(row, None, where) for row, where in rows]


def from_iterable(rows: Iterable[Any], base_dir: str | Path | None = None) -> list[LabeledRequest]:
    """Rows as dicts; images may be paths, PIL images or HxWx3 uint8 arrays."""
    base = None if base_dir is None else Path(base_dir)
    return [parse_row(row, base, f"<iterable>:{i}") for i, row in enumerate(rows)]


def split(examples: list[LabeledRequest], held_out: float | int, seed: int = 0) -> tuple[list, list]:
    """(train, held out): a fraction (< 1) or a count of examples, drawn with `seed`."""
    n = len(examples)
    k = int(round(held_out * n)) if isinstance(held_out, float) and held_out < 1 else int(held_out)
    k = max(0, min(k, n - 1))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
