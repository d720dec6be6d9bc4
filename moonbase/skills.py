"""Skills: prompt construction, settings, and output shapes. Shared by every inference and training path.

Reference quirks reproduced on purpose (spec §9, each a `TokenizerConfig` field so another model can
turn it off):
* non-reasoning query prompts end with the answer token twice (`... question 3 3`, D1), because that is
  what the code shipped with the 2025-06-21 weights does;
* detect/point prompts encode `" " + object` (leading space), query encodes the question as is;
* spatial refs are embedded only in the first prefill of a reasoning query (the reference re-sends them
  with the answer prefill and crashes, D8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import Defaults, TokenizerConfig
from .errors import SettingsError
from .tokenizer import Tokenizer

CAPTION_LENGTHS = ("short", "normal", "long")
SETTING_KEYS = ("temperature", "top_p", "max_tokens", "max_objects", "seed", "variant")


@dataclass(frozen=True)
class Prompt:
    """Token ids plus the values that replace coord/size placeholder ids, in order of appearance."""

    ids: tuple[int, ...]
    coords: tuple[float, ...] = ()
    sizes: tuple[tuple[float, float], ...] = ()

    def __add__(self, other: Prompt) -> Prompt:
        return Prompt(self.ids + other.ids, self.coords + other.coords, self.sizes + other.sizes)


@dataclass(frozen=True)
class Settings:
    temperature: float
    top_p: float
    max_tokens: int
    max_objects: int
    seed: int | None = None
    variant: str | None = None


def _number(settings: dict[str, Any], key: str, default: float) -> float:
    v = settings.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SettingsError(f"{key} must be a finite number, got {v!r}")
    return float(v)


def _count(settings: dict[str, Any], key: str, default: int) -> int:
    v = settings.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise SettingsError(f"{key} must be a positive integer, got {v!r}")
    return v


def resolve_settings(settings: dict[str, Any] | None, defaults: Defaults) -> Settings:
    """Validate user settings (every key optional) and fill in the model's defaults."""
    s = dict(settings or {})
    unknown = set(s) - set(SETTING_KEYS)
    if unknown:
        raise SettingsError(f"unknown settings {sorted(unknown)}; allowed: {', '.join(SETTING_KEYS)}")
    temperature = _number(s, "temperature", defaults.temperature)
    if temperature < 0:
        raise SettingsError(f"temperature must be >= 0, got {temperature}")
    top_p = _number(s, "top_p", defaults.top_p)
    if not 0 < top_p <= 1:
        raise SettingsError(f"top_p must be in (0, 1], got {top_p}")
    seed = s.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SettingsError(f"seed must be an integer, got {seed!r}")
    variant = s.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise SettingsError(f"variant must be a string, got {variant!r}")
    return Settings(
        temperature,
        top_p,
        _count(s, "max_tokens", defaults.max_tokens),
        _count(s, "max_objects", defaults.max_objects),
        seed,
        variant or None,
    )


def spatial_prompt(refs: Any, tok: TokenizerConfig) -> Prompt:
    """[x, y] points -> two coord tokens; [x_min, y_min, x_max, y_max] boxes -> centre coords + one size token."""
    if refs is None:
        return Prompt(())
    if not isinstance(refs, (list, tuple)):
        raise SettingsError("spatial_refs must be a list of [x, y] points or [x_min, y_min, x_max, y_max] boxes")
    ids: list[int] = []
    coords: list[float] = []
    sizes: list[tuple[float, float]] = []
    for ref in refs:
        if not isinstance(ref, (list, tuple)) or len(ref) not in (2, 4):
            raise SettingsError(f"each spatial ref must have 2 or 4 numbers, got {ref!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1 for v in ref):
            raise SettingsError(f"spatial ref values must be finite numbers in [0, 1], got {ref!r}")
        if len(ref) == 2:
            ids += [tok.coord_id, tok.coord_id]
            coords += [float(ref[0]), float(ref[1])]
        else:
            x1, y1, x2, y2 = (float(v) for v in ref)
            if x1 > x2 or y1 > y2:
                raise SettingsError(f"box spatial ref needs x_min <= x_max and y_min <= y_max, got {ref!r}")
            ids += [tok.coord_id, tok.coord_id, tok.size_id]
            coords += [(x1 + x2) / 2, (y1 + y2) / 2]
            sizes.append((x2 - x1, y2 - y1))
    return Prompt(tuple(ids), tuple(coords), tuple(sizes))


def caption_prompt(tok: TokenizerConfig, length: str) -> Prompt:
    if length not in tok.caption:
        raise SettingsError(f"length must be one of {', '.join(tok.caption)}, got {length!r}")
    return Prompt(tok.caption[length])


def query_prompt(tokenizer: Tokenizer, question: Any, spatial_refs: Any = None, reasoning: bool = False) -> Prompt:
    """The first prefill of a query: `prefix [spatial] question suffix` + (`thinking` | `suffix` again)."""
    tok = tokenizer.cfg
    if not isinstance(question, str) or not question:
        raise SettingsError("question must be a non-empty string")
    body = (
        Prompt(tok.query_prefix)
        + spatial_prompt(spatial_refs, tok)
        + Prompt(tuple(tokenizer.encode(question)) + tok.query_suffix)
    )
    if reasoning:
        return body + Prompt((tok.thinking_id,))
    return body + Prompt(tok.query_suffix) if tok.repeat_query_suffix else body


def object_prompt(tokenizer: Tokenizer, task: str, obj: Any, spatial_refs: Any = None) -> Prompt:
    tok = tokenizer.cfg
    if not isinstance(obj, str) or not obj.strip():
        raise SettingsError("object must be a non-empty string")
    prefix, suffix = (tok.detect_prefix, tok.detect_suffix) if task == "detect" else (tok.point_prefix, tok.point_suffix)
    text = " " + obj if tok.object_leading_space else obj
    return Prompt(prefix) + spatial_prompt(spatial_refs, tok) + Prompt(tuple(tokenizer.encode(text)) + suffix)


def reasoning_output(chunks: list[tuple[list[int], list[float]]], tokenizer: Tokenizer) -> dict[str, Any]:
    """Reasoning chunks (ids, coordinates) -> {"text", "grounding"}; chunks are decoded separately and
    grounding spans are character offsets of chunks that carry at least one (x, y) pair."""
    text, grounding = "", []
    for ids, coords in chunks:
        piece = tokenizer.decode(ids)
        if len(coords) >= 2:
            points = [[coords[i], coords[i + 1]] for i in range(0, len(coords) - 1, 2)]
            grounding.append({"start_idx": len(text), "end_idx": len(text) + len(piece), "points": points})
        text += piece
    return {"text": text, "grounding": grounding}


def region_output(x: float, y: float, w: float, h: float) -> dict[str, float]:
    """Centre and size -> box corners; not clamped to [0, 1], like the reference (D16)."""
    return {"x_min": x - w / 2, "y_min": y - h / 2, "x_max": x + w / 2, "y_max": y + h / 2}
