"""The Python API: the same methods and result shapes as the official `moondream` client.

import moonbase
model = moonbase.vl()                       # the default model; or vl(model="path/or/hub-id")
model.caption("photo.jpg")["caption"]
model.query(image, "What is this?")["answer"]
model.detect(image, "face")["objects"]      # [{"x_min", "y_min", "x_max", "y_max"}], normalized
model.point(image, "face")["points"]        # [{"x", "y"}]

Every method is one `SkillRequest` through `run`: the skill prepares it, the engine runs it, the skill
renders the result."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from .device import release_cpu_threads
from .engine.engine import Engine, EngineConfig
from .engine.handle import Handle, Result
from .errors import RequestTimeoutError, SettingsError
from .image import ImageInput
from .model.moondream import Moondream
from .model.text import EncodedImage
from .skills import ImageLimits, Request, SkillRequest, prepare, resolve_settings
from .skills.program import StreamItem
from .tokenizer import TextStream

T = TypeVar("T")


class VL:
    """Every call becomes a request to one shared engine, so concurrent callers are batched together.
    `engine_config` sizes the engine (created on first use); `limits` bounds the images accepted and their
    crops; `timeout` (seconds) cancels a request that runs longer; with `clip` (the default) boxes and
    points are clipped to [0, 1]."""

    def __init__(
        self,
        model: Moondream,
        engine: Engine | None = None,
        engine_config: EngineConfig = EngineConfig(),
        limits: ImageLimits = ImageLimits(),
        timeout: float | None = None,
        clip: bool = True,
    ):
        self.model, self.engine_config, self.limits, self.timeout, self.clip = model, engine_config, limits, timeout, clip
        self.variant: str | None = None  # the adapter of every request that names none (`--model base/<finetune>@<step>`)
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
                    self._engine = Engine(self.model, self.engine_config)
        return self._engine

    # --- the one request path -----------------------------------------------------------------------

    def prepare(self, req: SkillRequest, rollout: bool = False) -> Request:
        if self.variant is not None and "variant" not in req.settings_dict:
            req = dataclasses.replace(req, settings=req.settings_dict | {"variant": self.variant})
        return prepare(self.model, req, self.engine.adapters.get, self.limits, rollout)

    def submit(self, request: Request) -> Handle:
        handle = self.engine.submit(request)
        if (scope := getattr(self._scopes, "current", None)) is not None:
            scope.add(handle)
        return handle

    def wait(self, handles: list[Handle], timeout: float | None = None) -> list[Result]:
        """Every handle's result; past the timeout all are cancelled (freeing their places in the engine)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.perf_counter() + timeout
        try:
            return [h.result(None if deadline is None else max(0.0, deadline - time.perf_counter())) for h in handles]
        except TimeoutError:
            for h in handles:
                h.cancel()
            raise RequestTimeoutError(f"the request did not finish within {timeout} s") from None

    def run(
        self, req: SkillRequest, stream: bool = False, stats: dict | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Any skill request, rendered as the official client returns it. With `stream`, a text skill's text
        field is an iterator of pieces, and a skill that streams events (segment) is an iterator of the client's
        stream items; `stats`, if given, is filled with token counts and timings."""
        req, tok = req.with_defaults(self.model.cfg.defaults), self.model.tokenizer
        skill = req.skill
        if stream and skill.event_stream(tok) is not None:
            return map(_client_item, self.events(req, stats, timeout))  # type: ignore[return-value]
        handle = self.submit(self.prepare(req))
        if not (stream and skill.text_key):
            result = self.wait([handle], timeout)[0]
            _record(stats, result)
            return skill.render(result.output, tok, self.clip)
        head = skill.render(self.wait([handle], timeout)[0].output, tok, self.clip) if req.reasoning else {}
        text = TextStream(tok)
        push = lambda t: [piece] if (piece := text.push(t)) else []  # noqa: E731
        tail = lambda _: [piece] if (piece := text.flush()) else []  # noqa: E731
        return head | {skill.text_key: _stream(handle, push, tail, stats, self._deadline(timeout))}

    def events(self, req: SkillRequest, stats: dict | None = None, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """A request of a skill that streams events (segment), as its typed wire events while it decodes; the
        request is validated and submitted before this returns."""
        req, tok = req.with_defaults(self.model.cfg.defaults), self.model.tokenizer
        if (events := req.skill.event_stream(tok)) is None:
            raise SettingsError(f"{req.skill.name} streams text, not events")
        handle = self.submit(self.prepare(req))
        finish = lambda result: events.finish(req.skill.render(result.output, tok, self.clip))  # noqa: E731
        return _stream(handle, events.push, finish, stats, self._deadline(timeout))

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.perf_counter() + timeout

    @contextmanager
    def cancel_scope(self, scope: CancelScope) -> Iterator[CancelScope]:
        """Requests this thread submits inside the block can be cancelled from any thread with
        `scope.cancel()` (the server does so when a client disconnects)."""
        previous, self._scopes.current = getattr(self._scopes, "current", None), scope
        try:
            yield scope
        finally:
            self._scopes.current = previous

    def video(
        self,
        source: str | int,
        tasks: list[SkillRequest],
        every: float | None = None,
        fps: float | None = None,
        keyframes: bool = False,
        settings: dict[str, Any] | None = None,
        stats: Any = None,
    ) -> Iterator[dict[str, Any]]:
        """Timeline rows `{"t", "frame", "task", "result"}` in time order: `tasks` (request templates without an
        image, e.g. `SkillRequest("detect", None, object="car")`) on frames of a video file, stream URL or webcam
        index, sampled one every `every` seconds (default 1), `fps` a second, or at every keyframe (PyAV)."""
        from .jobs.video import Sampling, run_video

        sampling = Sampling(every if every or fps or keyframes else 1.0, fps, keyframes)
        return run_video(self, source, tuple(tasks), sampling, settings, progress=False, stats=stats)

    # --- the client's methods -----------------------------------------------------------------------

    def encode_image(self, image: ImageInput | EncodedImage, settings: dict[str, Any] | None = None) -> EncodedImage:
        """Run the vision encoder and the image prefill once; pass the result to any skill to reuse it
        (with the same `variant` setting: an adapter changes the prefill)."""
        if isinstance(image, EncodedImage):
            return image
        m = self.model
        variant = resolve_settings(settings, m.cfg.defaults).variant
        adapter = None if variant is None else self.engine.adapters.get(variant)
        crops = self.limits.crops(m, image)
        with torch.no_grad():
            encoded = m.prefill_image(m.embed_crops([crops], None if adapter is None else adapter.vision)[0], adapter)
        return EncodedImage(encoded.kv, key=crops.key, variant=variant)

    def caption(
        self,
        image: ImageInput | EncodedImage,
        length: str = "normal",
        stream: bool = False,
        settings: dict[str, Any] | None = None,
        stats: dict | None = None,
    ) -> dict[str, Any]:
        return self.run(SkillRequest("caption", image, length=length, settings=settings or {}), stream, stats)

    def query(
        self,
        image: ImageInput | EncodedImage | None = None,
        question: str | None = None,
        stream: bool = False,
        settings: dict[str, Any] | None = None,
        reasoning: bool | None = None,  # None: the model's default (Moondream 3 reasons)
        spatial_refs: Any = None,
        stats: dict | None = None,
    ) -> dict[str, Any]:
        req = SkillRequest("query", image, question, reasoning=reasoning, spatial_refs=spatial_refs, settings=settings or {})
        return self.run(req, stream, stats)

    def detect(
        self, image: ImageInput | EncodedImage, object: str, settings: dict[str, Any] | None = None, stats: dict | None = None
    ) -> dict[str, Any]:
        return self.run(SkillRequest("detect", image, object=object, settings=settings or {}), stats=stats)

    def point(
        self,
        image: ImageInput | EncodedImage,
        object: str,
        settings: dict[str, Any] | None = None,
        spatial_refs: Any = None,
        stats: dict | None = None,
    ) -> dict[str, Any]:
        req = SkillRequest("point", image, object=object, spatial_refs=spatial_refs, settings=settings or {})
        return self.run(req, stats=stats)

    def segment(
        self,
        image: ImageInput | EncodedImage,
        object: str,
        spatial_refs: Any = None,
        stream: bool = False,
        settings: dict[str, Any] | None = None,
        stats: dict | None = None,
    ) -> dict[str, Any]:
        """Moondream 3: `{"path", "bbox"}`, the outline as an SVG path in image-normalized units
        (SkillNotSupportedError on a model without a segmentation head). With `stream`, the client's items:
        `{"bbox"}`, `{"chunk"}` per path command, then `{"path", "bbox", "completed": True}`."""
        req = SkillRequest("segment", image, object=object, spatial_refs=spatial_refs, settings=settings or {})
        return self.run(req, stream, stats)

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


def _record(stats: dict | None, result: Result) -> None:
    if stats is not None:
        stats.update(result.stats | {"stop_reason": result.output.stop_reason.value})


def _client_item(event: dict[str, Any]) -> dict[str, Any]:
    """A streamed event as the official client yields it: `{"bbox"}`, `{"chunk"}`, then the final result."""
    kind = event["type"]
    if kind == "path_delta":
        return {"chunk": event["chunk"]}
    return {k: v for k, v in event.items() if k != "type" and (kind == "final" or k != "completed")}


def _stream(
    handle: Handle,
    push: Callable[[StreamItem], list[T]],
    finish: Callable[[Result], list[T]],
    stats: dict | None,
    deadline: float | None,
) -> Iterator[T]:
    """What `push` makes of each item the run streams, then what `finish` makes of its result."""
    try:
        for item in handle.tokens(deadline):
            yield from push(item)
        result = handle.result()  # raises if the request failed
        _record(stats, result)
        yield from finish(result)
    finally:
        if not handle.done:  # the consumer stopped reading, or the deadline passed: free the sequence
            handle.cancel()
