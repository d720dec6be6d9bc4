"""Procedural shape scenes with exact labels: coloured circles, squares, triangles and stars on plain,
gradient or noisy backgrounds. Seeded and reproducible: the same seed always gives the same scene."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (215, 35, 35),
    "green": (30, 150, 50),
    "blue": (35, 70, 215),
    "yellow": (225, 185, 15),
    "purple": (130, 50, 170),
    "orange": (240, 120, 15),
    "black": (20, 20, 20),
    "brown": (125, 75, 30),
}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: float  # normalized centre
    cy: float
    w: float  # normalized box size
    h: float

    @property
    def label(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.cx - self.w / 2, self.cy - self.h / 2, self.cx + self.w / 2, self.cy + self.h / 2)


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    shapes: tuple[Shape, ...]
    background: str


def _light(rng: random.Random) -> np.ndarray:
    """A light, low-saturation colour: every shape colour is darker, so shapes stand out from any background."""
    grey = rng.uniform(205, 240)
    return np.array([grey + rng.uniform(-10, 10) for _ in range(3)], dtype=np.float32)


def _background(rng: random.Random, w: int, h: int) -> tuple[Image.Image, str]:
    kind = rng.choice(("plain", "gradient", "noisy"))
    base = _light(rng)
    if kind == "plain":
        arr = np.broadcast_to(base, (h, w, 3)).copy()
    elif kind == "gradient":
        other = _light(rng)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        t = t[None, :, None] if t.shape[0] == w else t[:, None, None]
        arr = np.broadcast_to(base * (1 - t) + other * t, (h, w, 3)).copy()
    else:
        arr = base + np.random.default_rng(rng.getrandbits(32)).normal(0, 10, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), kind


def outline(kind: str) -> list[tuple[float, float]]:
    """A polygon shape's vertices relative to its box (0..1 across it), in drawing order."""
    if kind == "square":
        return [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
    if kind == "triangle":
        return [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)]
    if kind == "star":
        tips = [(-math.pi / 2 + i * math.pi / 5, 0.5 if i % 2 == 0 else 0.5 * 0.45) for i in range(10)]  # (angle, radius)
        return [(0.5 + rad * math.cos(a), 0.5 + rad * math.sin(a)) for a, rad in tips]
    raise ValueError(f"{kind!r} is not a polygon")


def outline_path(kind: str, box: int = 960) -> str:
    """The shape's outline as an SVG path in a `box` x `box` viewBox spanning its bounding box (integers, as
    Moondream 3's segment output): polygons exactly, the circle as four cubic Béziers."""
    if kind == "circle":
        h, k = box // 2, round(box / 2 * 0.5523)  # the usual cubic approximation of a quarter circle
        return (
            f"M {h} 0 C {h + k} 0 {box} {h - k} {box} {h} C {box} {h + k} {h + k} {box} {h} {box} "
            f"C {h - k} {box} 0 {h + k} 0 {h} C 0 {h - k} {h - k} 0 {h} 0 Z"
        )
    points = [f"{round(x * box)} {round(y * box)}" for x, y in outline(kind)]
    return "M " + " L ".join(points) + " Z"


def outline_in(kind: str, box: tuple[float, float, float, float]) -> str:
    """The shape's outline as an SVG path in image-normalized units (segment's `path`): `outline_path` mapped
    through its box (every command there is absolute, so each (x, y) pair maps to x_min + x/960 · width, ...)."""
    x0, y0, x1, y1 = box
    out, k = [], 0
    for part in outline_path(kind).split(" "):
        if part.isalpha():
            out.append(part)
            continue
        lo, span = (x0, x1 - x0) if k % 2 == 0 else (y0, y1 - y0)
        out.append(f"{lo + int(part) / 960 * span:.4f}".rstrip("0").rstrip("."))
        k += 1
    return " ".join(out)


def _draw(d: ImageDraw.ImageDraw, kind: str, x0: float, y0: float, x1: float, y1: float, fill: tuple[int, int, int]) -> None:
    if kind == "circle":
        d.ellipse((x0, y0, x1, y1), fill=fill)
    elif kind == "square":
        d.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        d.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in outline(kind)], fill=fill)


def render_scene(seed: int, n_objects: int | None = None, size: tuple[int, int] | None = None, max_objects: int = 8) -> Scene:
    """A scene of 1-`max_objects` non-overlapping shapes. Boxes are the drawn extents, normalized to the image."""
    rng = random.Random(seed)
    if size is None:
        w = rng.choice((256, 320, 384, 448, 512))
        size = (w, min(512, max(256, round(w * rng.uniform(0.65, 1.5) / 32) * 32)))
    w, h = size
    n = n_objects if n_objects is not None else rng.randint(1, max_objects)
    colors = [rng.choice(list(COLORS)) for _ in range(n)]
    image, bg = _background(rng, w, h)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float, float]] = []
    shapes = []
    for color in colors:
        for _ in range(50):  # rejection sampling for a free spot
            side = rng.uniform(0.12, 0.3) * min(w, h)
            x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] + 4 < p[0] or p[2] + 4 < box[0] or box[3] + 4 < p[1] or p[3] + 4 < box[1] for p in placed):
                break
        else:
            continue
        kind = rng.choice(SHAPES)
        _draw(draw, kind, *box, COLORS[color])
        placed.append(box)
        shapes.append(Shape(kind, color, (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h, side / w, side / h))
    return Scene(image, tuple(shapes), bg)
