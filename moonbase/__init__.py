"""moonbase: run, serve and fine-tune Moondream vision-language models on your own hardware.

`import moonbase` is cheap: torch, the engine and the hub are imported when first used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ConfigError, ImageError, ModelNotFoundError, MoonbaseError, SettingsError

if TYPE_CHECKING:
    from .api import VL

__version__ = "0.1.0"

_LAZY = {"VL": "api", "load": "hub", "EncodedImage": "model.text", "SkillRequest": "skills", "batch": "jobs"}


def vl(
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    *,
    max_crops: int | None = None,
    max_pixels: int | None = None,
    timeout: float | None = None,
    **engine: Any,
) -> VL:
    """A client-compatible model handle: `caption`, `query`, `detect`, `point`, `encode_image`, `run`.

    `engine`: fields of `EngineConfig` (docs/engine.md): `kv_memory_mb` (the paged KV pool), `prefix_cache_mb`
    (most of it idle cached image prefixes keep), `max_batch`, `max_step_tokens`, `pipeline`, `int8_decode`.
    `max_crops`: the image tile budget; `max_pixels`: larger images are refused; `timeout`: seconds per request."""
    from .api import VL
    from .engine.engine import EngineConfig
    from .hub import load
    from .skills import ImageLimits

    limits = ImageLimits(max_crops=max_crops) if max_pixels is None else ImageLimits(max_pixels, max_crops)
    return VL(load(model, device, dtype), engine_config=EngineConfig(**engine), limits=limits, timeout=timeout)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'moonbase' has no attribute {name!r}")


__all__ = ["vl", *_LAZY, "MoonbaseError", "CheckpointError", "ConfigError", "ImageError", "ModelNotFoundError", "SettingsError"]
