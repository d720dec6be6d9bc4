"""The contract between a skill and the engine: a program is a small state machine that decides, from the
hidden state a decode step produced, which head reads it (the LM head, the coordinate or the size
decoder) and what the next input is: a token id, a coordinate or a size, fed back as an embedding.

Skills build programs; the engine only calls the `Program` protocol. The single-request reference path
(`moonbase.simple`) is written independently, and the engine's equivalence tests hold programs to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from ..config import TokenizerConfig


class Head(Enum):
    LM = "lm"
    COORD = "coord"
    SIZE = "size"


class CoordMode(Enum):
    """Whether a sampled LM token may be followed by a coordinate decoded from the same hidden state."""

    NEVER = "never"
    ALWAYS = "always"  # the token is a go-on / stop decision; going on reads x from the same hidden state
    ON_COORD_TOKEN = "on_coord_token"  # a sampled coord token is replaced by the coordinate it stands for
    ON_REGION_TOKEN = "on_region_token"  # the same, and a sampled size token by the size it stands for


class StopReason(Enum):
    STOP = "stop"  # the model chose to stop (a stop token, or "no more objects")
    MAX_TOKENS = "max_tokens"
    MAX_OBJECTS = "max_objects"
    CONTEXT = "context"  # the context window is full

    @property
    def finish_reason(self) -> str:
        """OpenAI / tuning-API wording: a limit cut the output ("length") or the model stopped ("stop")."""
        return "stop" if self is StopReason.STOP else "length"


@dataclass(frozen=True)
class Feed:
    """One decoder input: a token id, or a coordinate / size fed through the region encoders."""

    token: int | None = None
    coord: float | None = None
    size: tuple[float, float] | None = None


@dataclass
class TextRun:
    """A generated token sequence; `coords` / `sizes` map the index of a coord / size token to its decoded value."""

    ids: list[int] = field(default_factory=list)
    coords: dict[int, float] = field(default_factory=dict)
    sizes: dict[int, tuple[float, float]] = field(default_factory=dict)
    stop_reason: StopReason | None = None


@dataclass(frozen=True)
class RegionObject:
    x: float
    y: float
    size: tuple[float, float] | None = None  # boxes only


@dataclass
class Output:
    """What a finished program produced, for its skill to render."""

    stop_reason: StopReason
    text: TextRun | None = None  # caption, a query's answer
    trace: TextRun | None = None  # a query's reasoning
    objects: list[RegionObject] | None = None  # boxes or points
    subject: str | None = None  # what was asked for, for skills whose result names it (segment)


StreamItem = int | float | tuple[float, float]  # a token id, a decoded coordinate, a decoded (w, h) size


class Program(Protocol):
    done: bool
    feed: Feed | None  # the next input, once the program has seen this step's values
    new_tokens: list[StreamItem]  # what the last step produced, for streaming: answer tokens (segment: region values too)
    decisions: tuple[int, ...]  # ids a sampled LM step chooses among (rollouts); () = the whole vocabulary
    allowed: tuple[int, ...]  # ids this step's token may be, whoever samples it (every other id is -inf); () = any
    samples_regions: bool  # rollouts sample its coordinates and sizes (else they stay greedy)
    limited: bool  # a limit ended it before it read the last sampled token (that token was not its choice)

    def head(self) -> Head: ...
    def coord_mode(self) -> CoordMode: ...
    def mask(self) -> tuple[int, ...]: ...  # ids set to -inf before sampling this step's token
    def on_token(self, token: int, room: int) -> Head | None: ...  # the region head that reads the same state
    def on_region(self, value: float | tuple[float, float]) -> None: ...
    def output(self) -> Output: ...


class TextProgram:
    """Sample until a stop id, max_tokens or the context end; the first token is drawn unmasked, later
    ones with `decode_mask` applied. With `decode_coords`, a sampled coord token is followed by the
    coordinate decoded from the same hidden state, fed in the token's place; with `decode_sizes` too, a
    sampled size token by the size."""

    decisions: tuple[int, ...] = ()
    allowed: tuple[int, ...] = ()
    samples_regions = limited = False

    def __init__(
        self, tok: TokenizerConfig, decode_mask, stop, max_tokens: int, decode_coords: bool = False, decode_sizes: bool = False
    ):
        self.tok, self.decode_mask, self.stop, self.max_tokens = tok, tuple(decode_mask), tuple(stop), max_tokens
        self.decode_coords, self.decode_sizes = decode_coords or decode_sizes, decode_sizes
        self.run = TextRun()
        self.feed: Feed | None = None
        self.new_tokens: list[int] = []

    @property
    def done(self) -> bool:
        return self.run.stop_reason is not None

    def head(self) -> Head:
        return Head.LM

    def coord_mode(self) -> CoordMode:
        if self.decode_sizes:
            return CoordMode.ON_REGION_TOKEN
        return CoordMode.ON_COORD_TOKEN if self.decode_coords else CoordMode.NEVER

    def mask(self) -> tuple[int, ...]:
        return self.decode_mask if self.run.ids else ()

    def on_token(self, token: int, room: int) -> Head | None:
        self.feed, self.new_tokens = None, []
        if token in self.stop:
            self.run.stop_reason = StopReason.STOP
            return None
        self.run.ids.append(token)
        self.new_tokens = [token]
        if len(self.run.ids) >= self.max_tokens:
            self.run.stop_reason = StopReason.MAX_TOKENS
        elif room <= 0:
            self.run.stop_reason = StopReason.CONTEXT
        elif self.decode_coords and token == self.tok.coord_id:
            return Head.COORD
        elif self.decode_sizes and token == self.tok.size_id:
            return Head.SIZE
        else:
            self.feed = Feed(token=token)
        return None

    def on_region(self, value: float | tuple[float, float]) -> None:
        if isinstance(value, tuple):
            self.run.sizes[len(self.run.ids) - 1], self.feed = value, Feed(size=value)
        else:
            self.run.coords[len(self.run.ids) - 1], self.feed = float(value), Feed(coord=float(value))

    def output(self) -> Output:
        assert self.run.stop_reason is not None
        return Output(self.run.stop_reason, text=self.run)


class RegionProgram:
    """Objects, greedy unless sampled for a rollout: decide "another object" (the sampled token is not
    eos), then x, y and (boxes) a size, each fed back."""

    samples_regions, limited = True, False

    def __init__(self, tok: TokenizerConfig, with_size: bool, max_objects: int):
        self.tok, self.with_size, self.max_objects = tok, with_size, max_objects
        self.decisions = (tok.coord_id, tok.eos_id)
        self.objects: list[RegionObject] = []
        self.stop_reason: StopReason | None = None
        self.state = Head.LM  # the head that reads the next hidden state: decide, then x and y, then the size
        self.partial: list[Any] = []  # the object being read: x, y and (boxes) its size
        self.done = False
        self.feed: Feed | None = None
        self.new_tokens: list[int] = []

    def head(self) -> Head:
        return self.state

    def coord_mode(self) -> CoordMode:
        return CoordMode.ALWAYS if self.state is Head.LM else CoordMode.NEVER

    def mask(self) -> tuple[int, ...]:
        return ()

    @property
    def allowed(self) -> tuple[int, ...]:
        """Moondream 3 decides "another object?" after the first one by the coord and eos logits alone (D9)."""
        return self.decisions if self.tok.restricted_object_decisions and self.objects else ()

    def on_token(self, token: int, room: int) -> Head | None:
        self.feed = None
        if len(self.objects) >= self.max_objects:
            self.stop_reason = StopReason.MAX_OBJECTS
        elif room < (3 if self.with_size else 2):
            self.stop_reason = StopReason.CONTEXT
        elif token == self.tok.eos_id:
            self.stop_reason = StopReason.STOP
        else:
            return Head.COORD
        self.done, self.limited = True, self.stop_reason is not StopReason.STOP
        return None

    def on_region(self, value: float | tuple[float, float]) -> None:
        self.feed = Feed(size=value) if isinstance(value, tuple) else Feed(coord=value)
        self.partial = [value] if self.state is Head.LM else [*self.partial, value]
        if len(self.partial) == 1:
            self.state = Head.COORD
        elif len(self.partial) == 2 and self.with_size:
            self.state = Head.SIZE
        else:  # the object is complete
            self.objects.append(RegionObject(*self.partial))
            self.state = Head.LM

    def output(self) -> Output:
        assert self.stop_reason is not None
        return Output(self.stop_reason, objects=self.objects)
