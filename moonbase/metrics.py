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

import numpy as np

Box = tuple[float, float, float, float]
Point = tuple[float, float]
POINT_RADIUS = 0.05


def iou(a: Box, b: Box) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))  # overlap w * h
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
    used_p, used_t = set(), set()
    for score, i, j in sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(true)), reverse=True):
        if score < threshold:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i), used_t.add(j)
    return len(used_p)


def match_points(points: list[tuple[float, float]], true: list[Box]) -> int:
    """True positives of a one-to-one matching of points to the boxes that contain them (maximum matching)."""
    from scipy.sparse import csr_array  # imported when used: scipy costs every import of the skills otherwise
    from scipy.sparse.csgraph import maximum_bipartite_matching

    if not points or not true:
        return 0
    inside = [[b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in true] for x, y in points]
    matched = maximum_bipartite_matching(csr_array(np.array(inside, dtype=np.int8)), perm_type="column")
    return int((matched >= 0).sum())


def normalize_text(s: str) -> str:
    return " ".join(s.lower().translate(str.maketrans("", "", string.punctuation)).split())


def exact_match(pred: str, true: str) -> bool:
    return normalize_text(pred) == normalize_text(true)


def token_f1(pred: str, true: str) -> float:
    p, t = normalize_text(pred).split(), normalize_text(true).split()
    common = sum((Counter(p) & Counter(t)).values())
    return 2 * common / (len(p) + len(t)) if p or t else 1.0  # 2PR / (P + R) with P = common / |p|, R = common / |t|


_NUMBERS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine ten".split())} | {"no": 0}


def parse_count(answer: str) -> int | None:
    if m := re.search(r"\d+", answer):
        return int(m.group())
    return next((_NUMBERS[w] for w in normalize_text(answer).split() if w in _NUMBERS), None)


def assignment(weights: list[list[float]]) -> list[tuple[int, int]]:
    """Maximum-weight one-to-one matching of rows to columns."""
    from scipy.optimize import linear_sum_assignment  # 0.4 s to import: only rewards need it

    if not weights or not weights[0]:
        return []
    rows, cols = linear_sum_assignment(np.asarray(weights), maximize=True)
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True)]


def detect_reward(pred: list[Box], true: list[Box]) -> float:
    if not pred or not true:
        return float(not pred and not true)  # both empty: right
    f1 = 2 * match_boxes(pred, true, 0.5) / (len(pred) + len(true))
    ious = [[iou(p, t) for t in true] for p in pred]
    mean_iou = sum(ious[i][j] for i, j in assignment(ious)) / max(len(pred), len(true))
    return (f1 + mean_iou) / 2


def point_reward(points: list[Point], boxes: list[Box], true_points: list[Point] = (), radius: float = POINT_RADIUS) -> float:
    targets = list(boxes) or [(x - radius, y - radius, x + radius, y + radius) for x, y in true_points]
    if not points or not targets:
        return float(not points and not targets)
    return 2 * match_points(points, targets) / (len(points) + len(targets))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of one image (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def path_mask(path: str, width: int, height: int) -> np.ndarray:
    """An SVG path in image-normalized units (segment's `path`) filled and rasterized: a (height, width) bool mask."""
    import html
    import io

    import cairosvg  # needs the system cairo library (Debian: libcairo2)
    from PIL import Image

    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 1 1" '
        f'preserveAspectRatio="none"><path d="{html.escape(path)}" fill="#fff"/></svg>'
    )
    return np.asarray(Image.open(io.BytesIO(cairosvg.svg2png(bytestring=svg.encode()))).convert("RGBA"))[..., 3] >= 128


def box_mask(box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """The pixels whose centres fall inside a normalized box."""
    xs, ys = (np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height
    inside_x, inside_y = (box[0] <= xs) & (xs <= box[2]), (box[1] <= ys) & (ys <= box[3])
    return inside_y[:, None] & inside_x[None, :]
