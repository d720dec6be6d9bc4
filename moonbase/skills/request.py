"""From a skill request to what the engine runs. `prepare` checks the request, resolves its settings and
adapter, tiles and hashes its image, builds the prompt and the program, and checks the context fit; every
path (the Python API, the server, rollouts, bench, eval) goes through it. `parse_request` reads a skill
request from JSON: the HTTP skill routes, the tuning API and data files."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from ..errors import AdapterNotFoundError, ConfigError, SettingsError
from ..image import DEFAULT_MAX_PIXELS, Crops, load_image, overlap_crops
from ..model.lora import Adapter
from ..model.moondream import Moondream
from ..model.text import EncodedImage
from .base import SETTING_KEYS, Prompt, SkillRequest, resolve_settings
from .program import Program

AdapterLookup = Callable[[str], Adapter]  # a `variant` name -> the adapter (the engine's AdapterStore.get)


@dataclass(frozen=True)
class Request:
    """A prepared request: everything the engine needs and nothing it must interpret."""

    prompt: Prompt
    program: Callable[[], Program]  # a fresh program per submission
    temperature: float
    top_p: float
    seed: int | None = None
    image: Crops | EncodedImage | None = None
    image_key: Hashable | None = None
    adapter: Adapter | None = None
    rollout: bool = False  # fine-tuning: every choice is sampled, and its log-probability recorded

    @property
    def prefix_key(self) -> Hashable | None:
        """Cached image prefixes depend on the adapter too (it changes the text layers that prefill them)."""
        adapter = None if self.adapter is None else self.adapter.name
        return None if self.image_key is None else (self.image_key, adapter)


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused (decompression bombs)
    max_crops: int | None = None  # tiles per image below the model's maximum: less vision work, less detail

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or (self.max_crops is not None and self.max_crops < 1):
            raise ConfigError(f"max_pixels and max_crops must be positive, got {self.max_pixels} and {self.max_crops}")

    def crops(self, m: Moondream, image: Any) -> Crops:
        vision = m.cfg.vision
        if self.max_crops is not None and self.max_crops < vision.max_crops:
            vision = dataclasses.replace(vision, max_crops=self.max_crops)
        return overlap_crops(load_image(image, self.max_pixels), vision)


def prepare(
    m: Moondream,
    req: SkillRequest,
    adapters: AdapterLookup | None = None,
    limits: ImageLimits = ImageLimits(),
    rollout: bool = False,
) -> Request:
    req, tok = req.with_defaults(m.cfg.defaults), m.cfg.tokenizer
    skill, s = req.skill, resolve_settings(req.settings_dict, m.cfg.defaults)
    skill.require(m.cfg, f"model {m.name!r}")
    skill.check(req)
    prompt = skill.prompt(req, m.tokenizer)
    adapter = None
    if s.variant is not None:
        if adapters is None:
            raise AdapterNotFoundError(f"unknown adapter (variant) {s.variant!r}")
        adapter = adapters(s.variant)
    source, key = _image(m, req.image, s.variant, limits)
    if source is None:  # text only: BOS then the prompt, causal from position 0
        prompt = Prompt((tok.bos_id,)) + prompt
    room = m.cfg.text.max_context - (0 if source is None else m.cfg.prefix_len)
    if len(prompt.ids) >= room:
        raise SettingsError(f"prompt of {len(prompt.ids)} tokens does not fit the context ({room} left)")
    sampling = (0.0, 1.0, None) if skill.greedy and not rollout else (s.temperature, s.top_p, s.seed)
    return Request(prompt, skill.program(req, s, tok), *sampling, source, key, adapter, rollout)


def _image(m: Moondream, image: Any, variant: str | None, limits: ImageLimits) -> tuple[Crops | EncodedImage | None, Any]:
    if image is None:
        return None, None
    if not isinstance(image, EncodedImage):
        crops = limits.crops(m, image)
        return crops, crops.key
    if image.length != m.cfg.prefix_len:
        raise SettingsError(f"encoded image has {image.length} positions; this model's prefix has {m.cfg.prefix_len}")
    if image.variant != variant:
        raise SettingsError(f"image was encoded with variant {image.variant!r}; this request uses {variant!r}")
    return image, image.key or "kv:" + hashlib.blake2b(image.kv[0][0].float().cpu().numpy().tobytes(), digest_size=16).hexdigest()


def parse_request(d: Any, image_of: Callable[[Any], Any], skill: str | None = None, where: str = "request") -> SkillRequest:
    """A skill request from JSON. `skill` names it when the route does (else `d["skill"]`); the image comes
    as `image_url` (or `image`) and goes through `image_of`; settings may be nested (`settings`, which
    wins) or top-level, as some clients send them. `variant` is left out: the caller resolves adapters.
    Keys a request does not use are ignored (clients add their own)."""
    if not isinstance(d, dict):
        raise SettingsError(f"{where} must be an object, got {type(d).__name__}")
    from . import get

    name = skill or d.get("skill")
    if not isinstance(name, str):
        raise SettingsError(f"{where}.skill is required")
    chosen = get(name)
    nested = {} if d.get("settings") is None else d["settings"]
    if not isinstance(nested, dict):
        raise SettingsError(f"{where}.settings must be an object")
    settings = {k: d[k] for k in SETTING_KEYS if k in d} | nested
    settings.pop("variant", None)
    image = d.get("image_url", d.get("image"))  # `image`: in-process callers may pass a path, PIL image or array
    if "image_url" in d and image is not None and not isinstance(image, str):
        raise SettingsError(f"{where}.image_url must be a data URL or base64 string")
    for key, kind in (("question", str), ("object", str), ("length", str), ("reasoning", bool), ("spatial_refs", list)):
        if d.get(key) is not None and not isinstance(d[key], kind):
            raise SettingsError(f"{where}.{key} must be a {kind.__name__}, got {d[key]!r}")
    args = {k: d[k] for k in ("question", "object", "length", "reasoning", "spatial_refs") if d.get(k) is not None}
    req = SkillRequest(chosen, None if image is None else image_of(image), settings=settings, **args)
    chosen.check(req)
    return req
