"""The learning-rate schedule of every training loop here: a linear warm-up, then a cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, steps: int, peak: float, warmup: int, floor: float) -> float:
    """The rate at `step` (0-based) of `steps`: up from peak/warmup to `peak` over `warmup` steps, then down along a
    cosine to `floor` x peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
