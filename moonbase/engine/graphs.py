"""CUDA graphs of the base model's text forward, one per (rows, inputs per row, keys) bucket, captured on
first use: decode steps, prompt prefills and image-prefix prefills.

A forward of Moondream 2's decoder is ~1,200 small kernels: launched one by one from Python they take
~20 ms of host time on an H100 machine, against ~2-4 ms of GPU time for a decode step. A captured graph
launches them in one call. Rows are padded up to the batch bucket, inputs up to the input bucket and keys
up to the context bucket; padding is inert (see layout.py)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..model import text
from ..model.moondream import Moondream
from . import layout
from .kv import KVPool, PagedBatch

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
INPUT_BUCKETS = (1, 16, 32, 64, 128)  # plus the image prefix length
CONTEXT_STEP = 128  # keys are padded to a multiple of this: fewer graphs, a little more attention work
MAX_TOKENS = 4096  # larger forwards (rows x inputs) run eagerly: they are GPU-bound anyway

log = logging.getLogger(__name__)
_failed: list[torch.cuda.CUDAGraph] = []  # destroying a graph whose capture failed aborts the process (PyTorch)


class Graph:
    """A captured forward over `b` rows of `t` inputs attending to `s` keys, with its static inputs."""

    def __init__(self, owner: ForwardGraphs, b: int, t: int, s: int):
        self.b, self.t, self.s = b, t, s
        m = owner.m
        self.x = torch.zeros(b, t, m.cfg.text.dim, device=m.device, dtype=m.dtype)
        self.meta = torch.from_numpy(layout.pack(owner.pool, [], b, t, s)).to(m.device)
        side = torch.cuda.Stream(m.device)
        side.wait_stream(torch.cuda.current_stream(m.device))
        with torch.cuda.stream(side):  # warm-up outside the capture: workspaces, autotuning
            for _ in range(2):
                owner.forward(self.x, self.meta, b, t, s)
        torch.cuda.current_stream(m.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=owner.mempool, capture_error_mode="thread_local"):
                self.out = owner.forward(self.x, self.meta, b, t, s)
        except Exception:
            _failed.append(self.graph)
            raise

    def replay(self, x: torch.Tensor, meta: np.ndarray) -> torch.Tensor:
        """x (n <= b, t' <= t, D) and a layout packed for (b, t, s); returns (b, t, D), valid until the
        next replay."""
        self.x[: x.shape[0], : x.shape[1]].copy_(x)
        self.meta.copy_(torch.from_numpy(meta))
        self.graph.replay()
        return self.out


class ForwardGraphs:
    def __init__(self, m: Moondream, pool: KVPool, max_batch: int):
        self.m, self.pool = m, pool
        self.batches = sorted({b for b in BATCH_BUCKETS if b < max_batch} | {max_batch})
        self.inputs = sorted({*INPUT_BUCKETS, m.cfg.prefix_len})
        self.graphs: dict[tuple[int, int, int], Graph] = {}
        self.mempool = torch.cuda.graph_pool_handle()
        self.failed = False  # a capture failed: every forward runs eagerly from then on

    def find(self, b: int, t: int, s: int) -> Graph | None:
        """The graph for `b` rows of at most `t` inputs over at most `s` keys (captured now if new); None
        when the forward is larger than any bucket."""
        rows = next((x for x in self.batches if x >= b), None)
        inputs = next((x for x in self.inputs if x >= t), None)
        if self.failed or rows is None or inputs is None or rows * inputs > MAX_TOKENS:
            return None
        key = (rows, inputs, min(-(-s // CONTEXT_STEP) * CONTEXT_STEP, self.m.cfg.text.max_context))
        if key not in self.graphs:
            try:
                with torch.no_grad():
                    self.graphs[key] = Graph(self, *key)
            except Exception:  # serve eagerly rather than fail requests; the log says why
                log.exception("capturing a CUDA graph for %s failed; text forwards run eagerly from now on", key)
                self.failed = True
                torch.cuda.synchronize(self.m.device)
                return None
        return self.graphs[key]

    def forward(self, x: torch.Tensor, meta: torch.Tensor, b: int, t: int, s: int) -> torch.Tensor:
        m = self.m
        write, read, q_pos, mask = layout.unpack(meta, b, t, s)
        return text.decoder(x, m.w.text, m.cfg.text, m.rope, q_pos, mask, PagedBatch(self.pool, write, read))
