"""The runner executes a step plan on the model: it owns every tensor. One step = new image prefixes
(all their crops through the vision encoder in one forward, then one bidirectional prefill), one text
forward over every prefilling and decoding sequence (padded, attending through the paged pool), then
the heads each sequence's program asks for, batched: LM logits and sampling, coordinate and size
decoders, and the decoded values fed back on the next step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import text
from ..model.lora import Adapter, LoraBatch
from ..model.moondream import Moondream
from ..model.text import EncodedImage
from .kv import KVPool, PagedBatch
from .rollout import RolloutHeads, embed_images, rollout_heads
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
        """A blocking step: every forward, its heads and their commit."""
        if plan.prefixes:
            self.build_prefixes(plan.prefixes)
        for rows, w in self.groups(plan):
            self.commit(self.heads(rows, self.forward(rows, w), w))

    def groups(self, plan: StepPlan) -> list[tuple[list[Sequence], torch.nn.Module]]:
        """Prompts and single inputs run as separate forwards: no decode row is padded to a prompt."""
        return [(rows, w) for rows, w in ((plan.prefills, self.m.w.text), (plan.decodes, self.decode_w)) if rows]

    # --- image prefixes -----------------------------------------------------------------------------

    def build_prefixes(self, prefixes: list[NewPrefix]) -> None:
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
        embeddings = embed_images(m, [p.source for p in fresh], [p.adapter for p in fresh])  # all crops in one forward
        bos = m.w.text.wte[m.cfg.tokenizer.bos_id]
        x = torch.stack([torch.cat([bos[None], e]) for e in embeddings])
        slots = torch.tensor([pool.slots(p.blocks, 0, n) for p in fresh], device=m.device)
        pos = torch.arange(n, device=m.device)
        lora = _lora([p.adapter for p in fresh], m.device)
        text.decoder(x, m.w.text, m.cfg.text, m.rope, pos, None, PagedBatch(pool, slots, slots), lora=lora)

    # --- text ---------------------------------------------------------------------------------------

    def forward(self, rows: list[Sequence], w: torch.nn.Module) -> torch.Tensor:
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
            x[i, :t] = seq.next_emb[None] if seq.next_emb is not None else self._embed(seq.pending)
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

    def heads(self, rows: list[Sequence], hidden: torch.Tensor, w: torch.nn.Module) -> HeadOut:
        """Every head the rows' programs may need, on the device and without waiting for it: sampled tokens
        for LM rows; coordinates for coordinate rows and for LM rows that may go on with one (detect/point
        "another object" → x, a coord token in a reasoning trace); sizes; and the embedding each row will
        be fed next if it goes on. The programs see the values only in `commit`."""
        m, dev = self.m, self.m.device
        b = len(rows)
        heads = [s.program.head() for s in rows]
        lm = [i for i, h in enumerate(heads) if h is Head.LM]
        follow = [rows[i].program.coord_after_token() for i in range(b)]
        coord_rows = [i for i in range(b) if heads[i] is Head.COORD or (heads[i] is Head.LM and follow[i] is not None)]
        size_rows = [i for i, h in enumerate(heads) if h is Head.SIZE]
        tokens = torch.zeros(b, dtype=torch.long, device=dev)
        extra = rollout_heads(m, rows)  # None unless a row records a rollout or has its own region head
        if lm:
            logits = text.lm_logits(hidden[lm], w).float()
            for j, i in enumerate(lm):
                masked = rows[i].program.mask()
                if masked:
                    logits[j, list(masked)] = float("-inf")
            if extra is not None:
                extra.restrict(lm, logits)
            temps = [rows[i].temperature for i in lm]
            tokens[lm] = sample(
                logits,
                torch.tensor(temps, device=dev),
                torch.tensor([rows[i].top_p for i in lm], device=dev),
                [rows[i].rng for i in lm],
                any_hot=any(t > 0 for t in temps),
            )
            if extra is not None:
                extra.tokens(lm, logits, tokens[lm])
        next_emb = m.w.text.wte[tokens]
        coords = torch.zeros(b, device=dev, dtype=m.dtype)
        if coord_rows:
            decoded = extra.coords(coord_rows, hidden) if extra is not None else m.decode_coord(hidden[coord_rows])
            coords[coord_rows] = decoded.to(m.dtype)
            use = torch.zeros(b, dtype=torch.bool, device=dev)
            use[[i for i in coord_rows if heads[i] is Head.COORD or follow[i] == "always"]] = True
            on_token = [i for i in coord_rows if follow[i] == "on_coord_token"]
            if on_token:
                use[on_token] = tokens[on_token] == m.cfg.tokenizer.coord_id
            next_emb = torch.where(use[:, None], m.encode_coords(coords), next_emb)
        sizes = torch.zeros(b, 2, device=dev, dtype=m.dtype)
        if size_rows:
            decoded = extra.sizes(size_rows, hidden) if extra is not None else m.decode_size(hidden[size_rows])
            sizes[size_rows] = decoded.to(m.dtype)
            next_emb[size_rows] = m.encode_sizes(sizes[size_rows])
        rooms = [m.cfg.text.max_context - s.length for s in rows]
        for i, seq in enumerate(rows):  # what a pipelined step feeds before the programs have decided
            seq.next_emb = next_emb[i]
        return HeadOut(rows, heads, follow, rooms, tokens, coords, sizes, next_emb, extra)

    def commit(self, out: HeadOut) -> list[Sequence]:
        """Hand the head values to the programs (this is where the host waits for the device). Returns the
        sequences whose program chose an input other than the one `heads` embedded (a reasoning trace cut
        by max_tokens goes on with the answer token): they are fed from their `pending` input instead."""
        tokens, coords, sizes = out.tokens.tolist(), out.coords.tolist(), out.sizes.tolist()
        coord_id, mispredicted = self.m.cfg.tokenizer.coord_id, []
        for i, seq in enumerate(out.rows):
            if seq.finished or seq.cancelled:
                continue  # it rode along in a step launched before it finished
            program, head = seq.program, out.heads[i]
            then = None
            try:
                if head is Head.LM:
                    if (then := program.on_token(tokens[i], out.rooms[i])) is Head.COORD:
                        program.on_region(coords[i])
                else:
                    program.on_region(coords[i] if head is Head.COORD else sizes[i])
            except Exception as e:  # a request-level failure (e.g. the context filled up): fail that one
                seq.error = e
                continue
            if out.extra is not None:
                out.extra.commit(i, seq, head, then)
            if program.feed is None:
                continue
            seq.history.append(program.feed)
            if head is Head.SIZE:
                embedded = Feed(size=(sizes[i][0], sizes[i][1]))
            elif head is Head.COORD or out.follow[i] == "always" or (out.follow[i] and tokens[i] == coord_id):
                embedded = Feed(coord=coords[i])
            else:
                embedded = Feed(token=tokens[i])
            seq.next_emb = out.next_emb[i] if embedded == program.feed else None
            if seq.next_emb is None:
                mispredicted.append(seq)
        return mispredicted


@dataclass
class HeadOut:
    """One forward's head values for its rows, still on the device until `commit`."""

    rows: list[Sequence]
    heads: list[Head]
    follow: list[str | None]  # each LM row's `coord_after_token` when the heads ran
    rooms: list[int]  # context left when the heads ran (a later forward may already have grown it)
    tokens: torch.Tensor
    coords: torch.Tensor
    sizes: torch.Tensor
    next_emb: torch.Tensor
    extra: RolloutHeads | None = None  # rollout log-probabilities and bins (engine/rollout.py)


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
