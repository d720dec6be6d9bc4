"""User reward functions given as `module:function`. Rewards from ground truth are each skill's own
(`Skill.reward`, formulas in `eval/metrics.py`); every reward is in [0, 1]."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..errors import TuningError

RewardFn = Callable[[dict[str, Any], dict[str, Any]], float]  # (row, output) -> reward; callers clip it to [0, 1]


def load_reward(spec: str) -> RewardFn:
    """`module:function` -> the function, called as fn(row, output) with the data row and the rollout's output."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise TuningError(f"--reward must look like module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TuningError(f"cannot load reward {spec!r}: {e}") from e
    if not callable(fn):
        raise TuningError(f"reward {spec!r} is not callable")
    return fn
