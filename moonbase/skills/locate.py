"""detect(image, object) and point(image, object, spatial_refs): every instance of an object, as boxes or
as points. Decoded greedily like the reference (rollouts sample); the prompt encodes `" " + object`
(leading space, spec D1). Returned coordinates are clipped to [0, 1]; the raw values (boxes are
centre ± size / 2 and may leave the image, D16) are what `render(..., clip=False)` gives."""

from __future__ import annotations

from abc import abstractmethod
from functools import partial
from typing import Any

from ..config import ModelConfig, TokenizerConfig
from ..data.tasks import Box, canonical
from ..errors import SettingsError, TuningError
from ..metrics import detect_reward, point_reward
from ..model import region
from ..tokenizer import Tokenizer
from .base import Prompt, Settings, Skill, SkillRequest, spatial_prompt
from .program import Output, RegionObject, RegionProgram
from .training import Move, Rollout, Target, items, parse_box, parse_point, region_moves


class Locate(Skill):
    arg = "object"
    greedy = True
    locates = True
    with_size: bool

    @abstractmethod
    def template(self, tok: TokenizerConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The prompt's prefix and suffix ids."""

    def prompt(self, req: SkillRequest, tokenizer: Tokenizer) -> Prompt:
        tok = tokenizer.cfg
        if not isinstance(req.object, str) or not req.object.strip():
            raise SettingsError("object must be a non-empty string")
        prefix, suffix = self.template(tok)
        text = " " + req.object if tok.object_leading_space else req.object
        return Prompt(prefix) + spatial_prompt(req.spatial_refs, tok) + Prompt(tuple(tokenizer.encode(text)) + suffix)

    def program(self, req: SkillRequest, s: Settings, tok: TokenizerConfig):
        return partial(RegionProgram, tok, self.with_size, s.max_objects)

    def replay(self, req: SkillRequest, r: Rollout, tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[Prompt, list[Move]]:
        sizes = r.sizes if self.with_size else None
        return self.prompt(req, tokenizer), region_moves(r.coords, sizes, r.finish_reason == "stop", cfg)

    def check_rollout(self, r: Rollout, where: str) -> None:
        if len(r.coords) % 2 or len(r.sizes) != (len(r.coords) // 2 if self.with_size else 0):
            each = " and one [w, h] size each" if self.with_size else " and no sizes"
            raise TuningError(f"{where}: {self.name} needs 2 coords per object{each}")

    def _moves(self, boxes: tuple[Box, ...], cfg: ModelConfig) -> list[Move]:
        """Objects in the canonical order (left to right by centre, then top to bottom): the order nano was
        trained with and the order a teacher-forced list needs to be unambiguous."""
        rc = cfg.region
        coords = [region.coord_to_bin(v, rc) for b in boxes for v in ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)]
        sizes = [(region.size_to_bin(b[2] - b[0], rc), region.size_to_bin(b[3] - b[1], rc)) for b in boxes]
        return region_moves(coords, sizes if self.with_size else None, True, cfg, about=boxes)


class Detect(Locate):
    name, with_size = "detect", True

    def template(self, tok: TokenizerConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tok.detect_prefix, tok.detect_suffix

    def render(self, out: Output, tokenizer: Tokenizer, clip: bool = True) -> dict[str, Any]:
        assert out.objects is not None
        return {"objects": [box(o, clip) for o in out.objects]}

    def parse_target(self, d: dict[str, Any], where: str) -> Target:
        if "boxes" not in d:
            raise TuningError(f"{where}.boxes is required for detect (an empty list means no objects)")
        return Target(boxes=tuple(parse_box(b, f"{where}.boxes[{k}]") for k, b in enumerate(items(d, "boxes", where))))

    def teach(self, req: SkillRequest, target: Target, tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[Prompt, list[Move]]:
        return self.prompt(req, tokenizer), self._moves(canonical(target.boxes), cfg)

    def reward(self, output: dict[str, Any], truth: Target) -> float:
        pred = [(o["x_min"], o["y_min"], o["x_max"], o["y_max"]) for o in output.get("objects", [])]
        return detect_reward(pred, list(truth.boxes))


class Point(Locate):
    name, with_size = "point", False
    takes_spatial_refs = True

    def template(self, tok: TokenizerConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tok.point_prefix, tok.point_suffix

    def render(self, out: Output, tokenizer: Tokenizer, clip: bool = True) -> dict[str, Any]:
        assert out.objects is not None
        return {"points": [{"x": _clip(o.x, clip), "y": _clip(o.y, clip)} for o in out.objects]}

    def parse_target(self, d: dict[str, Any], where: str) -> Target:
        """Points, and optionally the boxes they should fall in (for rewards)."""
        if "points" not in d and "boxes" not in d:
            raise TuningError(f"{where} needs points (and optionally boxes) for point")
        boxes = tuple(parse_box(b, f"{where}.boxes[{k}]") for k, b in enumerate(items(d, "boxes", where)))
        points = tuple(parse_point(p, f"{where}.points[{k}]") for k, p in enumerate(items(d, "points", where)))
        return Target(boxes=boxes, points=points)

    def teach(self, req: SkillRequest, target: Target, tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[Prompt, list[Move]]:
        """Points, or the centres of boxes when a target has none."""
        objects = tuple((x, y, x, y) for x, y in target.points) if target.points else target.boxes
        return self.prompt(req, tokenizer), self._moves(canonical(objects), cfg)

    def reward(self, output: dict[str, Any], truth: Target) -> float:
        return point_reward([(p["x"], p["y"]) for p in output.get("points", [])], list(truth.boxes), list(truth.points))


def box(o: RegionObject, clip: bool = True) -> dict[str, float]:
    """Centre and size -> box corners."""
    assert o.size is not None
    w, h = o.size
    corners = {"x_min": o.x - w / 2, "y_min": o.y - h / 2, "x_max": o.x + w / 2, "y_max": o.y + h / 2}
    return {k: _clip(v, clip) for k, v in corners.items()}


def _clip(v: float, clip: bool) -> float:
    return min(1.0, max(0.0, v)) if clip else v
