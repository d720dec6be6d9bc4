"""The single-request path: one sequence at a time, plain loops, no batching.

It is deliberately simple because it is the reference the engine is tested against. Every function works
on typed inputs (EncodedImage, Prompt, Settings) and returns token-level records as well as text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import skills
from .engine.sampler import sample
from .model.lora import Adapter
from .model.moondream import Moondream
from .model.text import EncodedImage, KVCache
from .skills import Prompt, Settings


@dataclass
class TextRun:
    """A generated token sequence; `coords` maps the index of a coord token to its decoded value."""

    ids: list[int] = field(default_factory=list)
    coords: dict[int, float] = field(default_factory=dict)
    stop_reason: str = ""


@dataclass(frozen=True)
class RegionObject:
    x: float
    y: float
    size: tuple[float, float] | None = None  # detect only


class SingleSequence:
    """One sequence's cache, last hidden state and logits, and its sampling state."""

    def __init__(self, m: Moondream, image: EncodedImage | None, settings: Settings, adapter: Adapter | None = None):
        self.m, self.settings, self.adapter = m, settings, adapter
        self.cache: KVCache = m.new_cache(image)
        self.rng = None
        if settings.seed is not None:
            self.rng = torch.Generator(device=m.device).manual_seed(settings.seed)
        self.hidden: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def feed(self, x_TC: torch.Tensor) -> None:
        h = self.m.hidden(self.cache, x_TC[None], self.adapter)[0, -1]
        self.hidden, self.logits = h, self.m.logits(h)

    def prefill(self, prompt: Prompt) -> None:
        self.feed(self.m.embed_prompt(prompt.ids, prompt.coords, prompt.sizes))

    def sample(self, logits: torch.Tensor) -> int:
        s = self.settings
        t = torch.tensor([s.temperature], device=logits.device)
        p = torch.tensor([s.top_p], device=logits.device)
        return int(sample(logits[None], t, p, [self.rng])[0])

    @property
    def room(self) -> int:
        return self.m.cfg.text.max_context - self.cache.length


@torch.no_grad()
def generate_text(
    seq: SingleSequence,
    *,
    decode_mask: tuple[int, ...],
    stop: tuple[int, ...],
    decode_coords: bool = False,
    run: TextRun | None = None,
) -> Iterator[int]:
    """Sample from the current logits until a stop id, max_tokens or the context end. The first token comes
    from the prefill logits unmasked; later steps mask `decode_mask`. With `decode_coords`, a coord token
    is followed by the coordinate decoded from the hidden state that produced it, fed as its embedding."""
    m, run = seq.m, run if run is not None else TextRun()
    coord_id = m.cfg.tokenizer.coord_id
    logits = seq.logits
    while True:
        token = seq.sample(logits)
        if token in stop:
            run.stop_reason = "stop"
            return
        run.ids.append(token)
        yield token
        if len(run.ids) >= seq.settings.max_tokens:
            run.stop_reason = "max_tokens"
            return
        if seq.room <= 0:
            run.stop_reason = "context"
            return
        if decode_coords and token == coord_id:
            value = m.decode_coord(seq.hidden[None])
            run.coords[len(run.ids) - 1] = float(value[0])
            seq.feed(m.encode_coords(value))
        else:
            seq.feed(m.embed_ids([token]))
        logits = seq.logits.clone()
        logits[list(decode_mask)] = float("-inf")


@torch.no_grad()
def generate_objects(seq: SingleSequence, with_size: bool, max_objects: int) -> list[RegionObject]:
    """Greedy region loop: x, then y, then (detect) size, each fed back as an embedding; another object
    follows while the argmax over the full vocabulary is not eos."""
    m, eos = seq.m, seq.m.cfg.tokenizer.eos_id
    out: list[RegionObject] = []
    steps = 3 if with_size else 2
    while len(out) < max_objects and int(seq.logits.argmax()) != eos and seq.room >= steps:
        x = m.decode_coord(seq.hidden[None])
        seq.feed(m.encode_coords(x))
        y = m.decode_coord(seq.hidden[None])
        seq.feed(m.encode_coords(y))
        size = None
        if with_size:
            wh = m.decode_size(seq.hidden[None])
            seq.feed(m.encode_sizes(wh))
            size = (float(wh[0, 0]), float(wh[0, 1]))
        out.append(RegionObject(float(x[0]), float(y[0]), size))
    return out


# --- skills ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _start(
    m: Moondream, image: EncodedImage | None, prompt: Prompt, settings: Settings, adapter: Adapter | None
) -> SingleSequence:
    seq = SingleSequence(m, image, settings, adapter)
    if image is None:  # text only: BOS then the prompt, causal from position 0
        prompt = Prompt((m.cfg.tokenizer.bos_id,)) + prompt
    if len(prompt.ids) >= seq.room:
        raise skills.SettingsError(f"prompt of {len(prompt.ids)} tokens does not fit the context ({seq.room} left)")
    seq.prefill(prompt)
    return seq


@torch.no_grad()
def caption(
    m: Moondream, image: EncodedImage, length: str, settings: Settings, run: TextRun | None = None, adapter: Adapter | None = None
) -> Iterator[int]:
    tok = m.cfg.tokenizer
    seq = _start(m, image, skills.caption_prompt(tok, length), settings, adapter)
    return generate_text(seq, decode_mask=(tok.answer_id,), stop=(tok.eos_id,), run=run)


@torch.no_grad()
def query(
    m: Moondream,
    image: EncodedImage | None,
    question: str,
    settings: Settings,
    spatial_refs=None,
    reasoning: bool = False,
    run: TextRun | None = None,
    reasoning_run: TextRun | None = None,
    adapter: Adapter | None = None,
) -> Iterator[int]:
    """Answer token ids; with `reasoning`, the trace is generated first, into `reasoning_run`."""
    tok = m.cfg.tokenizer
    if spatial_refs and image is None:
        raise skills.SettingsError("spatial_refs need an image")
    seq = _start(m, image, skills.query_prompt(m.tokenizer, question, spatial_refs, reasoning), settings, adapter)
    if reasoning:
        trace = reasoning_run if reasoning_run is not None else TextRun()
        for _ in generate_text(seq, decode_mask=(tok.eos_id, tok.size_id), stop=(tok.answer_id,), decode_coords=True, run=trace):
            pass
        if seq.room <= 1:
            raise skills.SettingsError("the reasoning trace filled the context; lower max_tokens")
        seq.prefill(Prompt((tok.answer_id,)))
    return generate_text(seq, decode_mask=(tok.answer_id,), stop=(tok.eos_id,), run=run)


def reasoning_chunks(run: TextRun, m: Moondream) -> list[tuple[list[int], list[float]]]:
    """Split a reasoning trace into (ids, coordinates) chunks; grounding ids open a new chunk."""
    tok = m.cfg.tokenizer
    chunks: list[tuple[list[int], list[float]]] = [([], [])]
    for i, t in enumerate(run.ids):
        if t in (tok.start_ground_points_id, tok.end_ground_id):
            chunks.append(([], []))
        chunks[-1][0].append(t)
        if i in run.coords:
            chunks[-1][1].append(run.coords[i])
    return chunks


@torch.no_grad()
def locate(
    m: Moondream, image: EncodedImage, task: str, obj: str, settings: Settings, spatial_refs=None, adapter: Adapter | None = None
) -> list[RegionObject]:
    """detect (boxes) or point; always greedy, like the reference."""
    greedy = Settings(0.0, 1.0, settings.max_tokens, settings.max_objects, None, settings.variant)
    seq = _start(m, image, skills.object_prompt(m.tokenizer, task, obj, spatial_refs), greedy, adapter)
    return generate_objects(seq, task == "detect", settings.max_objects)
