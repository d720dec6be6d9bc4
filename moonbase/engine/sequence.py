"""Requests and sequences. A sequence's skill program is a small state machine that decides, from the
hidden state a decode step produced, which head reads it (the LM head, the coordinate or the size
decoder) and what the next input is: a token id, a coordinate or a size, fed back as an embedding.

The programs replay the single-request path (`moonbase.simple`) decision for decision; the engine's
equivalence tests hold them to it."""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from ..config import TokenizerConfig
from ..errors import SettingsError
from ..model.lora import Adapter
from ..simple import RegionObject, TextRun
from ..skills import Prompt, Settings


@dataclass(frozen=True)
class Feed:
    """One decoder input: a token id, or a coordinate / size fed through the region encoders."""

    token: int | None = None
    coord: float | None = None
    size: tuple[float, float] | None = None


def prompt_feeds(prompt: Prompt, tok: TokenizerConfig) -> list[Feed]:
    """A prompt as inputs: coord/size placeholder ids take their values, in order."""
    coords, sizes = iter(prompt.coords), iter(prompt.sizes)
    out = []
    for t in prompt.ids:
        if t == tok.coord_id:
            out.append(Feed(coord=next(coords)))
        elif t == tok.size_id:
            out.append(Feed(size=next(sizes)))
        else:
            out.append(Feed(token=t))
    return out


class Head(Enum):
    LM = "lm"
    COORD = "coord"
    SIZE = "size"


class TextProgram:
    """Sample until a stop id, max_tokens or the context end; the first token is drawn unmasked, later
    ones with `decode_mask` applied. With `decode_coords`, a sampled coord token is followed by the
    coordinate decoded from the same hidden state, fed in the token's place."""

    def __init__(self, tok: TokenizerConfig, decode_mask, stop, max_tokens: int, decode_coords: bool = False):
        self.tok, self.decode_mask, self.stop, self.max_tokens = tok, tuple(decode_mask), tuple(stop), max_tokens
        self.decode_coords = decode_coords
        self.run = TextRun()
        self.done = False
        self.feed: Feed | None = None
        self.new_tokens: list[int] = []  # produced by the last step, for streaming

    def head(self) -> Head:
        return Head.LM

    def coord_after_token(self) -> str | None:
        """Whether a sampled token may be followed by a coordinate read from the same hidden state."""
        return "on_coord_token" if self.decode_coords else None

    def mask(self) -> tuple[int, ...]:
        return self.decode_mask if self.run.ids else ()

    def on_token(self, token: int, room: int) -> Head | None:
        """The sampled token; returns the region head that must also read this hidden state, if any."""
        self.feed, self.new_tokens = None, []
        if token in self.stop:
            self.run.stop_reason, self.done = "stop", True
            return None
        self.run.ids.append(token)
        self.new_tokens = [token]
        if len(self.run.ids) >= self.max_tokens:
            self.run.stop_reason, self.done = "max_tokens", True
        elif room <= 0:
            self.run.stop_reason, self.done = "context", True
        elif self.decode_coords and token == self.tok.coord_id:
            return Head.COORD
        else:
            self.feed = Feed(token=token)
        return None

    def on_region(self, value: float | list[float]) -> None:
        self.run.coords[len(self.run.ids) - 1] = float(value)
        self.feed = Feed(coord=float(value))


class RegionProgram:
    """detect/point, greedy: decide "another object" (argmax over the vocabulary is not eos), then x, y
    and (detect) size, each fed back."""

    def __init__(self, tok: TokenizerConfig, with_size: bool, max_objects: int):
        self.tok, self.with_size, self.max_objects = tok, with_size, max_objects
        self.objects: list[RegionObject] = []
        self.stop_reason = ""  # "stop" (eos chosen), "max_objects" or "context"
        self.state = "decide"
        self.partial: list[float] = []
        self.done = False
        self.feed: Feed | None = None
        self.new_tokens: list[int] = []

    def head(self) -> Head:
        return {"decide": Head.LM, "y": Head.COORD, "size": Head.SIZE}[self.state]

    def coord_after_token(self) -> str | None:
        return "always" if self.state == "decide" else None  # going on means reading x next

    def mask(self) -> tuple[int, ...]:
        return ()

    def on_token(self, token: int, room: int) -> Head | None:
        steps = 3 if self.with_size else 2
        self.feed = None
        full, no_room, stop = len(self.objects) >= self.max_objects, room < steps, token == self.tok.eos_id
        if full or no_room or stop:
            self.done = True
            self.stop_reason = "max_objects" if full else "context" if no_room else "stop"
            return None
        return Head.COORD

    def on_region(self, value: float | list[float]) -> None:
        if self.state == "size":
            w, h = (float(v) for v in value)
            self.objects.append(RegionObject(self.partial[0], self.partial[1], (w, h)))
            self.feed, self.state = Feed(size=(w, h)), "decide"
            return
        self.partial = [float(value)] if self.state == "decide" else [*self.partial, float(value)]
        self.feed = Feed(coord=float(value))
        if self.state == "decide":
            self.state = "y"
        elif self.with_size:
            self.state = "size"
        else:
            self.objects.append(RegionObject(self.partial[0], self.partial[1]))
            self.state = "decide"


class QueryProgram:
    """A query: optionally a reasoning trace (stops at the answer token, coordinates decoded inline),
    then the answer token is fed and the answer generated."""

    def __init__(self, tok: TokenizerConfig, max_tokens: int, reasoning: bool):
        self.tok = tok
        self.answer = TextProgram(tok, (tok.answer_id,), (tok.eos_id,), max_tokens)
        self.trace = TextProgram(tok, (tok.eos_id, tok.size_id), (tok.answer_id,), max_tokens, decode_coords=True)
        self.phase = self.trace if reasoning else self.answer
        self.feed: Feed | None = None
        self.new_tokens: list[int] = []

    @property
    def done(self) -> bool:
        return self.phase is self.answer and self.answer.done

    def head(self) -> Head:
        return Head.LM

    def coord_after_token(self) -> str | None:
        return self.phase.coord_after_token()

    def mask(self) -> tuple[int, ...]:
        return self.phase.mask()

    def on_token(self, token: int, room: int) -> Head | None:
        need = self.phase.on_token(token, room)
        self.feed = self.phase.feed
        self.new_tokens = self.phase.new_tokens if self.phase is self.answer else []
        if self.phase is self.trace and self.trace.done:
            if room <= 1:
                raise SettingsError("the reasoning trace filled the context; lower max_tokens")
            self.phase, self.feed = self.answer, Feed(token=self.tok.answer_id)
        return need

    def on_region(self, value: float | list[float]) -> None:
        self.phase.on_region(value)
        self.feed = self.phase.feed


Program = TextProgram | RegionProgram | QueryProgram


@dataclass
class Request:
    """What a caller asks for. `image` is the tiled image (`Crops`) or an already encoded prefix."""

    skill: str  # caption | query | detect | point
    prompt: Prompt
    settings: Settings
    image: Any = None  # Crops | EncodedImage | None
    image_key: Hashable | None = None
    reasoning: bool = False
    adapter: Adapter | None = None
    rollout: bool = False  # fine-tuning: detect/point sample too, and every sampled action is recorded

    @property
    def prefix_key(self) -> Hashable | None:
        """Cached image prefixes depend on the adapter too (it changes the text layers that prefill them)."""
        if self.image_key is None:
            return None
        return (self.image_key, None if self.adapter is None else self.adapter.name)


@dataclass
class RolloutRecord:
    """What a rollout sampled, for a trainer to replay: the log-probability of every sampled action in
    order (tokens, including a stop token; detect/point decisions, x and y bins, (w, h) size bins), and
    the bins of every coordinate and size fed back (reasoning-trace coordinates are greedy, so they have
    a bin but no action)."""

    logprobs: list[float] = field(default_factory=list)
    coord_bins: list[int] = field(default_factory=list)
    size_bins: list[tuple[int, int]] = field(default_factory=list)
    finish: str = ""  # detect/point: "stop" (chose to stop), "max_objects" or "context"


@dataclass
class Stats:
    input_tokens: int = 0  # prompt tokens
    image_tokens: int = 0  # the image prefix (BOS + image tokens), when there is an image
    image_cached: bool = False  # the prefix came from the cache: no vision encoder, no prefill
    output_tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        ttft = None if self.first_token is None else (self.first_token - self.submitted) * 1000
        total = None if self.finished is None else (self.finished - self.submitted) * 1000
        return {
            "input_tokens": self.input_tokens,
            "image_tokens": self.image_tokens,
            "image_cached": self.image_cached,
            "output_tokens": self.output_tokens,
            "ttft_ms": ttft,
            "total_ms": total,
        }


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def make_program(req: Request, tok: TokenizerConfig) -> Program:
    s = req.settings
    if req.skill == "caption":
        return TextProgram(tok, (tok.answer_id,), (tok.eos_id,), s.max_tokens)
    if req.skill == "query":
        return QueryProgram(tok, s.max_tokens, req.reasoning)
    if req.skill in ("detect", "point"):
        return RegionProgram(tok, req.skill == "detect", s.max_objects)
    raise ValueError(f"unknown skill {req.skill!r}")


class Sequence:
    """One request in the engine: its program, its place in the KV pool and its sampling state."""

    def __init__(self, seq_id: int, req: Request, tok: TokenizerConfig, device: torch.device):
        self.id, self.req = seq_id, req
        self.program = make_program(req, tok)
        greedy = req.skill in ("detect", "point") and not req.rollout
        self.record = RolloutRecord() if req.rollout else None
        self.temperature = 0.0 if greedy else req.settings.temperature
        self.top_p = 1.0 if greedy else req.settings.top_p
        self.rng = None
        if req.settings.seed is not None and not greedy:
            self.rng = torch.Generator(device=device).manual_seed(req.settings.seed)
        self.status = Status.WAITING
        self.prefix_blocks: list[int] = []
        self.prefix_len = 0  # positions that attend bidirectionally (0 for text-only)
        self.blocks: list[int] = []  # own blocks, after the prefix
        self.length = 0  # positions with K/V in the pool
        self.history: list[Feed] = []  # inputs decided after the prompt: replayed after a preemption
        self.prompt = prompt_feeds(req.prompt, tok)
        self.pending: list[Feed] = self.prompt  # inputs for the next forward
        self.next_emb: torch.Tensor | None = None  # the embedding of the single input in `pending`, from the heads
        self.stats = Stats(input_tokens=len(self.prompt))
        self.error: Exception | None = None
        self.cancelled = False

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
