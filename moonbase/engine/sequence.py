"""Sequences: one prepared request in the engine, with its skill's program (`skills/program.py`), its
place in the KV pool, its sampling state, its statistics and (for rollouts) what it sampled."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..config import TokenizerConfig
from ..model.sampler import sample
from ..skills import Request
from ..skills.program import Feed


@dataclass
class RolloutRecord:
    """What a rollout sampled, for a trainer to replay: the log-probability of every sampled action in
    order (tokens, including a stop token; detect/point decisions, x and y bins, (w, h) size bins), and
    the bins of every coordinate and size fed back (reasoning-trace coordinates are greedy, so they have
    a bin but no action)."""

    logprobs: list[float] = field(default_factory=list)
    coord_bins: list[int] = field(default_factory=list)
    size_bins: list[tuple[int, int]] = field(default_factory=list)


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
        ms = lambda t: None if t is None else (t - self.submitted) * 1000  # noqa: E731
        return {
            "input_tokens": self.input_tokens,
            "image_tokens": self.image_tokens,
            "image_cached": self.image_cached,
            "output_tokens": self.output_tokens,
            "ttft_ms": ms(self.first_token),
            "total_ms": ms(self.finished),
        }


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request in the engine: its program, its place in the KV pool and its sampling state."""

    def __init__(self, seq_id: int, req: Request, tok: TokenizerConfig, device: torch.device):
        self.id, self.req = seq_id, req
        self.program = req.program()
        self.record = RolloutRecord() if req.rollout else None
        self.temperature, self.top_p = req.temperature, req.top_p
        self.rng = None if req.seed is None else torch.Generator(device=device).manual_seed(req.seed)
        self.status = Status.WAITING
        self.prefix_blocks: list[int] = []
        self.prefix_len = 0  # positions that attend bidirectionally (0 for text-only)
        self.blocks: list[int] = []  # own blocks, after the prefix
        self.length = 0  # positions with K/V in the pool
        self.history: list[Feed] = []  # inputs decided after the prompt: replayed after a preemption
        self.prompt = req.prompt.feeds(tok)
        self.pending: list[Feed] = self.prompt  # inputs for the next forward
        self.prefilling = False  # a prompt longer than a step's chunk: the rest of it is pending
        self.next_emb: torch.Tensor | None = None  # the embedding of the single input in `pending`, from the heads
        self.stats = Stats(input_tokens=len(self.prompt))
        self.error: Exception | None = None
        self.cancelled = False


def sample_rows(logits: torch.Tensor, rows: list[Sequence], temps: list[float]) -> torch.Tensor:
    """`sample` with each row's top-p and generator at `temps`; all greedy: only the argmax, nothing sent to the device."""
    hot = any(t > 0 for t in temps)
    on = logits.device if hot else "cpu"
    top_p = torch.tensor([s.top_p for s in rows], device=on)
    return sample(logits, torch.tensor(temps, device=on), top_p, [s.rng for s in rows], any_hot=hot)
