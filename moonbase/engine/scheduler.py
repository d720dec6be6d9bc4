"""The scheduling policy: which sequences run in the next step and where their K/V live. Plain Python
over block ids and counts; the runner owns every tensor.

Each step: cancelled sequences are dropped; running sequences get room for one more token (evicting idle
image prefixes, then preempting the newest sequence if the pool is full); waiting sequences are admitted
in arrival order while the batch, the step's token budget and the pool allow. A sequence about an image
that is not cached yet brings that image into the step: every new image's crops go through the vision
encoder in one forward, and sequences about the same new image share its prefix."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from ..errors import CapacityError
from .kv import KVPool, PrefixCache
from .sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 32  # sequences running at once
    max_step_tokens: int = 4096  # prefill tokens (image prefixes and prompts) admitted per step


@dataclass
class NewPrefix:
    """An image prefix to build this step: from crops (vision + prefill) or from an encoded image (copy)."""

    key: Hashable
    source: Any
    blocks: list[int]
    adapter: Any = None


@dataclass
class StepPlan:
    prefixes: list[NewPrefix] = field(default_factory=list)
    prefills: list[Sequence] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # dropped this step (cancelled)
    stalled: bool = False  # a running sequence needs a preemption: finish the step in flight first

    def __bool__(self) -> bool:
        return bool(self.prefixes or self.prefills or self.decodes or self.finished)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, pool: KVPool, cache: PrefixCache, prefix_len: int):
        self.cfg, self.pool, self.cache, self.prefix_len = cfg, pool, cache, prefix_len
        self.preemptions = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, preempt: bool = True) -> StepPlan:
        """The next step. With `preempt` False (a pipelined step is in flight, so sequences may not be
        replayed yet), a sequence that needs a preemption to go on makes the plan `stalled` instead."""
        plan = StepPlan()
        self.cache.trim()
        for seq in [s for s in (*self.running, *self.waiting) if s.cancelled]:
            self.finish(seq)
            plan.finished.append(seq)
        for seq in list(self.running):  # oldest first; the newest are preempted when the pool is full
            if seq.status is not Status.RUNNING or self._grow(seq, len(seq.pending), preempt):
                continue
            if not preempt:
                plan.stalled = True
                return plan
            seq.error = CapacityError(  # it was alone and still did not fit
                f"the KV pool ({self.pool.n_blocks} blocks of {self.pool.block_size}) cannot hold this sequence; "
                "give the engine more KV memory or lower max_tokens"
            )
            self.finish(seq)
            plan.finished.append(seq)
        for seq in self.running:  # a prompt longer than a step goes on prefilling, one chunk per step
            if seq.status is Status.RUNNING:
                (plan.prefills if seq.prefilling else plan.decodes).append(seq)
        self._admit(plan)
        if self.waiting and not self.running and not plan.prefills:  # nothing will ever free room for it
            seq = self.waiting[0]
            seq.error = CapacityError(
                f"a request of {len(seq.pending)} tokens does not fit the KV pool ({self.pool.n_blocks} blocks of "
                f"{self.pool.block_size}) or the step budget ({self.cfg.max_step_tokens} tokens)"
            )
            self.finish(seq)
            plan.finished.append(seq)
        return plan

    def finish(self, seq: Sequence) -> None:
        self._free(seq)
        seq.status = Status.FINISHED
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)

    def _free(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks + seq.prefix_blocks)
        seq.blocks, seq.prefix_blocks, seq.length = [], [], 0

    def _take(self, n: int, protect: Sequence | None = None) -> list[int] | None:
        """n blocks: free ones, then idle prefixes evicted, then (only to let a running sequence go on,
        `protect`) the newest other running sequences preempted."""
        if n > self.pool.n_blocks:
            return None
        self.cache.evict_for(n)
        while self.pool.n_free < n and protect is not None:
            victims = [s for s in self.running if s is not protect]
            if not victims:
                return None
            self._preempt(victims[-1])
            self.cache.evict_for(n)
        return self.pool.allocate(n)

    def _preempt(self, seq: Sequence) -> None:
        """Give the sequence's blocks back; it re-enters the queue first and replays its inputs later."""
        self._free(seq)
        self.running.remove(seq)
        self.preemptions += 1
        seq.status = Status.WAITING
        seq.pending, seq.next_emb, seq.prefilling = seq.prompt + seq.history, None, False
        self.waiting.appendleft(seq)

    def _grow(self, seq: Sequence, new_tokens: int, preempt: bool = True) -> bool:
        """Own blocks enough for `new_tokens` more positions; False if the sequence had to wait."""
        extra = self.pool.blocks_for(seq.length + new_tokens - seq.prefix_len) - len(seq.blocks)
        if extra <= 0:
            return True
        got = self._take(extra, protect=seq if seq.status is Status.RUNNING and preempt else None)
        seq.blocks += got or []
        return got is not None

    def _admit(self, plan: StepPlan) -> None:
        budget = self.cfg.max_step_tokens - sum(min(len(s.pending), self.cfg.max_step_tokens) for s in plan.prefills)
        while self.waiting and len(self.running) < self.cfg.max_batch:
            seq = self.waiting[0]
            key = seq.req.prefix_key
            needs_image = key is not None and self.cache.get(key) is None  # a prefix built this step is cached already
            cost = len(seq.pending) + (self.prefix_len if needs_image else 0)
            if cost > budget and (plan.prefills or plan.prefixes):
                break  # the next step takes it
            if needs_image:
                got = self._take(self.pool.blocks_for(self.prefix_len))
                if got is None:
                    break
                plan.prefixes.append(NewPrefix(key, seq.req.image, got, seq.req.adapter))
                self.cache.put(key, got)
            if key is not None:  # a waiting sequence owns no blocks and has no positions yet
                seq.prefix_blocks = self.cache.attach(key)
                seq.prefix_len = seq.length = self.prefix_len
                self.cache.hits += not needs_image
                seq.stats.image_tokens, seq.stats.image_cached = self.prefix_len, not needs_image
            if not self._grow(seq, len(seq.pending)):
                self._free(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.prefills.append(seq)
            budget -= cost
