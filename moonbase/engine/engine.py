"""The engine: continuous batching of every skill over one model.

engine = Engine(model)
handle = engine.submit(request)        # from any thread
for token_id in handle.tokens(): ...   # streamed answer tokens
result = handle.result()               # TextRun / objects, plus stats

A background thread steps while there is work (or call `step()` yourself, as the tests do). Each step
the scheduler plans, the runner executes, and finished sequences hand their results to their handles.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..device import release_cpu_threads
from ..errors import ConfigError
from ..model.moondream import Moondream
from ..model.quant import int8_text
from ..skills import Request
from .adapters import AdapterStore
from .graphs import ForwardGraphs
from .handle import CancelledError, Handle, Result
from .kv import KVPool, PrefixCache
from .runner import HeadOut, Runner
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, Status

log = logging.getLogger(__name__)

IDLE_S = 0.05  # the background thread gives its CPU threads back after this long without work


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # sequences running at once
    max_step_tokens: int = 4096  # prefill tokens (image prefixes and prompts) admitted per step
    block_size: int = 16  # positions per KV block
    kv_memory_mb: float | None = None  # the paged pool, shared by image prefixes and sequences; None: auto
    prefix_cache_mb: float | None = None  # most KV memory idle cached image prefixes may keep; None: all the pool
    int8_decode: bool = False  # CPU only: single-token steps through int8 linear layers (faster, approximate)
    pipeline: bool | None = None  # launch step t+1 before committing step t; None: on CUDA only
    cuda_graphs: bool = True  # CUDA: replay captured graphs of the text forwards (ignored on CPU)

    def __post_init__(self) -> None:
        for name, v in dataclasses.asdict(self).items():
            count = name in ("max_batch", "max_step_tokens", "block_size")
            size = name.endswith("_mb") and v is not None and not (isinstance(v, (int, float)) and 0 < v < math.inf)
            if size or (count and (type(v) is not int or v < 1)):
                raise ConfigError(f"{name} must be a positive {'integer' if count else 'number of MiB'}, got {v!r}")

    def block_bytes(self, m: Moondream) -> int:
        t = m.cfg.text
        return 2 * t.n_layers * t.n_kv_heads * t.hd * torch.finfo(m.dtype).bits // 8 * self.block_size

    def n_blocks(self, m: Moondream) -> int:
        """kv_memory_mb, or automatically enough for every sequence of a full batch at the longest context and
        as many cached image prefixes again, capped at 40% of free GPU memory or 15% of the machine's RAM."""
        per_block = self.block_bytes(m)
        if self.kv_memory_mb is not None:
            return max(1, int(self.kv_memory_mb * 2**20) // per_block)
        wanted = per_block // self.block_size * 2 * self.max_batch * m.cfg.text.max_context
        if m.device.type == "cuda":
            cap = 0.4 * torch.cuda.mem_get_info(m.device)[0]
        else:
            cap = 0.15 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return max(1, int(min(wanted, cap)) // per_block)


class Engine:
    def __init__(self, m: Moondream, cfg: EngineConfig = EngineConfig(), background: bool = True):
        self.m, self.cfg, self.background = m, cfg, background
        self.pool = KVPool(m.cfg.text, cfg.n_blocks(m), cfg.block_size, m.device, m.dtype)
        budget = None if cfg.prefix_cache_mb is None else int(cfg.prefix_cache_mb * 2**20) // cfg.block_bytes(m)
        self.cache = PrefixCache(self.pool, budget)
        self.scheduler = Scheduler(SchedulerConfig(cfg.max_batch, cfg.max_step_tokens), self.pool, self.cache, m.cfg.prefix_len)
        if cfg.int8_decode and m.device.type != "cpu":
            raise ValueError("int8_decode is a CPU option; on CUDA the engine runs bf16")
        decode_w = int8_text(m.w.text) if cfg.int8_decode else None
        graphs = ForwardGraphs(m, self.pool, cfg.max_batch) if cfg.cuda_graphs and m.device.type == "cuda" else None
        self.runner = Runner(m, self.pool, decode_w, graphs, chunk=cfg.max_step_tokens)
        self.adapters = AdapterStore(m.cfg.text, m.device, m.dtype)
        self._inbox: queue.SimpleQueue[tuple[Sequence, Handle]] = queue.SimpleQueue()
        self._handles: dict[int, Handle] = {}
        self._next_id = 0
        self._lock = threading.Lock()  # one step at a time
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._closed = False
        self.pipeline = cfg.pipeline if cfg.pipeline is not None else m.device.type == "cuda"
        self._inflight: HeadOut | None = None  # the heads of the last pipelined step, not yet committed
        self.steps = 0

    def submit(self, req: Request) -> Handle:
        if self._closed:
            raise RuntimeError("engine closed")
        with self._lock:
            self._next_id += 1
            seq = Sequence(self._next_id, req, self.m.cfg.tokenizer, self.m.device)
        handle = Handle(self, seq)
        if self.background:
            release_cpu_threads()  # this thread's compute is the engine thread's now
        self._inbox.put((seq, handle))
        self.wake()
        return handle

    def close(self) -> None:
        """Stop the background thread (after the step in progress); requests still in flight fail."""
        self._closed = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
        self._fail_all(RuntimeError("engine closed"))

    def step(self) -> bool:
        """One scheduling step; False when there was nothing to do."""
        with self._lock:
            self._drain_inbox()
            plan = self.scheduler.schedule(preempt=self._inflight is None)
            if plan.stalled:  # room only by preemption, and preempted sequences replay committed inputs only
                self._commit_inflight()
                finished, plan = plan.finished, self.scheduler.schedule()
                plan.finished += finished
            if not plan and self._inflight is None:
                return False
            try:
                if self.pipeline:
                    self._pipelined(plan)
                else:
                    self.runner.run(plan)
                    self._settle(plan.prefills + plan.decodes)
            except Exception as e:  # a failed forward fails the sequences in it, not the engine
                failed = plan.prefills + plan.decodes + (self._inflight.rows if self._inflight else [])
                self._inflight = None
                for seq in failed:
                    seq.error = e
                self._settle(failed)
            self.steps += 1
            for seq in plan.finished:
                self._complete(seq, time.perf_counter())
            return True

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_free": self.pool.n_free,
            "kv_blocks": self.pool.n_blocks,
            "kv_blocks_cached": sum(map(len, self.cache.entries.values())),
            "prefix_cache_entries": len(self.cache.entries),
            "prefix_cache_hits": self.cache.hits,
            "prefix_cache_evictions": self.cache.evictions,
            "preemptions": self.scheduler.preemptions,
            "in_flight": len(self._handles),
            "steps": self.steps,
            "config": self.effective_config,
        }

    @property
    def effective_config(self) -> dict[str, Any]:
        """The knobs as they took effect (automatic choices resolved)."""
        mb, cache = self.cfg.block_bytes(self.m) / 2**20, self.cache.budget_blocks
        return dataclasses.asdict(self.cfg) | {
            "kv_memory_mb": round(self.pool.n_blocks * mb, 3),
            "prefix_cache_mb": None if cache is None else round(cache * mb, 3),
            "pipeline": self.pipeline,
            "cuda_graphs": self.runner.graphs is not None,
        }

    def wake(self) -> None:
        """Start or wake the background thread (a request arrived or was cancelled)."""
        if not self.background:
            return
        with self._thread_lock:  # threads submitting at once must not start one loop each
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="moonbase-engine", daemon=True)
                self._thread.start()
        self._wakeup.set()

    def _pipelined(self, plan) -> None:
        """Launch the decode forward of this step, then commit the previous step's heads while the device
        works; a row that finished in that commit rode along, a row whose program chose another input than
        the one embedded (rare) has its position redone next step."""
        runner = self.runner
        if plan.prefixes:
            runner.build_prefixes(plan.prefixes)
        hidden = runner.forward(plan.decodes, runner.decode_w) if plan.decodes else None
        redo = self._commit_inflight()
        for seq in redo:
            seq.length -= 1  # this step fed it the wrong input; the slot is rewritten next step
        alive = [i for i, s in enumerate(plan.decodes) if s.status is Status.RUNNING and s not in redo]
        if alive:
            self._inflight = runner.heads([plan.decodes[i] for i in alive], hidden[alive], runner.decode_w)
        if plan.prefills:  # new sequences start blocking; they join the pipeline next step
            runner.prefill(plan.prefills)
            self._settle(plan.prefills)

    def _commit_inflight(self) -> list[Sequence]:
        if self._inflight is None:
            return []
        out, self._inflight = self._inflight, None
        redo = self.runner.commit(out)
        self._settle(out.rows)
        return redo

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():  # only the step lock's holder takes from it
            seq, handle = self._inbox.get_nowait()
            self._handles[seq.id] = handle
            self.scheduler.add(seq)

    def _settle(self, rows: list[Sequence]) -> None:
        """Hand each stepped row's new tokens to its handle, and its result once its program is done."""
        now = time.perf_counter()
        for seq in rows:
            if seq.status is not Status.RUNNING or (seq.error is None and seq.prefilling):
                continue  # finished, or a long prompt still being prefilled: nothing decided yet
            if seq.stats.first_token is None:
                seq.stats.first_token = now
            seq.stats.output_tokens += 1  # every step ends in one decision: a token, a stop, a coordinate or a size
            handle = self._handles[seq.id]
            for token in seq.program.new_tokens:
                handle.emit(token)
            seq.program.new_tokens = []
            if seq.error is not None or seq.program.done:
                self.scheduler.finish(seq)
                self._complete(seq, now)
            else:
                seq.pending = [seq.program.feed]

    def _complete(self, seq: Sequence, now: float) -> None:
        seq.stats.finished = now
        handle = self._handles.pop(seq.id)
        if seq.cancelled and seq.error is None:
            seq.error = CancelledError("request cancelled")
        handle.finish(Result(seq.program.output(), seq.stats.as_dict(), seq.record) if seq.error is None else None, seq.error)

    def _loop(self) -> None:
        while not self._closed:
            if not self._wakeup.wait(timeout=IDLE_S):
                release_cpu_threads()  # other threads' compute (training steps, the single-request path) at full speed
                self._wakeup.wait()
            self._wakeup.clear()
            try:
                while not self._closed and self.step():
                    pass
            except Exception as e:  # a bug in scheduling must not leave callers waiting forever
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            self._drain_inbox()
            self._inflight = None
            now = time.perf_counter()
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                seq.error = error
                self.scheduler.finish(seq)
                self._complete(seq, now)
