"""The Python API: the same methods and result shapes as the official `moondream` client.

import moonbase
model = moonbase.vl()                       # the default model; or vl(model="path/or/hub-id")
model.caption("photo.jpg")["caption"]
model.query(image, "What is this?")["answer"]
model.detect(image, "face")["objects"]      # [{"x_min", "y_min", "x_max", "y_max"}], normalized
model.point(image, "face")["points"]        # [{"x", "y"}]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from . import simple, skills
from .errors import SettingsError
from .image import DEFAULT_MAX_PIXELS, ImageInput, load_image, overlap_crops
from .model.moondream import Moondream
from .model.text import EncodedImage
from .simple import TextRun
from .tokenizer import TextStream


class VL:
    def __init__(self, model: Moondream, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.model, self.max_pixels = model, max_pixels

    def encode_image(self, image: ImageInput | EncodedImage) -> EncodedImage:
        """Run the vision encoder and the image prefill once; pass the result to any skill to reuse it."""
        if isinstance(image, EncodedImage):
            return image
        m = self.model
        crops = overlap_crops(load_image(image, self.max_pixels), m.cfg.vision)
        with torch.no_grad():
            return m.prefill_image(m.embed_crops([crops])[0])

    def _settings(self, settings: dict[str, Any] | None) -> skills.Settings:
        s = skills.resolve_settings(settings, self.model.cfg.defaults)
        if s.variant is not None:
            raise SettingsError(f"variant {s.variant!r}: LoRA adapters are not supported by this model yet")
        return s

    def _text(self, ids: Iterator[int], stream: bool) -> str | Iterator[str]:
        if not stream:
            return self.model.tokenizer.decode(list(ids))
        return _stream(ids, TextStream(self.model.tokenizer))

    def caption(
        self,
        image: ImageInput | EncodedImage,
        length: str = "normal",
        stream: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        s = self._settings(settings)
        skills.caption_prompt(self.model.cfg.tokenizer, length)  # validate before encoding the image
        ids = simple.caption(self.model, self.encode_image(image), length, s)
        return {"caption": self._text(ids, stream)}

    def query(
        self,
        image: ImageInput | EncodedImage | None = None,
        question: str | None = None,
        stream: bool = False,
        settings: dict[str, Any] | None = None,
        reasoning: bool = False,
        spatial_refs: Any = None,
    ) -> dict[str, Any]:
        s = self._settings(settings)
        if question is None:
            raise SettingsError("question is required")
        skills.query_prompt(self.model.tokenizer, question, spatial_refs, reasoning)  # validate first
        encoded = None if image is None else self.encode_image(image)
        trace = TextRun()
        ids = simple.query(self.model, encoded, question, s, spatial_refs, reasoning, reasoning_run=trace)
        out: dict[str, Any] = {}
        if reasoning:
            out["reasoning"] = skills.reasoning_output(simple.reasoning_chunks(trace, self.model), self.model.tokenizer)
        out["answer"] = self._text(ids, stream)
        return out

    def detect(self, image: ImageInput | EncodedImage, object: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        s = self._settings(settings)
        skills.object_prompt(self.model.tokenizer, "detect", object)
        objs = simple.locate(self.model, self.encode_image(image), "detect", object, s)
        return {"objects": [skills.region_output(o.x, o.y, *o.size) for o in objs]}

    def point(
        self, image: ImageInput | EncodedImage, object: str, settings: dict[str, Any] | None = None, spatial_refs: Any = None
    ) -> dict[str, Any]:
        s = self._settings(settings)
        skills.object_prompt(self.model.tokenizer, "point", object, spatial_refs)
        objs = simple.locate(self.model, self.encode_image(image), "point", object, s, spatial_refs)
        return {"points": [{"x": o.x, "y": o.y} for o in objs]}

    def detect_gaze(
        self, image: ImageInput | EncodedImage, eye: tuple[float, float], settings: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Where the person whose eye is at `eye` is looking, Photon style: point(image, "gaze", [eye]).
        Unstable: the reference's own gaze prompt is stale for these weights (spec D6)."""
        points = self.point(image, "gaze", {**(settings or {}), "max_objects": 1}, spatial_refs=[list(eye)])["points"]
        return {"gaze": points[0] if points else None}


def _stream(ids: Iterator[int], stream: TextStream) -> Iterator[str]:
    for t in ids:
        piece = stream.push(t)
        if piece:
            yield piece
    tail = stream.flush()
    if tail:
        yield tail
