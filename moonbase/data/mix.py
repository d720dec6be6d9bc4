"""The synthetic mixture: an endless, seeded stream of examples from every generator."""

from __future__ import annotations

import random

from .captcha import captcha_example
from .scenes import PHRASE_MIX, scene_example
from .tasks import Example
from .text import text_example

SOURCES = {"shapes": (scene_example, 0.84), "captcha": (captcha_example, 0.08), "text": (text_example, 0.08)}
SPLITS = {"train": 0, "eval": 1, "vision": 2}  # "vision": the scenes of nano's vision pre-training phase


def example_seed(split: str, seed: int, index: int) -> int:
    """Distinct, stable seeds per (split, seed, index): training and held-out streams never share one."""
    return (SPLITS[split] << 60) | ((seed & 0xFFFFF) << 40) | index


def synthetic_example(
    split: str,
    seed: int,
    index: int,
    source: str | None = None,
    max_objects: int = 8,
    locate_tasks: int = 4,
    phrase_mix: tuple[float, ...] = PHRASE_MIX,
    drills: int = 0,
    segment_tasks: int = 0,
) -> Example:
    """Example `index` of a stream; `max_objects` caps shape scenes (a training curriculum), `locate_tasks`
    sets how many detect/point tasks a shape scene carries, `phrase_mix` how their object phrases are drawn,
    `drills` how many extra extremes and count questions it adds (training only), `segment_tasks` how many
    outlines."""
    s = example_seed(split, seed, index)
    if source is None:
        source = random.Random(s).choices(list(SOURCES), weights=[weight for _, weight in SOURCES.values()])[0]
    if source == "shapes":
        return scene_example(s, max_objects, locate_tasks, phrase_mix, drills, segment_tasks)
    return SOURCES[source][0](s)
