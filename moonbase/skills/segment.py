"""segment(image, object, spatial_refs): the object's outline as an SVG path (Moondream 3; spec §8.6).

The model writes a bounding box as coord (centre x), coord (centre y), size (w, h), then the path as text
tokens in a 960 x 960 box spanning that bbox, then eos. Decoding is greedy and unconstrained: a coord token
becomes the coordinate decoded from the hidden state that produced it, a size token the size. The result
follows Kestrel's segment output; the path's coordinates are bbox-relative (0..1 across the box)."""

from __future__ import annotations

from functools import partial
from typing import Any

from ..config import TokenizerConfig
from ..errors import SettingsError, SkillNotSupportedError
from ..tokenizer import Tokenizer
from .base import Prompt, Settings, Skill, SkillRequest, spatial_prompt
from .program import Output, TextProgram

PATH_BOX = 960  # path coordinates are integers across the bbox
SVG_COMMANDS = set("MmLlHhVvCcSsQqTtAaZz")
FIRST_TEXT_ID = 21  # ids up to 20 are special tokens, never path text


class SegmentProgram(TextProgram):
    def __init__(self, tok: TokenizerConfig, max_tokens: int, subject: str):
        super().__init__(tok, (), (tok.eos_id,), max_tokens, decode_coords=True, decode_sizes=True)
        self.subject = subject

    def output(self) -> Output:
        out = super().output()
        out.subject = self.subject
        return out


class Segment(Skill):
    name, arg = "segment", "object"
    takes_spatial_refs = True
    greedy = True
    tunable = False

    def prompt(self, req: SkillRequest, tokenizer: Tokenizer) -> Prompt:
        tok = tokenizer.cfg
        if not tok.segment_prefix:
            raise SkillNotSupportedError("this model has no segmentation head (Moondream 2 does not segment)")
        if not isinstance(req.object, str) or not req.object.strip():
            raise SettingsError("object must be a non-empty string")
        text = tuple(tokenizer.encode(req.object.strip())) + tok.segment_suffix
        return Prompt(tok.segment_prefix) + spatial_prompt(req.spatial_refs, tok) + Prompt(text)

    def program(self, req: SkillRequest, s: Settings, tok: TokenizerConfig):
        return partial(SegmentProgram, tok, s.max_tokens, (req.object or "").strip())

    def render(self, out: Output, tokenizer: Tokenizer, clip: bool = True) -> dict[str, Any]:
        assert out.text is not None
        run, tok = out.text, tokenizer.cfg
        text_ids = [t for t in run.ids if t not in (tok.coord_id, tok.size_id)]
        coords = [_unit(v) for _, v in sorted(run.coords.items())]
        sizes = [(_unit(w), _unit(h)) for _, (w, h) in sorted(run.sizes.items())]
        path_tokens = [p for t in text_ids if t >= FIRST_TEXT_ID and (p := tokenizer.decode([t]).strip())]
        bbox = None
        if len(coords) >= 2 and sizes:
            (cx, cy), (w, h) = coords[:2], sizes[0]
            bbox = {"x_min": max(cx - w / 2, 0.0), "x_max": min(cx + w / 2, 1.0)}
            bbox |= {"y_min": max(cy - h / 2, 0.0), "y_max": min(cy + h / 2, 1.0)}
        path, error = svg_path(path_tokens) if bbox is not None else ("", "no bounding box (coord, coord, size) came first")
        segment = {
            "object": out.subject,
            "text": tokenizer.decode(text_ids).strip(),
            "svg_path": path,
            "path_tokens": path_tokens,
            "token_ids": text_ids,
            "points": [{"x": x, "y": y} for x, y in zip(coords[::2], coords[1::2], strict=False)],
            "coarse_path": path,
            "bbox": bbox,
            "coarse_bbox": bbox,
            "sizes": [{"width": w, "height": h} for w, h in sizes],
        }
        return {"segments": [segment | ({"parse_error": error} if error else {})]}


def svg_path(tokens: list[str]) -> tuple[str, str | None]:
    """Path tokens -> (path in bbox-relative units, parse error). A command letter starts each segment; its
    integers follow (a `-` token negates the next one) and are read as (x, y) pairs in 960ths of the bbox,
    an odd trailing one dropped; numbers print with at most 3 decimals."""
    if not tokens or tokens[0] not in SVG_COMMANDS:
        return "", f"Unexpected SVG token {tokens[0]!r}" if tokens else "empty path"
    parts: list[str] = []
    numbers: list[int] = []
    negate = False

    def flush() -> None:
        parts.extend(_number(v / PATH_BOX) for v in numbers[: len(numbers) // 2 * 2])
        numbers.clear()

    for t in tokens:
        if t in SVG_COMMANDS:
            flush()
            parts.append(t)
        elif t == "-":
            negate = True
        elif t.isdigit():
            numbers.append(-int(t) if negate else int(t))
            negate = False
        else:
            return "", f"Unexpected SVG token {t!r}"
    flush()
    return " ".join(parts), None


def _number(v: float) -> str:
    s = f"{v:.3f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def _unit(v: float) -> float:
    return min(1.0, max(0.0, v))
