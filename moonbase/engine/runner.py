"""The runner executes a step plan on the model: it owns every tensor. One step = new image prefixes
(all their crops through the vision encoder in one forward, then one bidirectional prefill), one text
forward over every prefilling and decoding sequence (padded, attending through the paged pool), then
the heads each sequence's program asks for, batched: LM logits and sampling, coordinate and size
decoders, and the decoded values fed back on the next step."""

from __future__ import annotations

import torch

from ..model import text
from ..model.lora import Adapter, LoraBatch
from ..model.moondream import Moondream
from ..model.text import EncodedImage
from .kv import KVPool, PagedBatch
from .sampler import sample
from .scheduler import NewPrefix, StepPlan
from .sequence import Feed, Head, Sequence


class Runner:
    """`decode_weights`: the text weights single-token rows run with (e.g. int8 on a CPU); prompts, replays
    and image prefixes always use the model's own."""

    def __init__(self, m: Moondream, pool: KVPool, decode_weights: torch.nn.Module | None = None):
        self.m, self.pool = m, pool
        self.decode_w = decode_weights if decode_weights is not None else m.w.text

    @torch.no_grad()
    def run(self, plan: StepPlan) -> None:
        if plan.prefixes:
            self._build_prefixes(plan.prefixes)
        # prompts and single inputs run as separate forwards: no decode row is padded to a prompt's length
        for rows, w in ((plan.prefills, self.m.w.text), (plan.decodes, self.decode_w)):
            if rows:
                self._heads(rows, self._forward(rows, w), w)

    # --- image prefixes -----------------------------------------------------------------------------

    def _build_prefixes(self, prefixes: list[NewPrefix]) -> None:
        m, pool, n = self.m, self.pool, self.m.cfg.prefix_len
        fresh = [p for p in prefixes if not isinstance(p.source, EncodedImage)]
        for p in prefixes:
            if isinstance(p.source, EncodedImage):  # already prefilled elsewhere: copy its K/V in
                slots = torch.tensor(pool.slots(p.blocks, 0, n), device=m.device)
                for layer, (k, v) in enumerate(p.source.kv):
                    pool.k[layer][slots] = k[0].transpose(0, 1).to(pool.k[layer].dtype)
                    pool.v[layer][slots] = v[0].transpose(0, 1).to(pool.v[layer].dtype)
        if not fresh:
            return
        embeddings = m.embed_crops([p.source for p in fresh])  # every new image's crops in one forward
        bos = m.w.text.wte[m.cfg.tokenizer.bos_id]
        x = torch.stack([torch.cat([bos[None], e]) for e in embeddings])
        slots = torch.tensor([pool.slots(p.blocks, 0, n) for p in fresh], device=m.device)
        pos = torch.arange(n, device=m.device)
        lora = _lora([p.adapter for p in fresh], m.device)
        text.decoder(x, m.w.text, m.cfg.text, m.rope, pos, None, PagedBatch(pool, slots, slots), lora=lora)

    # --- text ---------------------------------------------------------------------------------------

    def _forward(self, rows: list[Sequence], w: torch.nn.Module) -> torch.Tensor:
        """Feed every row's pending inputs; returns the hidden state after each row's last input (B, D)."""
        m, pool, dev = self.m, self.pool, self.m.device
        lengths = [len(s.pending) for s in rows]
        t_max, s_max = max(lengths), max(s.length + t for s, t in zip(rows, lengths, strict=True))
        b = len(rows)
        x = torch.zeros(b, t_max, m.cfg.text.dim, device=dev, dtype=m.dtype)
        write = torch.full((b, t_max), pool.scratch_slot, dtype=torch.long)
        read = torch.full((b, s_max), pool.zero_slot, dtype=torch.long)
        q_pos = torch.zeros(b, t_max, dtype=torch.long)
        mask = torch.zeros(b, t_max, s_max, dtype=torch.bool)
        k_pos = torch.arange(s_max)
        for i, (seq, t) in enumerate(zip(rows, lengths, strict=True)):
            x[i, :t] = self._embed(seq.pending)
            start, end = seq.length, seq.length + t
            own = pool.slots(seq.blocks, start - seq.prefix_len, end - seq.prefix_len)
            write[i, :t] = torch.tensor(own)
            prefix = pool.slots(seq.prefix_blocks, 0, seq.prefix_len)
            read[i, :end] = torch.tensor(prefix + pool.slots(seq.blocks, 0, end - seq.prefix_len))
            q_pos[i, :t] = torch.arange(start, end)
            q = q_pos[i, :t, None]
            allowed = (k_pos[None] <= q) | ((q < seq.prefix_len) & (k_pos[None] < seq.prefix_len))
            mask[i, :t] = allowed & (k_pos[None] < end)
            mask[i, t:, 0] = True  # padding queries look at one key so their softmax stays finite
        store = PagedBatch(pool, write.to(dev), read.to(dev))
        lora = _lora([s.req.adapter for s in rows], dev)
        h = text.decoder(x, w, m.cfg.text, m.rope, q_pos.to(dev), mask.to(dev), store, lora=lora)
        last = torch.tensor(lengths, device=dev) - 1
        for seq, t in zip(rows, lengths, strict=True):
            seq.length += t
            if seq.feed is not None:
                seq.history.append(seq.feed)
        return h[torch.arange(b, device=dev), last]

    def _embed(self, feeds: list[Feed]) -> torch.Tensor:
        m = self.m
        x = torch.empty(len(feeds), m.cfg.text.dim, device=m.device, dtype=m.dtype)
        tokens = [i for i, f in enumerate(feeds) if f.token is not None]
        coords = [i for i, f in enumerate(feeds) if f.coord is not None]
        sizes = [i for i, f in enumerate(feeds) if f.size is not None]
        if tokens:
            x[tokens] = m.embed_ids([feeds[i].token for i in tokens])
        if coords:
            x[coords] = m.encode_coords([feeds[i].coord for i in coords])
        if sizes:
            x[sizes] = m.encode_sizes([feeds[i].size for i in sizes])
        return x

    def _heads(self, rows: list[Sequence], hidden: torch.Tensor, w: torch.nn.Module) -> None:
        m = self.m
        wants = {Head.LM: [], Head.COORD: [], Head.SIZE: []}
        for i, seq in enumerate(rows):
            wants[seq.program.head()].append(i)
        region_rows: dict[Head, list[int]] = {Head.COORD: list(wants[Head.COORD]), Head.SIZE: list(wants[Head.SIZE])}
        if wants[Head.LM]:
            idx = wants[Head.LM]
            logits = text.lm_logits(hidden[idx], w).float()
            for j, i in enumerate(idx):
                masked = rows[i].program.mask()
                if masked:
                    logits[j, list(masked)] = float("-inf")
            temps = torch.tensor([rows[i].temperature for i in idx], device=logits.device)
            top_ps = torch.tensor([rows[i].top_p for i in idx], device=logits.device)
            tokens = sample(logits, temps, top_ps, [rows[i].rng for i in idx]).tolist()
            for i, token in zip(idx, tokens, strict=True):
                seq = rows[i]
                try:
                    need = seq.program.on_token(token, m.cfg.text.max_context - seq.length)
                except Exception as e:  # a request-level failure (e.g. the context filled up): fail that one
                    seq.error = e
                    continue
                if need is not None:
                    region_rows[need].append(i)
        for head, idx in region_rows.items():
            if not idx:
                continue
            h = hidden[sorted(idx)]
            values = m.decode_coord(h) if head is Head.COORD else m.decode_size(h)
            for i, value in zip(sorted(idx), values, strict=True):
                rows[i].program.on_region(value)


def _lora(adapters: list[Adapter | None], device: torch.device) -> LoraBatch | None:
    """Rows' adapters (None = base model) as one LoraBatch; None when no row has one."""
    distinct: list[Adapter] = []
    for a in adapters:
        if a is not None and all(a is not d for d in distinct):
            distinct.append(a)
    if not distinct:
        return None
    index = [0 if a is None else 1 + next(j for j, d in enumerate(distinct) if d is a) for a in adapters]
    return LoraBatch(distinct, index, device)
