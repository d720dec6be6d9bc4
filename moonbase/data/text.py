"""Images of short printed text (Pillow's built-in font, so every machine renders the same pixels)."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .tasks import Example, Task

WORDS = (
    "apple river stone cloud green light house paper music happy window garden silver winter summer ocean "
    "forest bread coffee orange purple yellow circle square rocket planet moon star night morning table "
    "chair phone camera water fire earth wind road city train plane boat bird fish horse tiger lion bear "
    "snow rain storm sun sky blue red black white gold open close stop start north south east west left right"
).split()
QUESTION = "What does the text say?"


def text_example(seed: int) -> Example:
    rng = random.Random(f"text-{seed}")
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    size = rng.randint(22, 34)
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = rng.randint(8, 40), rng.randint(8, 40)
    w, h = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    bg = tuple(rng.randint(170, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 80) for _ in range(3))
    im = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(im).text((pad_x - left, pad_y - top), text, font=font, fill=fg)
    return Example(np.asarray(im), (Task("query", QUESTION, text, kind="text"),), "text")
