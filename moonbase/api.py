"""The Python API: the same methods and result shapes as the official `moondream` client.

import moonbase
model = moonbase.vl()                       # the default model; or vl(model="path/or/hub-id")
model.caption("photo.jpg")["caption"]
model.query(image, "What is this?")["answer"]
model.detect(image, "face")["objects"]      # [{"x_min", "y_min", "x_max", "y_max"}], normalized
model.point(image, "face")["points"]        # [{"x", "y"}]
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from . import simple, skills
from .device import release_cpu_threads
from .engine.engine import Engine
from .engine.handle import Handle, Result
from .engine.sequence import Request
from .errors import RequestTimeoutError, SettingsError
from .image import DEFAULT_MAX_PIXELS, Crops, ImageInput, load_image, overlap_crops
from .model.lora import Adapter
from .model.moondream import Moondream
from .model.text import EncodedImage
from .tokenizer import TextStream


class VL:
    """Every call becomes a request to one shared engine, so concurrent callers are batched together."""

    def __init__(
        self, model: Moondream, max_pixels: int = DEFAULT_MAX_PIXELS, engine: Engine | None = None, timeout: float | None = None
    ):
        self.model, self.max_pixels, self.timeout = model, max_pixels, timeout  # timeout: seconds per request
        self._engine = engine
        release_cpu_threads()  # the loading thread's: the engine thread computes from now on
        self._engine_lock = threading.Lock()
        self._scopes = threading.local()

    @property
    def engine(self) -> Engine:
        """Created on first use (encode_image alone needs no KV pool), once even when many threads ask at once."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    self._engine = Engine(self.model)
        return self._engine

    def encode_image(self, image: ImageInput | EncodedImage, settings: dict[str, Any] | None = None) -> EncodedImage:
        """Run the vision encoder and the image prefill once; pass the result to any skill to reuse it
        (with the same `variant` setting: an adapter changes the prefill)."""
        if isinstance(image, EncodedImage):
            return image
        m = self.model
        adapter = self._adapter(self._settings(settings))
        crops = self._crops(image)
        with torch.no_grad():
            encoded = m.prefill_image(m.embed_crops([crops], None if adapter is None else adapter.vision)[0], adapter)
        return EncodedImage(encoded.kv, key=image_key(crops), variant=None if adapter is None else adapter.name)

    def _crops(self, image: ImageInput) -> Crops:
        return overlap_crops(load_image(image, self.max_pixels), self.model.cfg.vision)

    def _settings(self, settings: dict[str, Any] | None) -> skills.Settings:
        return skills.resolve_settings(settings, self.model.cfg.defaults)

    def _adapter(self, s: skills.Settings) -> Adapter | None:
        return None if s.variant is None else self.engine.adapters.get(s.variant)

    def _submit(self, skill: str, image: ImageInput | EncodedImage | None, prompt: skills.Prompt, s, **kw) -> Handle:
        handle = self.engine.submit(self._request(skill, image, prompt, s, **kw))
        scope = getattr(self._scopes, "current", None)
        if scope is not None:
            scope.add(handle)
        return handle

    @contextmanager
    def cancel_scope(self, scope: CancelScope) -> Iterator[CancelScope]:
        """Requests this thread submits inside the block can be cancelled from any thread with
        `scope.cancel()` (the server does so when a client disconnects)."""
        previous, self._scopes.current = getattr(self._scopes, "current", None), scope
        try:
            yield scope
        finally:
            self._scopes.current = previous

    def _request(self, skill: str, image: ImageInput | EncodedImage | None, prompt: skills.Prompt, s, **kw) -> Request:
        source = key = None
        adapter = self._adapter(s)
        if isinstance(image, EncodedImage):
            if image.length != self.model.cfg.prefix_len:
                raise SettingsError(
                    f"encoded image has {image.length} positions; this model's prefix has {self.model.cfg.prefix_len}"
                )
            if image.variant != s.variant:
                raise SettingsError(f"image was encoded with variant {image.variant!r}; this request uses {s.variant!r}")
            source, key = image, image.key or _kv_key(image)
        elif image is not None:
            source = self._crops(image)
            key = image_key(source)
        if image is None:  # text only: BOS then the prompt, causal from position 0
            prompt = skills.Prompt((self.model.cfg.tokenizer.bos_id,)) + prompt
        room = self.model.cfg.text.max_context - (0 if image is None else self.model.cfg.prefix_len)
        if len(prompt.ids) >= room:
            raise SettingsError(f"prompt of {len(prompt.ids)} tokens does not fit the context ({room} left)")
        return Request(skill, prompt, s, source, key, adapter=adapter, **kw)

    def _wait(self, handle: Handle, stats: dict | None):
        try:
            result = handle.result(self.timeout)
        except TimeoutError:
            handle.cancel()  # frees its place in the engine
            raise RequestTimeoutError(f"the request did not finish within {self.timeout} s") from None
        _record(stats, result)
        return result

    def _text(self, handle: Handle, stream: bool, stats: dict | None) -> str | Iterator[str]:
        if not stream:
            return self.model.tokenizer.decode(self._wait(handle, stats).run.ids)
        return _stream(handle.tokens(), TextStream(self.model.tokenizer), handle, stats)

    def caption(
        self,
        image: ImageInput | EncodedImage,
        length: str = "normal",
        stream: bool = False,
        settings: dict[str, Any] | None = None,
        stats: dict | None = None,
    ) -> dict[str, Any]:
        """`stats`, if given, is filled with the request's token counts and timings when it finishes."""
        s = self._settings(settings)
        prompt = skills.caption_prompt(self.model.cfg.tokenizer, length)
        return {"caption": self._text(self._submit("caption", image, prompt, s), stream, stats)}

    def query(
        self,
        image: ImageInput | EncodedImage | None = None,
        question: str | None = None,
        stream: bool = False,
        settings: dict[str, Any] | None = None,
        reasoning: bool = False,
        spatial_refs: Any = None,
        stats: dict | None = None,
    ) -> dict[str, Any]:
        s = self._settings(settings)
        if question is None:
            raise SettingsError("question is required")
        if spatial_refs and image is None:
            raise SettingsError("spatial_refs need an image")
        prompt = skills.query_prompt(self.model.tokenizer, question, spatial_refs, reasoning)
        handle = self._submit("query", image, prompt, s, reasoning=reasoning)
        out: dict[str, Any] = {}
        if reasoning:
            trace = self._wait(handle, None).trace
            out["reasoning"] = skills.reasoning_output(simple.reasoning_chunks(trace, self.model), self.model.tokenizer)
        out["answer"] = self._text(handle, stream, stats)
        return out

    def _locate(self, skill: str, image, obj: str, settings, spatial_refs=None, stats=None) -> list:
        s = self._settings(settings)
        prompt = skills.object_prompt(self.model.tokenizer, skill, obj, spatial_refs)
        return self._wait(self._submit(skill, image, prompt, s), stats).objects

    def detect(
        self, image: ImageInput | EncodedImage, object: str, settings: dict[str, Any] | None = None, stats: dict | None = None
    ) -> dict[str, Any]:
        objs = self._locate("detect", image, object, settings, stats=stats)
        return {"objects": [skills.region_output(o.x, o.y, *o.size) for o in objs]}

    def point(
        self,
        image: ImageInput | EncodedImage,
        object: str,
        settings: dict[str, Any] | None = None,
        spatial_refs: Any = None,
        stats: dict | None = None,
    ) -> dict[str, Any]:
        objs = self._locate("point", image, object, settings, spatial_refs, stats)
        return {"points": [{"x": o.x, "y": o.y} for o in objs]}

    def detect_gaze(
        self, image: ImageInput | EncodedImage, eye: tuple[float, float], settings: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Where the person whose eye is at `eye` is looking, Photon style: point(image, "gaze", [eye]).
        Unstable: the reference's own gaze prompt is stale for these weights (spec D6)."""
        points = self.point(image, "gaze", {**(settings or {}), "max_objects": 1}, spatial_refs=[list(eye)])["points"]
        return {"gaze": points[0] if points else None}


class CancelScope:
    """A set of in-flight requests that can be cancelled together, from another thread."""

    def __init__(self):
        self._handles: list[Handle] = []
        self._lock = threading.Lock()
        self.cancelled = False

    def add(self, handle: Handle) -> None:
        with self._lock:
            self._handles.append(handle)
            if self.cancelled:
                handle.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            for handle in self._handles:
                handle.cancel()


def _kv_key(image: EncodedImage) -> str:
    return "kv:" + hashlib.blake2b(image.kv[0][0].float().cpu().numpy().tobytes(), digest_size=16).hexdigest()


def image_key(crops: Crops) -> str:
    """Content hash of the tiled image: equal pixels share one cached prefix. SHA-256 because CPUs hash it
    in hardware (about twice blake2b's speed; a 13-crop image is 5.6 MB)."""
    h = hashlib.sha256(repr((crops.pixels.shape, crops.tiling)).encode())
    h.update(np.ascontiguousarray(crops.pixels).data)
    return h.hexdigest()[:32]


def _record(stats: dict | None, result: Result) -> None:
    if stats is not None:
        stats.update(result.stats | ({"stop_reason": result.run.stop_reason} if result.run else {}))


def _stream(ids: Iterator[int], stream: TextStream, handle: Handle, stats: dict | None) -> Iterator[str]:
    try:
        for t in ids:
            piece = stream.push(t)
            if piece:
                yield piece
        _record(stats, handle.result())  # raises if the request failed
        tail = stream.flush()
        if tail:
            yield tail
    finally:
        if not handle.done:  # the consumer stopped reading: free the sequence
            handle.cancel()
