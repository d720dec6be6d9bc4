"""What every skill shares: the request a caller makes (`SkillRequest`), validated settings, prompts as
token ids with region values, and the `Skill` base class each skill module fills in."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import Defaults, ModelConfig, TokenizerConfig
from ..errors import SettingsError, SkillNotSupportedError, TuningError
from ..tokenizer import Tokenizer
from .program import Feed, Output, Program, StreamItem
from .training import Move, Rollout, Target

SETTING_KEYS = ("temperature", "top_p", "max_tokens", "max_objects", "seed", "variant")


@dataclass(frozen=True)
class Prompt:
    """Token ids plus the values that replace coord/size placeholder ids, in order of appearance."""

    ids: tuple[int, ...]
    coords: tuple[float, ...] = ()
    sizes: tuple[tuple[float, float], ...] = ()

    def __add__(self, other: Prompt) -> Prompt:
        return Prompt(self.ids + other.ids, self.coords + other.coords, self.sizes + other.sizes)

    def feeds(self, tok: TokenizerConfig) -> list[Feed]:
        """The prompt as decoder inputs: coord/size placeholder ids take their values, in order."""
        coords, sizes = iter(self.coords), iter(self.sizes)
        return [
            Feed(coord=next(coords)) if t == tok.coord_id else Feed(size=next(sizes)) if t == tok.size_id else Feed(token=t)
            for t in self.ids
        ]


@dataclass(frozen=True)
class Settings:
    """Settings with the model's defaults filled in (`resolve_settings`)."""

    temperature: float
    top_p: float
    max_tokens: int
    max_objects: int
    seed: int | None = None
    variant: str | None = None


def _setting(s: dict[str, Any], key: str, default: Any, valid: Callable[[Any], bool], what: str) -> Any:
    """`s[key]` if `valid` (never a bool), else a `SettingsError`; missing or None gives `default`."""
    v = s.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not valid(v):
        raise SettingsError(f"{key} must be {what}, got {v!r}")
    return v


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return isinstance(v, int) and v > 0


def resolve_settings(settings: dict[str, Any] | None, defaults: Defaults) -> Settings:
    """Validate user settings (every key optional) and fill in the model's defaults."""
    s = dict(settings or {})
    if unknown := set(s) - set(SETTING_KEYS):
        raise SettingsError(f"unknown settings {sorted(unknown)}; allowed: {', '.join(SETTING_KEYS)}")
    temperature = float(_setting(s, "temperature", defaults.temperature, _finite, "a finite number"))
    if temperature < 0:
        raise SettingsError(f"temperature must be >= 0, got {temperature}")
    top_p = float(_setting(s, "top_p", defaults.top_p, _finite, "a finite number"))
    if not 0 < top_p <= 1:
        raise SettingsError(f"top_p must be in (0, 1], got {top_p}")
    max_tokens = _setting(s, "max_tokens", defaults.max_tokens, _positive, "a positive integer")
    max_objects = _setting(s, "max_objects", defaults.max_objects, _positive, "a positive integer")
    seed = _setting(s, "seed", None, lambda v: isinstance(v, int), "an integer")
    variant = _setting(s, "variant", None, lambda v: isinstance(v, str), "a string")
    return Settings(temperature, top_p, max_tokens, max_objects, seed, variant or None)


def spatial_prompt(refs: Any, tok: TokenizerConfig) -> Prompt:
    """[x, y] points -> two coord tokens; [x_min, y_min, x_max, y_max] boxes -> centre coords + one size token."""
    if refs is not None and not isinstance(refs, (list, tuple)):
        raise SettingsError("spatial_refs must be a list of [x, y] points or [x_min, y_min, x_max, y_max] boxes")
    prompt = Prompt(())
    for ref in refs or ():
        if not isinstance(ref, (list, tuple)) or len(ref) not in (2, 4):
            raise SettingsError(f"each spatial ref must have 2 or 4 numbers, got {ref!r}")
        if not all(not isinstance(v, bool) and _finite(v) and 0 <= v <= 1 for v in ref):
            raise SettingsError(f"spatial ref values must be finite numbers in [0, 1], got {ref!r}")
        if len(ref) == 2:
            prompt += Prompt((tok.coord_id, tok.coord_id), (float(ref[0]), float(ref[1])))
            continue
        x1, y1, x2, y2 = (float(v) for v in ref)
        if x1 > x2 or y1 > y2:
            raise SettingsError(f"box spatial ref needs x_min <= x_max and y_min <= y_max, got {ref!r}")
        prompt += Prompt((tok.coord_id, tok.coord_id, tok.size_id), ((x1 + x2) / 2, (y1 + y2) / 2), ((x2 - x1, y2 - y1),))
    return prompt


@dataclass(frozen=True)
class SkillRequest:
    """One call of a skill, as every path builds it: the Python API, HTTP routes, the tuning API, data
    files, bench and eval. `skill` may be given by name; each skill reads its own arguments and checks
    them when the request is prepared (`skills.prepare`) or parsed (`skills.parse_request`)."""

    skill: Skill
    image: Any = None  # ImageInput | EncodedImage | None (text only)
    question: str | None = None  # query
    object: str | None = None  # detect, point
    length: str = "normal"  # caption: short | normal | long
    reasoning: bool | None = None  # query; None: the model's default (Moondream 3 reasons first)
    spatial_refs: Any = None  # query, point: [x, y] points or [x_min, y_min, x_max, y_max] boxes
    settings: tuple[tuple[str, Any], ...] = ()  # sorted items: frozen

    def __post_init__(self) -> None:
        if isinstance(self.skill, str):
            from . import get  # the registry imports this module

            object.__setattr__(self, "skill", get(self.skill))
        if isinstance(self.settings, dict):
            object.__setattr__(self, "settings", tuple(sorted(self.settings.items())))

    @classmethod
    def of(cls, skill: Skill | str, image: Any, arg: str, **kw: Any) -> SkillRequest:
        """A request from the skill's main argument (caption length, question or object)."""
        req = cls(skill, image)
        return cls(req.skill, image, **{req.skill.arg: arg}, **kw)

    @property
    def settings_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def with_defaults(self, defaults: Defaults) -> SkillRequest:
        """`reasoning` decided: the model's default where the request does not say and the skill reasons."""
        if self.reasoning is not None:
            return self
        return dataclasses.replace(self, reasoning=self.skill.can_reason and defaults.reasoning)


class EventStream(Protocol):
    """A run's stream items (its program's `new_tokens`, in order) in, the typed wire events out."""

    def push(self, item: StreamItem) -> list[dict[str, Any]]: ...
    def finish(self, result: dict[str, Any]) -> list[dict[str, Any]]: ...  # the rendered result, once the run ends


class Skill(ABC):
    """One skill: it checks its arguments, builds its prompt, creates its engine program and renders what
    the program produced; for fine-tuning it parses targets, turns a target or a rollout into the moves that
    teach it, validates rollouts sent back, and scores outputs against ground truth."""

    name: str
    arg: str  # the SkillRequest field its main argument fills
    needs_image = True
    takes_spatial_refs = False
    can_reason = False
    greedy = False  # decoded greedily whatever the temperature (rollouts still sample)
    locates = False  # its answer goes through the region head (coordinates and sizes): detect, point, segment
    text_key: str | None = None  # the output field that streams as text
    tunable = True  # the tuning API trains it (SFT targets, rollouts)

    unsupported = ""  # why a model that `supports` refuses cannot run it

    def supports(self, cfg: ModelConfig) -> bool:
        """Whether a model with this configuration can run the skill (segment needs a segment template)."""
        return True

    def require(self, cfg: ModelConfig, model: str) -> None:
        """SkillNotSupportedError naming `model` (a name, or where the request came from) when it cannot run this."""
        if not self.supports(cfg):
            raise SkillNotSupportedError(f"{model} cannot {self.name}: {self.unsupported}")

    def check(self, req: SkillRequest) -> None:
        if self.needs_image and req.image is None:
            raise SettingsError(f"{self.name} needs an image")
        if req.spatial_refs and not self.takes_spatial_refs:
            raise SettingsError(f"{self.name} takes no spatial_refs")
        if req.spatial_refs and req.image is None:
            raise SettingsError("spatial_refs need an image")
        if req.reasoning and not self.can_reason:
            raise SettingsError(f"{self.name} does not reason; only query takes reasoning")

    @abstractmethod
    def prompt(self, req: SkillRequest, tokenizer: Tokenizer) -> Prompt: ...

    @abstractmethod
    def program(self, req: SkillRequest, s: Settings, tok: TokenizerConfig) -> Callable[[], Program]: ...

    @abstractmethod
    def render(self, out: Output, tokenizer: Tokenizer, clip: bool = True) -> dict[str, Any]: ...

    def reference(self, out: Output, tokenizer: Tokenizer) -> dict[str, Any]:
        """The result as the reference implementation returns it (parity): unclipped, in its own format."""
        return self.render(out, tokenizer, clip=False)

    def event_stream(self, tokenizer: Tokenizer) -> EventStream | None:
        """How a non-text skill streams (segment): typed events as its program decodes; None: it does not stream."""
        return None

    # --- fine-tuning --------------------------------------------------------------------------------

    def parse_target(self, d: dict[str, Any], where: str) -> Target:
        raise TuningError(f"{self.name} is not tunable")

    def teach(self, req: SkillRequest, target: Target, tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[Prompt, list[Move]]:
        """The prompt and the decisions that produce `target` (teacher forcing: SFT and the nano recipe)."""
        raise TuningError(f"{self.name} is not tunable")

    def replay(self, req: SkillRequest, r: Rollout, tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[Prompt, list[Move]]:
        """The prompt and the decisions a rollout sampled, to score them under the current policy (GRPO)."""
        raise TuningError(f"{self.name} is not tunable")

    def check_rollout(self, r: Rollout, where: str) -> None:
        """A rollout sent back by a client must be one this skill can produce."""
        raise TuningError(f"{self.name} is not tunable")

    def reward(self, output: dict[str, Any], truth: Target) -> float:
        raise TuningError(f"{self.name} has no ground-truth reward")
