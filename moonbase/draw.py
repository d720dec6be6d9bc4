"""Draw detect boxes, point markers and segment masks on an image (for `--draw` and the demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .image import ImageInput, load_image
from .metrics import path_mask


def annotate(
    image: ImageInput,
    objects: list[dict[str, float]] = (),
    points: list[dict[str, Any]] = (),
    out: str | Path | None = None,
    paths: list[str] = (),
) -> Image.Image:
    """Boxes outlined, points as dots, segment paths filled half-transparent."""
    arr = np.asarray(load_image(image)).copy()
    for path in paths:
        mask = path_mask(path, arr.shape[1], arr.shape[0])
        arr[mask] = (arr[mask] * 0.5 + np.array([255, 0, 255]) * 0.5).astype(np.uint8)
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    w, h = im.size
    line = max(2, round(min(w, h) / 150))
    for o in objects:
        d.rectangle((o["x_min"] * w, o["y_min"] * h, o["x_max"] * w, o["y_max"] * h), outline=(255, 0, 255), width=line)
    r = 2 * line + 2
    for p in points:
        x, y = p["x"] * w, p["y"] * h
        d.ellipse((x - r, y - r, x + r, y + r), fill=(0, 255, 255), outline=(0, 0, 0), width=max(1, line // 2))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        im.save(out)
    return im
