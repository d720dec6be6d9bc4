"""segment(image, object, spatial_refs): the object's outline as an SVG path (Moondream 3; spec §8.6).

The model writes a bounding box as coord (centre x), coord (centre y), size (w, h), then the path as text
tokens in a 960 x 960 box spanning that bbox, then eos. Decoding is greedy; the bbox steps are held to it (an
object or none, coord, size), the path is free. A coord token becomes the coordinate decoded from the hidden
state that produced it, a size token the size.

`render` gives what the official client reads: `{"path", "bbox"}`, the path in image-normalized [0, 1] units
(the bbox-relative numbers mapped through the bbox). A path that stops parsing (a stray token, a truncated
command) keeps what parsed before it. `reference` gives Kestrel's output (parity): bbox-relative path tokens,
`parse_error`, the raw points and sizes."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ..config import ModelConfig, TokenizerConfig
from ..errors import SettingsError, TuningError
from ..metrics import box_mask, mask_iou, path_mask
from ..model import region
from ..tokenizer import Tokenizer
from .base import Prompt, Settings, Skill, SkillRequest, spatial_prompt
from .program import Feed, Head, Output, StreamItem, TextProgram
from .training import Move, Rollout, Target, coord_value, parse_box, size_value, text_moves

PATH_BOX = 960  # path coordinates are integers across the bbox
SVG_COMMANDS = set("MmLlHhVvCcSsQqTtAaZz")
FIRST_TEXT_ID = 21  # ids up to 20 are special tokens, never path text
REWARD_GRID = 256  # pixels per side of the canvas rewards compare masks on
SNAP = 19  # a target's path number may move this far (2% of the bbox) to one the tokenizer writes as one token


class SegmentProgram(TextProgram):
    """The bbox first, decided like detect's first object (an object, or eos for none; then the coord token,
    then the size token), then the path's tokens, unconstrained."""

    def __init__(self, tok: TokenizerConfig, max_tokens: int, subject: str):
        super().__init__(tok, (), (tok.eos_id,), max_tokens, decode_coords=True, decode_sizes=True)
        self.subject = subject
        self.opening = bbox_opening(tok)

    @property
    def allowed(self) -> tuple[int, ...]:  # type: ignore[override]
        n = len(self.run.ids)
        return self.opening[n] if n < len(self.opening) else ()

    def on_region(self, value: float | tuple[float, float]) -> None:
        super().on_region(value)
        self.new_tokens = [value]  # streamed too: the bbox event goes out as soon as its size is decoded

    def output(self) -> Output:
        out = super().output()
        out.subject = self.subject
        return out


def bbox_opening(tok: TokenizerConfig) -> tuple[tuple[int, ...], ...]:
    """The ids each of a segment's first three steps may choose among: an object (coord) or none (eos), coord, size."""
    return (tok.coord_id, tok.eos_id), (tok.coord_id,), (tok.size_id,)


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
        tokens = [p for t in text_ids if (p := path_text(t, tokenizer))]
        sizes = [(_unit(w), _unit(h)) for _, (w, h) in sorted(run.sizes.items())]
        return cls([_unit(v) for _, v in sorted(run.coords.items())], sizes, text_ids, tokens)

    @property
    def bbox(self) -> dict[str, float] | None:
        return _bbox(self.coords, self.sizes)


def path_text(token: int, tokenizer: Tokenizer) -> str:
    """A token's path text (a command letter, an integer, `-`); "" for special tokens and whitespace."""
    tok = tokenizer.cfg
    return tokenizer.decode([token]).strip() if token >= FIRST_TEXT_ID and token not in (tok.coord_id, tok.size_id) else ""


def _bbox(coords: list[float], sizes: list[tuple[float, float]]) -> dict[str, float] | None:
    """Centre (the first two coordinates) ± the first size / 2, within the image."""
    if len(coords) < 2 or not sizes:
        return None
    (cx, cy), (w, h) = coords[:2], sizes[0]
    return {
        "x_min": max(cx - w / 2, 0.0),
        "y_min": max(cy - h / 2, 0.0),
        "x_max": min(cx + w / 2, 1.0),
        "y_max": min(cy + h / 2, 1.0),
    }


class SegmentStream:
    """The official client's stream, as the run decodes: the bbox once its size is decoded, each path command
    (image-normalized) once the token after it shows it is complete, then the final result. The chunks join
    into the final path: commands after the first start with a space."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.coords: list[float] = []
        self.sizes: list[tuple[float, float]] = []
        self.tokens: list[str] = []
        self.bbox: dict[str, float] | None = None
        self.sent = 0  # path commands streamed
        self.bbox_sent = False

    def push(self, item: StreamItem) -> list[dict[str, Any]]:
        if isinstance(item, tuple):
            self.sizes.append((_unit(item[0]), _unit(item[1])))
            if self.bbox_sent or (bbox := _bbox(self.coords, self.sizes)) is None:
                return []
            self.bbox, self.bbox_sent = bbox, True
            return [{"type": "bbox", "bbox": bbox}]
        if isinstance(item, float):
            self.coords.append(_unit(item))
            return []
        if not (text := path_text(item, self.tokenizer)) or self.bbox is None:
            return []
        self.tokens.append(text)
        if text.isdigit() or text == "-":
            return []  # the command being read may still grow
        commands, error = parse_path(self.tokens)
        return self._chunks(commands if error else commands[:-1], self.bbox)

    def finish(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        head = [] if self.bbox_sent else [{"type": "bbox", "bbox": result["bbox"]}]
        tail = self._chunks(parse_path(self.tokens)[0], result["bbox"]) if result["bbox"] else []
        return head + tail + [{"type": "final", "path": result["path"], "bbox": result["bbox"], "completed": True}]

    def _chunks(self, commands: list[Command], bbox: dict[str, float]) -> list[dict[str, Any]]:
        start, self.sent = self.sent, max(self.sent, len(commands))
        return [
            {"type": "path_delta", "chunk": (" " if start + i else "") + absolute_path([c], bbox), "completed": False}
            for i, c in enumerate(commands[start:])
        ]


class Segment(Skill):
    name, arg = "segment", "object"
    takes_spatial_refs = True
    greedy = True
    locates = True
    unsupported = "it has no segmentation head (no segment template; Moondream 2 does not segment)"

    def supports(self, cfg: ModelConfig) -> bool:
        return bool(cfg.tokenizer.segment_prefix)

    def prompt(self, req: SkillRequest, tokenizer: Tokenizer) -> Prompt:
        tok = tokenizer.cfg
        if not isinstance(req.object, str) or not req.object.strip():
            raise SettingsError("object must be a non-empty string")
        text = tuple(tokenizer.encode(req.object.strip())) + tok.segment_suffix
        return Prompt(tok.segment_prefix) + spatial_prompt(req.spatial_refs, tok) + Prompt(text)

    def program(self, req: SkillRequest, s: Settings, tok: TokenizerConfig):
        return partial(SegmentProgram, tok, s.max_tokens, (req.object or "").strip())

    def render(self, out: Output, tokenizer: Tokenizer, clip: bool = True) -> dict[str, Any]:
        o = Outline.of(out, tokenizer)
        bbox = o.bbox
        return {"path": "" if bbox is None else absolute_path(parse_path(o.path_tokens)[0], bbox), "bbox": bbox}

    def reference(self, out: Output, tokenizer: Tokenizer) -> dict[str, Any]:
        """Kestrel's `{"segments": [...]}`: the bbox-relative path, or "" and `parse_error` when it does not parse."""
        o = Outline.of(out, tokenizer)
        path, error = svg_path(o.path_tokens)
        if o.bbox is None:
            error = "no bounding box (coord, coord, size) came first"
        path = "" if error else path
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

    # --- fine-tuning: a target is the client's result, {"path", "bbox"}; the bbox is decoded greedily (as in
    # inference), the path's tokens are sampled; RL scores the mask IoU against a path or a box ------------

    def parse_target(self, d: dict[str, Any], where: str) -> Target:
        """`bbox` (required) and `path` (image-normalized, as `render` returns it; optional for RL rewards)."""
        if "bbox" not in d:
            raise TuningError(f"{where}.bbox is required for segment")
        path = d.get("path")
        if path is not None and not isinstance(path, str):
            raise TuningError(f"{where}.path must be an SVG path string")
        return Target(answer=path, boxes=(parse_box(d["bbox"], f"{where}.bbox"),))

    def teach(self, req: SkillRequest, target: Target, tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[Prompt, list[Move]]:
        if target.answer is None:
            raise TuningError("a segment target needs its path to be taught (a bbox alone only scores rollouts)")
        x0, y0, x1, y1 = target.boxes[0]
        box = {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1}
        ids = [_path_token(tokenizer, t) for t in relative_tokens(target.answer, box)]
        rc, tok = cfg.region, cfg.tokenizer
        bins = [region.coord_to_bin((x0 + x1) / 2, rc), region.coord_to_bin((y0 + y1) / 2, rc)]
        size = (region.size_to_bin(x1 - x0, rc), region.size_to_bin(y1 - y0, rc))
        opening = bbox_opening(tok)
        bbox = [
            m
            for b, allowed in zip(bins, opening, strict=False)
            for m in (Move(Head.LM, tok.coord_id, decisions=allowed), Move(Head.COORD, b, Feed(coord=coord_value(b, rc))))
        ]
        bbox += [Move(Head.LM, tok.size_id, decisions=opening[2]), Move(Head.SIZE, size, Feed(size=size_value(size, rc)))]
        return self.prompt(req, tokenizer), bbox + text_moves(ids, (), tok.eos_id)

    def replay(self, req: SkillRequest, r: Rollout, tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[Prompt, list[Move]]:
        """The sampled tokens in order; a coord or size token is followed by its greedy value (not an action)."""
        tok, rc = cfg.tokenizer, cfg.region
        if (r.answer_tokens.count(tok.coord_id), r.answer_tokens.count(tok.size_id)) != (len(r.coords), len(r.sizes)):
            raise TuningError("a segment rollout needs one coords bin per coord token and one size per size token")
        opening = bbox_opening(tok)
        coords, sizes, moves = iter(r.coords), iter(r.sizes), []
        for j, t in enumerate(r.answer_tokens):
            allowed = opening[j] if j < len(opening) else ()
            if allowed and t not in allowed:
                raise TuningError("a segment rollout opens with its bbox: coord, coord, size")
            if t == tok.coord_id:
                b = next(coords)
                moves += [Move(Head.LM, t, decisions=allowed), Move(Head.COORD, b, Feed(coord=coord_value(b, rc)), action=False)]
            elif t == tok.size_id:
                wh = next(sizes)
                moves += [Move(Head.LM, t, decisions=allowed), Move(Head.SIZE, wh, Feed(size=size_value(wh, rc)), action=False)]
            else:
                moves.append(Move(Head.LM, t, Feed(token=t), decisions=allowed))
        if r.finish_reason == "stop":
            moves.append(Move(Head.LM, tok.eos_id, decisions=opening[0] if not r.answer_tokens else ()))
        return self.prompt(req, tokenizer), moves

    def check_rollout(self, r: Rollout, where: str) -> None:
        if r.thinking_tokens or r.has_answer_separator:
            raise TuningError(f"{where}: segment does not reason")

    def reward(self, output: dict[str, Any], truth: Target) -> float:
        """Mask IoU on a REWARD_GRID-square canvas against the true path, or its bbox when it has none."""
        n = REWARD_GRID
        pred = path_mask(output["path"], n, n) if output.get("path") else np.zeros((n, n), bool)
        true = path_mask(truth.answer, n, n) if truth.answer else box_mask(truth.boxes[0], n, n)
        return mask_iou(pred, true)

    def event_stream(self, tokenizer: Tokenizer) -> SegmentStream:
        return SegmentStream(tokenizer)


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


def relative_tokens(path: str, bbox: dict[str, float]) -> list[str]:
    """An image-normalized path (as `render` returns it) -> the model's path tokens: commands and integers in
    960ths of the bbox, a negative number as `-` then its magnitude (the inverse of `absolute_path`)."""
    w, h = max(bbox["x_max"] - bbox["x_min"], 1e-9), max(bbox["y_max"] - bbox["y_min"], 1e-9)
    tokens: list[str] = []
    cmd = ""
    for part in re.findall(r"[A-Za-z]|-?\d*\.?\d+(?:e-?\d+)?", path):
        if part in SVG_COMMANDS:
            cmd, k = part, 0
            tokens.append(part)
            continue
        if not cmd:
            raise TuningError(f"segment path {path[:40]!r} must start with an SVG command")
        scale, offset = (w, bbox["x_min"]) if k % 2 == 0 else (h, bbox["y_min"])
        v = round((float(part) - (offset if cmd.isupper() else 0.0)) / scale * PATH_BOX)
        tokens += ["-", str(-v)] if v < 0 else [str(v)]
        k += 1
    return tokens


def svg_path(tokens: list[str]) -> tuple[str, str | None]:
    """Path tokens -> (bbox-relative path, parse error)."""
    commands, error = parse_path(tokens)
    return " ".join(_svg(commands)), error


def _path_token(tokenizer: Tokenizer, text: str) -> int:
    """The model's one id for a path token (Kestrel reads path tokens one id at a time). A number the tokenizer
    cannot write as one token is snapped to the nearest one it can within SNAP (nano writes multiples of 30)."""
    if text.isdigit():
        numbers = _number_ids(tokenizer)
        near = min(numbers, key=lambda k: abs(k - int(text)), default=None)
        if near is not None and abs(near - int(text)) <= SNAP:
            return numbers[near]
        raise TuningError(f"path number {text} has no single token of this model's tokenizer within {SNAP} of it")
    for form in (text, " " + text):
        if len(ids := tokenizer.encode(form)) == 1:
            return ids[0]
    raise TuningError(f"path token {text!r} is not a single token of this model's tokenizer")


@functools.lru_cache(maxsize=8)
def _number_ids(tokenizer: Tokenizer) -> dict[int, int]:
    """Path numbers (0..960) the tokenizer writes as one token, bare or after a space -> that token's id."""
    out = {}
    for v in range(PATH_BOX + 1):
        if (ids := next((i for form in (str(v), f" {v}") if len(i := tokenizer.encode(form)) == 1), None)) is not None:
            out[v] = ids[0]
    return out


def _paired(commands: list[Command]) -> list[Command]:
    return [(cmd, nums[: len(nums) // 2 * 2]) for cmd, nums in commands]


def _svg(commands: list[Command], digits: int = 3) -> list[str]:
    return [" ".join([cmd, *(_number(v, digits) for v in nums)]) for cmd, nums in commands]


def _number(v: float, digits: int) -> str:
    s = f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def _unit(v: float) -> float:
    return min(1.0, max(0.0, v))
