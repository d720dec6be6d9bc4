"""moonbase: run, serve and fine-tune Moondream vision-language models on your own hardware."""

from __future__ import annotations

from pathlib import Path

import torch

from .api import VL
from .errors import CheckpointError, ConfigError, ImageError, ModelNotFoundError, MoonbaseError, SettingsError
from .hub import load
from .model.text import EncodedImage

__version__ = "0.1.0"


def vl(model: str | Path | None = None, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> VL:
    """A client-compatible model handle: `caption`, `query`, `detect`, `point`, `encode_image`."""
    return VL(load(model, device, dtype))


__all__ = [
    "vl",
    "load",
    "VL",
    "EncodedImage",
    "MoonbaseError",
    "CheckpointError",
    "ConfigError",
    "ImageError",
    "ModelNotFoundError",
    "SettingsError",
]
