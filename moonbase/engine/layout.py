"""Where each row of a forward writes and reads in the paged pool, packed as one int64 array that reaches
the device in a single copy; positions and the prefix-LM mask are derived from it on the device.

Rows are padded to `b` rows of `t` queries and `s` keys. Padding queries write to the pool's scratch slot
and attend to one never-written key (the zero slot), so a padded forward touches no live block."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .kv import KVPool
from .sequence import Sequence


class Row(NamedTuple):
    """One row of a forward: the slots of its positions [0, start + n), and n new inputs from `start`."""

    slots: np.ndarray
    start: int
    n: int
    prefix_len: int  # leading positions that attend to each other bidirectionally


def sequence_rows(pool: KVPool, rows: list[Sequence], lengths: list[int]) -> list[Row]:
    out = []
    for seq, n in zip(rows, lengths, strict=True):
        own = pool.slots(seq.blocks, seq.length + n - seq.prefix_len)
        slots = np.concatenate([pool.slots(seq.prefix_blocks, seq.prefix_len), own]) if seq.prefix_len else own
        out.append(Row(slots, seq.length, n, seq.prefix_len))
    return out


def prefix_rows(pool: KVPool, blocks: list[list[int]], n: int) -> list[Row]:
    """Image prefixes being prefilled: n positions that all see each other."""
    return [Row(pool.slots(b, n), 0, n, n) for b in blocks]


def pack(pool: KVPool, rows: list[Row], b: int, t: int, s: int) -> np.ndarray:
    """write (b*t) | read (b*s) | query positions (b*t) | prefix length (b) | real queries (b)."""
    write = np.full((b, t), pool.scratch_slot, dtype=np.int64)
    read = np.full((b, s), pool.zero_slot, dtype=np.int64)
    q_pos = np.zeros((b, t), dtype=np.int64)
    prefix, n_q = np.zeros((2, b), dtype=np.int64)
    for i, row in enumerate(rows):
        end = row.start + row.n
        read[i, :end] = row.slots
        write[i, : row.n] = row.slots[row.start : end]
        q_pos[i, : row.n] = np.arange(row.start, end)
        prefix[i], n_q[i] = row.prefix_len, row.n
    return np.concatenate([write.ravel(), read.ravel(), q_pos.ravel(), prefix, n_q])


def unpack(
    meta: torch.Tensor, b: int, t: int, s: int, masked: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """write (b, t), read (b, s), query positions (b, t) and the mask (b, t, s), True = may attend: causal,
    bidirectional inside the image prefix, and key 0 alone for padding queries. Not `masked`: every query
    sees every key (single inputs at the end of rows of one length), and the mask is None."""
    write, read, q_pos, prefix, n_q = meta.split([b * t, b * s, b * t, b, b])
    write, read, q_pos = write.view(b, t), read.view(b, s), q_pos.view(b, t)
    if not masked:
        return write, read, q_pos, None
    k = torch.arange(s, device=meta.device)
    q, p = q_pos[:, :, None], prefix[:, None, None]
    allowed = (k <= q) | ((q < p) & (k < p))
    real = torch.arange(t, device=meta.device)[None, :, None] < n_q[:, None, None]
    return write, read, q_pos, torch.where(real, allowed, k == 0)
