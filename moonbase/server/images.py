"""`image_url` values: data URLs (any image MIME type) or bare base64. Remote URLs (`http(s)://...`) and file
paths (`file://...`) are refused unless the server was started to allow them (--allow-remote-images,
--allow-file-images)."""

from __future__ import annotations

import base64
import urllib.request
from pathlib import Path

import numpy as np

from ..errors import ImageError
from ..image import load_image


def decode_image_url(value: str, max_pixels: int, allow_remote: bool = False, allow_files: bool = False) -> np.ndarray:
    if value.startswith(("http://", "https://")):
        if not allow_remote:
            raise ImageError(
                "remote image URLs are disabled on this server; send a data URL (start it with --allow-remote-images)"
            )
        with urllib.request.urlopen(value, timeout=20) as response:  # noqa: S310 (opt-in)
            return load_image(response.read(), max_pixels)
    if value.startswith("file://"):
        if not allow_files:
            raise ImageError("file paths are disabled on this server; send a data URL (start it with --allow-file-images)")
        return load_image(Path(value.removeprefix("file://")), max_pixels)
    if value.startswith("data:") and "," not in value:
        raise ImageError("malformed data URL: no comma before the payload")
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    if not payload.strip():
        raise ImageError("image_url holds no image data")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except ValueError as e:  # binascii.Error is one
        raise ImageError(f"image_url is not valid base64: {e}") from e
    return load_image(data, max_pixels)
