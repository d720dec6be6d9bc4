"""Metrics: box and point matching, exact match, token F1 (the synthetic suite), and the ground-truth
rewards of fine-tuning:

* detect: (F1 at IoU >= 0.5, one-to-one matching + mean IoU of the optimal one-to-one assignment,
  divided by max(#predicted, #true)) / 2. Extra boxes and missed boxes both cost; both empty is 1.
* point: F1 of a maximum one-to-one matching of points to the true boxes they fall in; with true points
  only, a point hits a true point within `radius` (a square of side 2 * radius around it).
* query: exact match after normalization (lowercase, no punctuation, single spaces)."""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

Box = tuple[float, float, float, float]
Point = tuple[float, float]
POINT_RADIUS = 0.05


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, tp: int, n_pred: int, n_true: int) -> None:
        self.tp += tp
        self.fp += n_pred - tp
        self.fn += n_true - tp

    @property
    def f1(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else 2 * self.tp / denom


def match_boxes(pred: list[Box], true: list[Box], threshold: float = 0.5) -> int:
    """True positives of a one-to-one matching: pairs taken greedily by descending IoU, each >= threshold."""
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(true)), reverse=True)
    used_p, used_t, tp = set(), set(), 0
    for score, i, j in pairs:
        if score < threshold:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i), used_t.add(j)
            tp += 1
    return tp


def match_points(points: list[tuple[float, float]], true: list[Box]) -> int:
    """True positives of a one-to-one matching of points to the boxes that contain them (maximum matching)."""
    inside = [[j for j, b in enumerate(true) if b[0] <= x <= b[2] and b[1] <= y <= b[3]] for x, y in points]
    owner: dict[int, int] = {}

    def augment(i: int, seen: set[int]) -> bool:
        for j in inside[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(points)))


def normalize_text(s: str) -> str:
    s = s.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(s.split())


def exact_match(pred: str, true: str) -> bool:
    return normalize_text(pred) == normalize_text(true)


def token_f1(pred: str, true: str) -> float:
    p, t = normalize_text(pred).split(), normalize_text(true).split()
    if not p and not t:
        return 1.0
    common = sum((Counter(p) & Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def parse_count(answer: str) -> int | None:
    m = re.search(r"\d+", answer)
    if m:
        return int(m.group())
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    for w in normalize_text(answer).split():
        if w in words:
            return words.index(w)
        if w == "no":
            return 0
    return None


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
