"""What a skill teaches: ground-truth targets, sampled rollouts as the trainer replays them, and the moves
both become. A move is one decision of a decode, in order: the head that reads the current last input
and its label (a token id, a coordinate bin or a (w, h) pair of size bins), then the input fed next.
Supervised targets and rollouts become the same moves, so SFT, GRPO and the nano recipe pack them with one
function (`train/batch.py`), and each skill says once how its outputs are decoded."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig, RegionConfig
from ..data.tasks import Box
from ..errors import TuningError
from ..model import region
from .program import Feed, Head

Point = tuple[float, float]


@dataclass(frozen=True)
class Grounding:
    start: int  # character offsets into the reasoning text
    end: int
    points: tuple[Point, ...]


@dataclass(frozen=True)
class Target:
    """The right output of a request. Each skill reads its own fields (text: `answer`, with an optional
    reasoning trace; regions: `boxes` and/or `points`)."""

    answer: str | None = None
    reasoning: str | None = None
    grounding: tuple[Grounding, ...] = ()
    boxes: tuple[Box, ...] = ()
    points: tuple[Point, ...] = ()
    about: tuple[Box, ...] = ()  # regions a text answer is about (nano's grounding-attention signal)


@dataclass(frozen=True)
class Rollout:
    """One sampled answer, as the trainer replays it. Bins, not floats: the values fed back are exactly
    the ones sampled. `logprobs` (one per action, from the sampling policy) is None for rollouts built by
    a client (e.g. ground-truth injection); the trainer then uses the current policy as the old one."""

    answer_tokens: tuple[int, ...] = ()
    thinking_tokens: tuple[int, ...] = ()
    has_answer_separator: bool = False
    coords: tuple[int, ...] = ()  # coordinate bins: x, y per object; a reasoning trace's coordinates
    sizes: tuple[tuple[int, int], ...] = ()  # (w, h) log-size bins per box
    finish_reason: str = "stop"  # "stop": the model chose to stop (a stop action); else a limit cut it
    logprobs: tuple[float, ...] | None = None
    temperature: float = 1.0


@dataclass(frozen=True)
class Move:
    """One decision: `head` reads the current last input and is scored on `label`; then `feed` is the next
    input (None: nothing follows, e.g. the final eos). `mask` is what sampling masked; `decisions`, when
    set, the only ids the LM chose among (go on / stop). `action`: a choice of the policy (a reasoning
    trace's coordinates are decoded greedily: labelled for SFT, not scored by RL). `label` None: an input
    fed without a decision (the answer token after a trace cut by max_tokens)."""

    head: Head
    label: int | tuple[int, int] | None
    feed: Feed | None = None
    mask: tuple[int, ...] = ()
    decisions: tuple[int, ...] = ()
    action: bool = True
    about: tuple[Box, ...] = ()


def text_moves(ids: Sequence[int], mask: tuple[int, ...], stop: int | None, about: tuple[Box, ...] = ()) -> list[Move]:
    """Tokens sampled one after another and fed back: the first unmasked (read from the prompt's end),
    later ones with `mask`; then `stop`, chosen and not fed (None: a limit ended the text)."""
    moves = [Move(Head.LM, t, Feed(token=t), mask if j else ()) for j, t in enumerate(ids)]
    if stop is not None:
        moves.append(Move(Head.LM, stop, None, mask if ids else ()))
    if moves and about:
        moves[0] = dataclasses.replace(moves[0], about=about)
    return moves


def region_moves(
    coords: Sequence[int], sizes: Sequence[tuple[int, int]] | None, stopped: bool, cfg: ModelConfig, about: Sequence[Box] = ()
) -> list[Move]:
    """Objects as decisions: go on (the coord token), x and y from the same and the next hidden state,
    then (boxes) the size; `stopped`: the model chose to stop after the last one (eos)."""
    tok, rc = cfg.tokenizer, cfg.region
    decide, moves = (tok.coord_id, tok.eos_id), []
    for k in range(len(coords) // 2):
        near = (about[k],) if about else ()
        moves.append(Move(Head.LM, tok.coord_id, None, decisions=decide, about=near))
        moves += [Move(Head.COORD, b, Feed(coord=coord_value(b, rc)), about=near) for b in coords[2 * k : 2 * k + 2]]
        if sizes is not None:
            moves.append(Move(Head.SIZE, sizes[k], Feed(size=size_value(sizes[k], rc)), about=near))
    if stopped:
        moves.append(Move(Head.LM, tok.eos_id, None, decisions=decide))
    return moves


def coord_value(b: int, rc: RegionConfig) -> float:
    """The coordinate inference feeds back for a bin."""
    return float(region.coord_from_bin(torch.tensor(b), rc))


def size_value(bins: tuple[int, int], rc: RegionConfig) -> tuple[float, float]:
    w, h = region.size_from_bin(torch.tensor(bins), rc).tolist()
    return (w, h)


# --- parsing the tuning API's JSON ----------------------------------------------------------------------


def number(v: Any, where: str, lo: float | None = None, hi: float | None = None) -> float:
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
    x1, y1, x2, y2 = (number(x, where, -0.5, 1.5) for x in v)
    if x1 > x2 or y1 > y2:
        raise TuningError(f"{where} needs x_min <= x_max and y_min <= y_max, got {v!r}")
    return (x1, y1, x2, y2)


def parse_point(v: Any, where: str) -> Point:
    if isinstance(v, dict):
        v = [v.get("x"), v.get("y")]
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise TuningError(f"{where} must be {{x, y}} or [x, y], got {v!r}")
    return (number(v[0], where, 0, 1), number(v[1], where, 0, 1))


def obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TuningError(f"{where} must be an object, got {type(value).__name__}")
    return value


def items(d: dict[str, Any], key: str, where: str) -> list[Any]:
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise TuningError(f"{where}.{key} must be a list")
    return v
