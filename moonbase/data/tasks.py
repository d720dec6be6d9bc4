"""Training and evaluation examples: one image and the tasks asked about it, with exact answers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[float, float, float, float]  # x_min, y_min, x_max, y_max, normalized


@dataclass(frozen=True)
class Task:
    skill: str  # "caption" | "query" | "detect" | "point" | "segment"
    arg: str  # caption length, question, or object phrase
    answer: str = ""  # caption or query answer; segment: the outline as a path in image-normalized units
    boxes: tuple[Box, ...] = ()  # detect/point targets in canonical (left-to-right) order
    kind: str = ""  # evaluation bucket: caption, qa, count, captcha, text, detect, point, segment
    grounding: tuple[Box, ...] = ()  # regions a query's answer is about (training signal, not asked for)

    @property
    def points(self) -> tuple[tuple[float, float], ...]:
        return tuple(((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in self.boxes)


@dataclass(frozen=True)
class Example:
    image: np.ndarray  # HxWx3 uint8
    tasks: tuple[Task, ...]
    source: str
    regions: tuple[tuple[int, int, Box], ...] = ()  # every object: (kind index, colour index, box); training only


def canonical(boxes: list[Box]) -> tuple[Box, ...]:
    """The order objects are listed in: left to right by centre, then top to bottom."""
    return tuple(sorted(boxes, key=lambda b: (round((b[0] + b[2]) / 2, 6), (b[1] + b[3]) / 2)))
