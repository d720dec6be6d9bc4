"""segment(image, object, spatial_refs): the object's outline as an SVG path (Moondream 3; spec §8.6).

The model writes a bounding box as coord (centre x), coord (centre y), size (w, h), then the path as text
tokens in a 960 x 960 box spanning that bbox, then eos. Decoding is greedy and unconstrained: a coord token
becomes the coordinate decoded from the hidden state that produced it, a size token the size.

`render` gives what the official client reads: `{"path", "bbox"}`, the path in image-normalized [0, 1] units
(the bbox-relative numbers mapped through the bbox). A path that stops parsing (a stray token, a truncated
command) keeps what parsed before it. `reference` gives Kestrel's output (parity): bbox-relative path tokens,
`parse_error`, the raw points and sizes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..config import ModelConfig, TokenizerConfig
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


@dataclass(frozen=True)
class Outline:
    """What a segment run decoded: the bbox's coordinates and sizes (clamped to [0, 1]), the path's text."""

    coords: list[float]
    sizes: list[tuple[float, float]]
    text_ids: list[int]
    path_tokens: list[str]

    @classmethod
    def of(cls, out: Output, tokenizer: Tokenizer) -> Outline:
        assert out.text is not None
        run, tok = out.text, tokenizer.cfg
        text_ids = [t for t in run.ids if t not in (tok.coord_id, tok.size_id)]
        tokens = [p for t in text_ids if t >= FIRST_TEXT_ID and (p := tokenizer.decode([t]).strip())]
        sizes = [(_unit(w), _unit(h)) for _, (w, h) in sorted(run.sizes.items())]
        return cls([_unit(v) for _, v in sorted(run.coords.items())], sizes, text_ids, tokens)

    @property
    def bbox(self) -> dict[str, float] | None:
        """Centre (the first two coordinates) ± the first size / 2, within the image."""
        if len(self.coords) < 2 or not self.sizes:
            return None
        (cx, cy), (w, h) = self.coords[:2], self.sizes[0]
        return {
            "x_min": max(cx - w / 2, 0.0),
            "y_min": max(cy - h / 2, 0.0),
            "x_max": min(cx + w / 2, 1.0),
            "y_max": min(cy + h / 2, 1.0),
        }


class Segment(Skill):
    name, arg = "segment", "object"
    takes_spatial_refs = True
    greedy = True
    tunable = False

    def supports(self, cfg: ModelConfig) -> bool:
        return bool(cfg.tokenizer.segment_prefix)

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
        o = Outline.of(out, tokenizer)
        bbox = o.bbox
        commands = parse_path(o.path_tokens)[0] if bbox is not None else []
        return {"path": absolute_path(commands, bbox) if bbox is not None else "", "bbox": bbox}

    def reference(self, out: Output, tokenizer: Tokenizer) -> dict[str, Any]:
        """Kestrel's `{"segments": [...]}`: the bbox-relative path, or "" and `parse_error` when it does not parse."""
        o = Outline.of(out, tokenizer)
        commands, error = parse_path(o.path_tokens)
        if o.bbox is None:
            error = "no bounding box (coord, coord, size) came first"
        path = "" if error else " ".join(_svg(commands))
        segment = {
            "object": out.subject,
            "text": tokenizer.decode(o.text_ids).strip(),
            "svg_path": path,
            "path_tokens": o.path_tokens,
            "token_ids": o.text_ids,
            "points": [{"x": x, "y": y} for x, y in zip(o.coords[::2], o.coords[1::2], strict=False)],
            "coarse_path": path,
            "bbox": o.bbox,
            "coarse_bbox": o.bbox,
            "sizes": [{"width": w, "height": h} for w, h in o.sizes],
        }
        return {"segments": [segment | ({"parse_error": error} if error else {})]}

    def events(self, result: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The streamed form (the official client's): the bbox, the path one command at a time, then the whole."""
        yield {"type": "bbox", "bbox": result["bbox"]}
        for piece in _commands_of(result["path"]):
            yield {"type": "path_delta", "chunk": piece, "completed": False}
        yield {"type": "final", "path": result["path"], "bbox": result["bbox"], "completed": True}


Command = tuple[str, list[float]]  # an SVG command and its numbers, in bbox-relative units (0..1 across the box)


def parse_path(tokens: list[str]) -> tuple[list[Command], str | None]:
    """Path tokens -> commands, and the parse error that stopped it (what parsed before it is kept). A command
    letter starts each command; its integers follow (a `-` token negates the next one), read in (x, y) pairs of
    960ths of the bbox, an odd trailing one dropped."""
    commands: list[Command] = []
    negate = False
    for t in tokens:
        if t in SVG_COMMANDS:
            commands.append((t, []))
        elif t == "-" and commands:
            negate = True
        elif t.isdigit() and commands:
            commands[-1][1].append((-int(t) if negate else int(t)) / PATH_BOX)
            negate = False
        else:
            return _paired(commands), f"Unexpected SVG token {t!r}"
    return _paired(commands), None if commands else "empty path"


def absolute_path(commands: list[Command], bbox: dict[str, float]) -> str:
    """Bbox-relative numbers -> image-normalized ones: x_min + u·width for absolute commands (upper case),
    u·width for relative ones (a delta), and likewise for y."""
    w, h = bbox["x_max"] - bbox["x_min"], bbox["y_max"] - bbox["y_min"]
    out = []
    for cmd, nums in commands:
        dx, dy = (bbox["x_min"], bbox["y_min"]) if cmd.isupper() else (0.0, 0.0)
        out.append((cmd, [dx + v * w if i % 2 == 0 else dy + v * h for i, v in enumerate(nums)]))
    return " ".join(_svg(out, digits=4))


def svg_path(tokens: list[str]) -> tuple[str, str | None]:
    """Path tokens -> (bbox-relative path, parse error)."""
    commands, error = parse_path(tokens)
    return " ".join(_svg(commands)), error


def _paired(commands: list[Command]) -> list[Command]:
    return [(cmd, nums[: len(nums) // 2 * 2]) for cmd, nums in commands]


def _svg(commands: list[Command], digits: int = 3) -> list[str]:
    return [" ".join([cmd, *(_number(v, digits) for v in nums)]) for cmd, nums in commands]


def _commands_of(path: str) -> list[str]:
    """A path split before each command letter (the streamed pieces)."""
    pieces: list[str] = []
    for part in path.split(" "):
        if part in SVG_COMMANDS or not pieces:
            pieces.append(part)
        else:
            pieces[-1] += " " + part
    return [p + " " if i < len(pieces) - 1 else p for i, p in enumerate(pieces)] if path else []


def _number(v: float, digits: int) -> str:
    s = f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def _unit(v: float) -> float:
    return min(1.0, max(0.0, v))
