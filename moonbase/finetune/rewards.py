"""Rewards computed from ground truth (the `/rollouts` `ground_truth` field and the CLI's default), and user
reward functions given as `module:function`. Every reward is in [0, 1].

* detect: (F1 at IoU >= 0.5, one-to-one matching + mean IoU of the optimal one-to-one assignment,
  divided by max(#predicted, #true)) / 2. Extra boxes and missed boxes both cost; both empty is 1.
* point: F1 of a maximum one-to-one matching of points to the true boxes they fall in; with true points
  only, a point hits a true point within `radius` (a square of side 2 * radius around it).
* query: exact match after normalization (lowercase, no punctuation, single spaces).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..errors import TuningError
from ..eval.metrics import exact_match, iou, match_boxes, match_points
from .types import Box, Point, QueryTarget, RegionTarget, Target

POINT_RADIUS = 0.05


def assignment(weights: list[list[float]]) -> list[tuple[int, int]]:
    """Maximum-weight one-to-one matching of rows to columns (Hungarian algorithm with potentials, O(n^3))."""
    n_rows, n_cols = len(weights), len(weights[0]) if weights else 0
    n = max(n_rows, n_cols)
    if n == 0:
        return []
    big = max((w for row in weights for w in row), default=0.0)
    cost = [[big - (weights[i][j] if i < n_rows and j < n_cols else 0.0) for j in range(n)] for i in range(n)]
    inf = float("inf")
    u, v, match, way = [0.0] * (n + 1), [0.0] * (n + 1), [0] * (n + 1), [0] * (n + 1)  # 1-based; match[col] = row
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv, used = [inf] * (n + 1), [False] * (n + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    return [(match[j] - 1, j - 1) for j in range(1, n + 1) if match[j] - 1 < n_rows and j - 1 < n_cols]


def detect_reward(pred: list[Box], true: list[Box]) -> float:
    if not pred and not true:
        return 1.0
    if not pred or not true:
        return 0.0
    tp = match_boxes(pred, true, 0.5)
    f1 = 2 * tp / (len(pred) + len(true))
    ious = [[iou(p, t) for t in true] for p in pred]
    mean_iou = sum(ious[i][j] for i, j in assignment(ious)) / max(len(pred), len(true))
    return (f1 + mean_iou) / 2


def point_reward(points: list[Point], boxes: list[Box], true_points: list[Point] = (), radius: float = POINT_RADIUS) -> float:
    targets = list(boxes) or [(x - radius, y - radius, x + radius, y + radius) for x, y in true_points]
    if not points and not targets:
        return 1.0
    if not points or not targets:
        return 0.0
    return 2 * match_points(points, targets) / (len(points) + len(targets))


def reward_from_truth(skill: str, output: dict[str, Any], truth: Target) -> float:
    """The reward of one rollout's `output` ({"answer"} / {"points"} / {"objects"}) against ground truth."""
    if skill == "query":
        if not isinstance(truth, QueryTarget):
            raise TuningError("query ground truth needs an answer")
        return float(exact_match(output.get("answer", ""), truth.answer))
    if not isinstance(truth, RegionTarget):
        raise TuningError(f"{skill} ground truth needs boxes or points")
    if skill == "detect":
        pred = [(o["x_min"], o["y_min"], o["x_max"], o["y_max"]) for o in output.get("objects", [])]
        return detect_reward(pred, list(truth.boxes))
    pts = [(p["x"], p["y"]) for p in output.get("points", [])]
    return point_reward(pts, list(truth.boxes), list(truth.points))


RewardFn = Callable[[dict[str, Any], dict[str, Any]], float]


def load_reward(spec: str) -> RewardFn:
    """`module:function` -> the function, called as fn(example, output) with the data row (a dict) and the
    rollout's output; it returns a float (clipped to [0, 1] by the caller)."""
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
