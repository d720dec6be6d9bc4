"""Paged K/V storage: a pool of fixed-size blocks with reference counts, the image-prefix cache that
shares blocks between sequences about the same image, and the per-forward view the decoder writes to."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import numpy as np
import torch

from ..config import TextConfig


class KVPool:
    """Per layer, K and V of shape (slots, n_kv, head_dim); slot = block * block_size + offset.

    Two extra slots sit past the blocks: one that padding rows write to and one, never written, that
    padding keys read from, so no forward can touch a live block it does not own."""

    def __init__(self, cfg: TextConfig, n_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        if n_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one slot")
        self.n_blocks, self.block_size = n_blocks, block_size
        n = n_blocks * block_size
        self.scratch_slot, self.zero_slot = n, n + 1
        shape = (n + 2, cfg.n_kv_heads, cfg.hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self._offsets = np.arange(block_size, dtype=np.int64)
        self.refs = [0] * n_blocks
        self.free = list(range(n_blocks - 1, -1, -1))  # a stack: low block ids first

    @property
    def n_free(self) -> int:
        return len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (ref count 1), or None when fewer than n are free."""
        if n > len(self.free):
            return None
        out = [self.free.pop() for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        return out

    def retain(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.refs[b] > 0, f"block {b} is not allocated"
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.refs[b] > 0, f"block {b} released twice"
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)

    def slots(self, blocks: list[int], stop: int) -> np.ndarray:
        """Slots of token positions [0, stop) in a sequence laid out over `blocks`."""
        table = np.asarray(blocks, dtype=np.int64)[: self.blocks_for(stop)]
        return (table[:, None] * self.block_size + self._offsets).ravel()[:stop]


class PrefixCache:
    """Image prefixes (BOS + image tokens) prefilled into blocks that any sequence may share: each entry's
    blocks by key (content hash, adapter), least recently used first. The cache holds one reference to an
    entry's blocks; a sequence reading it holds another. With `budget_blocks`, idle entries beyond that many
    blocks are dropped (`trim`); otherwise they stay until the pool needs room."""

    def __init__(self, pool: KVPool, budget_blocks: int | None = None):
        self.pool, self.budget_blocks = pool, budget_blocks
        self.entries: OrderedDict[Hashable, list[int]] = OrderedDict()
        self.hits = self.evictions = 0

    def get(self, key: Hashable) -> list[int] | None:
        if key in self.entries:
            self.entries.move_to_end(key)
        return self.entries.get(key)

    def attach(self, key: Hashable) -> list[int]:
        """A sequence starts reading a cached prefix: one more reference to its blocks."""
        self.pool.retain(self.entries[key])
        return self.entries[key]

    def put(self, key: Hashable, blocks: list[int]) -> None:
        self.pool.release(self.entries.pop(key, []))
        self.entries[key] = blocks

    def evict_for(self, n_blocks: int) -> None:
        """Drop unused entries, oldest first, until `n_blocks` are free (or none is left unused)."""
        self._evict(lambda: self.pool.n_free >= n_blocks)

    def trim(self) -> None:
        """Keep idle entries within the budget."""
        if self.budget_blocks is not None:
            self._evict(lambda: sum(map(len, self.entries.values())) <= self.budget_blocks)

    def _evict(self, enough) -> None:
        for key in list(self.entries):
            if enough():
                break
            if all(self.pool.refs[b] == 1 for b in self.entries[key]):  # nobody but the cache reads it
                self.pool.release(self.entries.pop(key))
                self.evictions += 1

    def clear(self) -> None:
        for blocks in self.entries.values():
            self.pool.release(blocks)
        self.entries.clear()


class PagedBatch:
    """The decoder's KV store for one forward over B rows of T new tokens each (padded).

    write_slots (B, T): where each new token's K/V go. read_slots (B, S): every slot a row attends to, in
    position order, the new tokens' own slots included; None when the rows attend to their new tokens only
    (an image prefix being built), which are then used as computed instead of read back."""

    def __init__(self, pool: KVPool, write_slots: torch.Tensor, read_slots: torch.Tensor | None):
        self.pool, self.write, self.read = pool, write_slots.flatten(), read_slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        pk[self.write] = k.transpose(1, 2).reshape(-1, *pk.shape[1:])
        pv[self.write] = v.transpose(1, 2).reshape(-1, *pv.shape[1:])
        if self.read is None:
            return k, v
        return pk[self.read].transpose(1, 2), pv[self.read].transpose(1, 2)
