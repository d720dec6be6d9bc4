"""moonbase: run, serve and fine-tune Moondream vision-language models on your own hardware.

`import moonbase` is cheap: torch, the engine and the hub are imported when first used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ConfigError, ImageError, ModelNotFoundError, MoonbaseError, SettingsError

if TYPE_CHECKING:
    from .api import VL

__version__ = "0.1.0"

_LAZY = {"VL": "api", "load": "hub", "EncodedImage": "model.text", "SkillRequest": "skills"}


def vl(
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    *,
    kv_memory_mb: float | None = None,
    prefix_cache_mb: float | None = None,
    max_batch: int = 32,
    max_step_tokens: int = 4096,
    max_crops: int | None = None,
    max_pixels: int | None = None,
    pipeline: bool | None = None,
    int8_decode: bool = False,
    timeout: float | None = None,
) -> VL:
    """A client-compatible model handle: `caption`, `query`, `detect`, `point`, `encode_image`.

    Engine knobs: `kv_memory_mb` (the paged KV pool; default: enough for a full batch, capped by free
    memory), `prefix_cache_mb` (most of it idle cached image prefixes may keep), `max_batch` (sequences
    running at once), `max_step_tokens` (prefill tokens per step), `pipeline` (overlap host and device
    work; default on CUDA), `int8_decode` (CPU: int8 decode steps, approximate). Image limits:
    `max_crops` (tiles per image, at most the model's), `max_pixels` (larger images are refused).
    `timeout`: seconds per request before it is cancelled."""
    from .api import VL
    from .engine.engine import EngineConfig
    from .hub import load
    from .skills import ImageLimits

    engine = EngineConfig(
        max_batch=max_batch,
        max_step_tokens=max_step_tokens,
        kv_memory_mb=kv_memory_mb,
        prefix_cache_mb=prefix_cache_mb,
        int8_decode=int8_decode,
        pipeline=pipeline,
    )
    limits = ImageLimits(max_crops=max_crops) if max_pixels is None else ImageLimits(max_pixels, max_crops)
    return VL(load(model, device, dtype), engine_config=engine, limits=limits, timeout=timeout)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'moonbase' has no attribute {name!r}")


__all__ = [
    "vl",
    "load",
    "VL",
    "EncodedImage",
    "SkillRequest",
    "MoonbaseError",
    "CheckpointError",
    "ConfigError",
    "ImageError",
    "ModelNotFoundError",
    "SettingsError",
]
