"""The single-request path: one sequence at a time, plain loops, no batching.

It is deliberately simple because it is the reference the engine is tested against: it shares the
skills' prompts and the model's primitives, and nothing else (its decode loops are written here,
independently of the engine's programs). Only tests, parity, bench and eval use it.

    out = simple.run(model, encoded_image, SkillRequest("caption", length="short"))   # an Output
"""

from __future__ import annotations

import torch

from .errors import SettingsError
from .model.lora import Adapter
from .model.moondream import Moondream
from .model.sampler import sample
from .model.text import EncodedImage, KVCache
from .skills import Prompt, Settings, SkillRequest, resolve_settings
from .skills.program import Output, RegionObject, StopReason, TextRun

PREFILL_CHUNK = 2048  # inputs per forward


class SingleSequence:
    """One sequence's cache, last hidden state and logits, and its sampling state."""

    def __init__(self, m: Moondream, image: EncodedImage | None, settings: Settings, adapter: Adapter | None = None):
        self.m, self.settings, self.adapter = m, settings, adapter
        self.cache: KVCache = m.new_cache(image)
        self.rng = None if settings.seed is None else torch.Generator(device=m.device).manual_seed(settings.seed)
        self.hidden: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def feed(self, x_TC: torch.Tensor) -> None:
        for part in x_TC.split(PREFILL_CHUNK):  # a long prompt never builds a mask larger than a chunk x its context
            h = self.m.hidden(self.cache, part[None], self.adapter)[0, -1]
        self.hidden, self.logits = h, self.m.logits(h)

    def prefill(self, prompt: Prompt) -> None:
        self.feed(self.m.embed_prompt(prompt.ids, prompt.coords, prompt.sizes))

    def sample(self, logits: torch.Tensor) -> int:
        t, p = torch.tensor([[self.settings.temperature], [self.settings.top_p]], device=logits.device)
        return int(sample(logits[None], t, p, [self.rng])[0])

    @property
    def room(self) -> int:
        return self.m.cfg.text.max_context - self.cache.length


@torch.no_grad()
def generate_text(
    seq: SingleSequence,
    mask: tuple[int, ...],
    stop: tuple[int, ...],
    decode_coords: bool = False,
    decode_sizes: bool = False,
    opening: tuple[tuple[int, ...], ...] = (),
) -> TextRun:
    """Sample from the current logits until a stop id, max_tokens or the context end. The first token comes
    from the prefill logits unmasked; later steps mask the ids in `mask`. With `decode_coords`, a coord token
    is followed by the coordinate decoded from the hidden state that produced it, fed as its embedding; with
    `decode_sizes`, a size token by the size. `opening[j]`: the only ids step j may choose among."""
    m, run = seq.m, TextRun()
    while run.stop_reason is None:
        logits = seq.logits.clone()
        if run.ids:
            logits[list(mask)] = float("-inf")
        if len(run.ids) < len(opening):
            keep = list(opening[len(run.ids)])
            logits[[i for i in range(len(logits)) if i not in keep]] = float("-inf")
        token = seq.sample(logits)
        if token in stop:
            run.stop_reason = StopReason.STOP
            break
        run.ids.append(token)
        if len(run.ids) >= seq.settings.max_tokens:
            run.stop_reason = StopReason.MAX_TOKENS
        elif seq.room <= 0:
            run.stop_reason = StopReason.CONTEXT
        elif decode_coords and token == m.cfg.tokenizer.coord_id:
            value = m.decode_coord(seq.hidden[None])
            run.coords[len(run.ids) - 1] = float(value[0])
            seq.feed(m.encode_coords(value))
        elif decode_sizes and token == m.cfg.tokenizer.size_id:
            wh = m.decode_size(seq.hidden[None])
            run.sizes[len(run.ids) - 1] = (float(wh[0, 0]), float(wh[0, 1]))
            seq.feed(m.encode_sizes(wh))
        else:
            seq.feed(m.embed_ids([token]))
    return run


@torch.no_grad()
def generate_objects(seq: SingleSequence, with_size: bool) -> Output:
    """Greedy region loop: x, then y, then (boxes) size, each fed back as an embedding; another object
    follows while the argmax over the full vocabulary is not eos (Moondream 3, after the first object: while
    the coord logit is not below the eos logit), up to max_objects."""
    m, tok, max_objects = seq.m, seq.m.cfg.tokenizer, seq.settings.max_objects
    out: list[RegionObject] = []
    steps = 3 if with_size else 2

    def another() -> bool:
        if out and tok.restricted_object_decisions:
            return bool(seq.logits[tok.coord_id] >= seq.logits[tok.eos_id])
        return int(seq.logits.argmax()) != tok.eos_id

    while len(out) < max_objects and another() and seq.room >= steps:
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
    stop = StopReason.MAX_OBJECTS if len(out) >= max_objects else StopReason.STOP if seq.room >= steps else StopReason.CONTEXT
    return Output(stop, objects=out)


@torch.no_grad()
def run(m: Moondream, image: EncodedImage | None, req: SkillRequest, adapter: Adapter | None = None) -> Output:
    """One request from start to end: prefill the skill's prompt after the image prefix (or BOS alone),
    then the skill's reference loop."""
    req = req.with_defaults(m.cfg.defaults)
    seq = SingleSequence(m, image, resolve_settings(req.settings_dict, m.cfg.defaults), adapter)
    if req.spatial_refs and image is None:
        raise SettingsError("spatial_refs need an image")
    prompt = req.skill.prompt(req, m.tokenizer)
    if image is None:  # text only: BOS then the prompt, causal from position 0
        prompt = Prompt((m.cfg.tokenizer.bos_id,)) + prompt
    if len(prompt.ids) >= seq.room:
        raise SettingsError(f"prompt of {len(prompt.ids)} tokens does not fit the context ({seq.room} left)")
    seq.prefill(prompt)
    return _REFERENCE[req.skill.name](seq, req)


def _text(seq: SingleSequence, reasoning: bool) -> Output:
    """Caption and query: with reasoning, the trace first (stopped by the answer token, which is then prefilled)."""
    tok, trace = seq.m.cfg.tokenizer, None
    if reasoning:
        trace = generate_text(seq, (tok.eos_id, tok.size_id), (tok.answer_id,), decode_coords=True)
        if seq.room <= 1:
            raise SettingsError("the reasoning trace filled the context; lower max_tokens")
        seq.prefill(Prompt((tok.answer_id,)))
    text = generate_text(seq, (tok.answer_id,), (tok.eos_id,))
    return Output(text.stop_reason, text=text, trace=trace)


_REFERENCE = {  # detect (boxes) and point are greedy whatever the settings, like the reference
    "caption": lambda seq, req: _text(seq, False),
    "query": lambda seq, req: _text(seq, req.reasoning),
    "detect": lambda seq, req: generate_objects(seq, True),
    "point": lambda seq, req: generate_objects(seq, False),
    "segment": lambda seq, req: _segment(seq, req),
}


def _segment(seq: SingleSequence, req: SkillRequest) -> Output:
    """The bbox first (an object or eos, then coord, then size), then the path: a coord token becomes a
    coordinate, a size token a size, anything else is path text."""
    tok = seq.m.cfg.tokenizer
    opening = ((tok.coord_id, tok.eos_id), (tok.coord_id,), (tok.size_id,))
    run = generate_text(seq, (), (tok.eos_id,), decode_coords=True, decode_sizes=True, opening=opening)
    return Output(run.stop_reason, text=run, subject=req.object)
