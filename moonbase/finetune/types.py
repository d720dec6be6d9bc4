"""Typed fine-tuning inputs, parsed and validated from the tuning API's JSON (and from data files): skill
requests, SFT targets, ground truth, rollouts and train-step groups. Every problem is a `TuningError` that
says which field is wrong; nothing downstream sees unchecked input."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig
from ..errors import TuningError

SKILLS = ("query", "point", "detect")
Box = tuple[float, float, float, float]  # x_min, y_min, x_max, y_max, normalized
Point = tuple[float, float]


@dataclass(frozen=True)
class SkillRequest:
    skill: str
    image: Any = None  # anything `load_image` takes (decoded array, path, PIL image); None = text only
    question: str | None = None
    object: str | None = None
    spatial_refs: tuple[tuple[float, ...], ...] | None = None
    reasoning: bool = False
    settings: tuple[tuple[str, Any], ...] = ()  # sorted items: hashable and frozen

    @property
    def settings_dict(self) -> dict[str, Any]:
        return dict(self.settings)


@dataclass(frozen=True)
class Grounding:
    start: int  # character offsets into the reasoning text
    end: int
    points: tuple[Point, ...]


@dataclass(frozen=True)
class QueryTarget:
    answer: str
    reasoning: str | None = None
    grounding: tuple[Grounding, ...] = ()


@dataclass(frozen=True)
class RegionTarget:
    """Detect: boxes. Point: points, and optionally the boxes they should fall in (for rewards)."""

    boxes: tuple[Box, ...] = ()
    points: tuple[Point, ...] = ()


Target = QueryTarget | RegionTarget


@dataclass(frozen=True)
class Rollout:
    """One sampled answer, as the trainer replays it. Bins, not floats: the values fed back are exactly
    the ones sampled. `logprobs` (one per action, from the sampling policy) is None for rollouts built by
    a client (e.g. ground-truth injection); the trainer then uses the current policy as the old one."""

    skill: str
    answer_tokens: tuple[int, ...] = ()
    thinking_tokens: tuple[int, ...] = ()
    has_answer_separator: bool = False
    coords: tuple[int, ...] = ()  # coordinate bins: x, y per object (detect/point); trace coordinates (query)
    sizes: tuple[tuple[int, int], ...] = ()  # (w, h) log-size bins per object (detect)
    finish_reason: str = "stop"  # "stop": the model chose to stop (a stop action); else a limit cut it
    logprobs: tuple[float, ...] | None = None
    temperature: float = 1.0


@dataclass(frozen=True)
class RLGroup:
    request: SkillRequest
    rollouts: tuple[Rollout, ...]
    rewards: tuple[float, ...]


@dataclass(frozen=True)
class SFTGroup:
    request: SkillRequest
    target: Target


Group = RLGroup | SFTGroup


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TuningError(f"{where} must be an object, got {type(value).__name__}")
    return value


def _number(v: Any, where: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TuningError(f"{where} must be a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise TuningError(f"{where} must be in [{lo}, {hi}], got {v!r}")
    return float(v)


def parse_box(v: Any, where: str) -> Box:
    if isinstance(v, dict):
        v = [v.get(k) for k in ("x_min", "y_min", "x_max", "y_max")]
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise TuningError(f"{where} must be {{x_min, y_min, x_max, y_max}} or a list of 4 numbers, got {v!r}")
    x1, y1, x2, y2 = (_number(x, where, -0.5, 1.5) for x in v)
    if x1 > x2 or y1 > y2:
        raise TuningError(f"{where} needs x_min <= x_max and y_min <= y_max, got {v!r}")
    return (x1, y1, x2, y2)


def parse_point(v: Any, where: str) -> Point:
    if isinstance(v, dict):
        v = [v.get("x"), v.get("y")]
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise TuningError(f"{where} must be {{x, y}} or [x, y], got {v!r}")
    return (_number(v[0], where, 0, 1), _number(v[1], where, 0, 1))


def _list(d: dict[str, Any], key: str, where: str) -> list[Any]:
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise TuningError(f"{where}.{key} must be a list")
    return v


def parse_request(d: Any, image_of: Callable[[Any], Any], where: str = "request") -> SkillRequest:
    d = _obj(d, where)
    skill = d.get("skill")
    if skill not in SKILLS:
        raise TuningError(f"{where}.skill must be one of {', '.join(SKILLS)}, got {skill!r}")
    question, obj = d.get("question"), d.get("object")
    if skill == "query" and (not isinstance(question, str) or not question):
        raise TuningError(f"{where}.question must be a non-empty string for query")
    if skill != "query" and (not isinstance(obj, str) or not obj.strip()):
        raise TuningError(f"{where}.object must be a non-empty string for {skill}")
    refs = d.get("spatial_refs")
    if refs is not None:
        if not isinstance(refs, list) or not all(isinstance(r, list) and len(r) in (2, 4) for r in refs):
            raise TuningError(f"{where}.spatial_refs must be a list of [x, y] or [x_min, y_min, x_max, y_max]")
        refs = tuple(tuple(_number(x, f"{where}.spatial_refs", 0, 1) for x in r) for r in refs)
    reasoning = d.get("reasoning", False)
    if not isinstance(reasoning, bool) or (reasoning and skill != "query"):
        raise TuningError(f"{where}.reasoning must be a boolean, and only a query reasons")
    settings = d.get("settings") or {}
    if not isinstance(settings, dict):
        raise TuningError(f"{where}.settings must be an object")
    image = d.get("image_url", d.get("image"))
    if "image_url" in d and not isinstance(image, (str, type(None))):
        raise TuningError(f"{where}.image_url must be a data URL or base64 string")
    if image is None and skill != "query":
        raise TuningError(f"{where}.image_url is required for {skill}")
    return SkillRequest(
        skill,
        None if image is None else image_of(image),
        question if skill == "query" else None,
        obj.strip() if skill != "query" else None,
        refs,
        reasoning,
        tuple(sorted(settings.items())),
    )


def parse_target(skill: str, d: Any, where: str = "target") -> Target:
    d = _obj(d, where)
    if skill == "query":
        answer = d.get("answer")
        if not isinstance(answer, str):
            raise TuningError(f"{where}.answer must be a string")
        r = d.get("reasoning")
        if r is None:
            return QueryTarget(answer)
        if isinstance(r, str):
            r = {"text": r}
        r = _obj(r, f"{where}.reasoning")
        text = r.get("text")
        if not isinstance(text, str):
            raise TuningError(f"{where}.reasoning.text must be a string")
        spans = []
        for k, g in enumerate(_list(r, "grounding", f"{where}.reasoning")):
            g = _obj(g, f"{where}.reasoning.grounding[{k}]")
            s, e = g.get("start_idx"), g.get("end_idx")
            if not (isinstance(s, int) and isinstance(e, int) and 0 <= s <= e <= len(text)):
                raise TuningError(f"{where}.reasoning.grounding[{k}] needs 0 <= start_idx <= end_idx <= len(text)")
            pts = tuple(parse_point(p, f"{where}.reasoning.grounding[{k}].points") for p in _list(g, "points", where))
            spans.append(Grounding(s, e, pts))
        spans.sort(key=lambda g: g.start)
        if any(a.end > b.start for a, b in zip(spans, spans[1:], strict=False)):
            raise TuningError(f"{where}.reasoning.grounding spans overlap")
        return QueryTarget(answer, text, tuple(spans))
    boxes = tuple(parse_box(b, f"{where}.boxes[{k}]") for k, b in enumerate(_list(d, "boxes", where)))
    if skill == "detect":
        if "boxes" not in d:
            raise TuningError(f"{where}.boxes is required for detect (an empty list means no objects)")
        return RegionTarget(boxes=boxes)
    points = tuple(parse_point(p, f"{where}.points[{k}]") for k, p in enumerate(_list(d, "points", where)))
    if "points" not in d and "boxes" not in d:
        raise TuningError(f"{where} needs points (and optionally boxes) for point")
    return RegionTarget(boxes=boxes, points=points)


def _bin(v: Any, n: int, where: str, to_bin: Callable[[float], int]) -> int:
    """A bin index (int), or a value in [0, 1] (float) converted the way training labels are."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TuningError(f"{where} must be a bin index or a value in [0, 1], got {v!r}")
    if isinstance(v, int):
        if not 0 <= v < n:
            raise TuningError(f"{where}: bin {v} out of range 0..{n - 1}")
        return v
    return to_bin(_number(v, where, 0, 1))


def parse_rollout(skill: str, d: Any, cfg: ModelConfig, where: str = "rollout") -> Rollout:
    from ..model import region

    d = _obj(d, where)
    if d.get("skill", skill) != skill:
        raise TuningError(f"{where}.skill {d.get('skill')!r} does not match the request's {skill!r}")
    vocab = cfg.text.vocab_size

    def ids(key: str) -> tuple[int, ...]:
        out = _list(d, key, where)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in out):
            raise TuningError(f"{where}.{key} must hold token ids in 0..{vocab - 1}")
        return tuple(out)

    rc = cfg.region
    coords = tuple(
        _bin(v, rc.coord_bins, f"{where}.coords[{k}]", lambda x: region.coord_to_bin(x, rc))
        for k, v in enumerate(_list(d, "coords", where))
    )
    sizes = []
    for k, s in enumerate(_list(d, "sizes", where)):
        if isinstance(s, dict):
            s = [s.get("w", s.get("width")), s.get("h", s.get("height"))]
        if not isinstance(s, list) or len(s) != 2:
            raise TuningError(f"{where}.sizes[{k}] must be [w, h]")
        sizes.append(tuple(_bin(v, rc.size_bins, f"{where}.sizes[{k}]", lambda x: region.size_to_bin(x, rc)) for v in s))
    logprobs = d.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, list):
            raise TuningError(f"{where}.logprobs must be a list")
        logprobs = tuple(_number(x, f"{where}.logprobs", None, 0) for x in logprobs)
    finish = d.get("finish_reason") or "stop"
    if not isinstance(finish, str):
        raise TuningError(f"{where}.finish_reason must be a string")
    separator = d.get("has_answer_separator", False)
    if not isinstance(separator, bool):
        raise TuningError(f"{where}.has_answer_separator must be a boolean")
    temperature = _number(d.get("temperature", 1.0), f"{where}.temperature", 0, None)
    out = Rollout(
        skill, ids("answer_tokens"), ids("thinking_tokens"), separator, coords, tuple(sizes), finish, logprobs, temperature
    )
    if skill != "query":
        per = 2
        if len(coords) % per or (skill == "detect" and len(sizes) != len(coords) // 2) or (skill == "point" and sizes):
            raise TuningError(
                f"{where}: {skill} needs 2 coords per object{' and one [w, h] size each' if skill == 'detect' else ''}"
            )
    elif sizes:
        raise TuningError(f"{where}: a query rollout has no sizes")
    return out


def parse_group(d: Any, image_of: Callable[[Any], Any], cfg: ModelConfig, where: str) -> Group:
    d = _obj(d, where)
    mode = d.get("mode")
    request = parse_request(d.get("request"), image_of, f"{where}.request")
    if mode == "sft":
        return SFTGroup(request, parse_target(request.skill, d.get("target"), f"{where}.target"))
    if mode != "rl":
        raise TuningError(f"{where}.mode must be 'rl' or 'sft', got {mode!r}")
    rollouts = tuple(
        parse_rollout(request.skill, r, cfg, f"{where}.rollouts[{k}]") for k, r in enumerate(_list(d, "rollouts", where))
    )
    rewards = tuple(_number(r, f"{where}.rewards[{k}]") for k, r in enumerate(_list(d, "rewards", where)))
    if not rollouts:
        raise TuningError(f"{where}.rollouts must not be empty")
    if len(rewards) != len(rollouts):
        raise TuningError(f"{where}: {len(rewards)} rewards for {len(rollouts)} rollouts")
    return RLGroup(request, rollouts, rewards)
