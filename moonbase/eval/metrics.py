"""Metrics for the synthetic suite: box and point matching, exact match, token F1."""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

Box = tuple[float, float, float, float]


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
