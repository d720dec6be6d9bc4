"""The runner executes a step plan on the model: it owns every tensor. One step = new image prefixes
(all their crops through the vision encoder in one forward, then one bidirectional prefill), one text
forward over every prefilling and decoding sequence (padded, attending through the paged pool), then
the heads each sequence's program asks for, batched: LM logits and sampling, coordinate and size
decoders, and the decoded values fed back on the next step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model import text
from ..model.lora import Adapter, LoraBatch
from ..model.moondream import Moondream
from ..model.text import EncodedImage
from ..skills.program import CoordMode, Feed, Head
from . import layout
from .graphs import ForwardGraphs
from .kv import KVPool, PagedBatch
from .rollout import RolloutHeads, embed_images, rollout_heads
from .scheduler import NewPrefix, StepPlan
from .sequence import Sequence, Status, sample_rows


class Runner:
    """`decode_w`: the text weights single-token rows run with (e.g. int8 on a CPU); prompts, replays
    and image prefixes always use the model's own."""

    def __init__(
        self,
        m: Moondream,
        pool: KVPool,
        decode_w: torch.nn.Module | None = None,
        graphs: ForwardGraphs | None = None,
        chunk: int | None = None,
    ):
        """`chunk`: the most inputs of one row a forward takes (longer prompts are prefilled over several steps,
        so no forward builds a mask or attention larger than chunk x context)."""
        self.m, self.pool, self.graphs, self.chunk = m, pool, graphs, chunk
        self.decode_w = decode_w if decode_w is not None else m.w.text

    @torch.no_grad()
    def run(self, plan: StepPlan) -> None:
        """A blocking step: every forward, its heads and their commit."""
        if plan.prefixes:
            self.build_prefixes(plan.prefixes)
        if plan.prefills:  # prompts and single inputs run as separate forwards: no decode row is padded to a prompt
            self.prefill(plan.prefills)
        if plan.decodes:
            self.commit(self.heads(plan.decodes, self.forward(plan.decodes, self.decode_w), self.decode_w))

    def prefill(self, rows: list[Sequence]) -> None:
        """Prompts (a chunk of each): heads and commit for the rows whose prompt is now all in the pool."""
        hidden = self.forward(rows, self.m.w.text)
        if whole := [i for i, seq in enumerate(rows) if not seq.prefilling]:
            self.commit(self.heads([rows[i] for i in whole], hidden[whole], self.m.w.text))

    # --- image prefixes -----------------------------------------------------------------------------

    def build_prefixes(self, prefixes: list[NewPrefix]) -> None:
        m, pool, n = self.m, self.pool, self.m.cfg.prefix_len
        fresh = [p for p in prefixes if not isinstance(p.source, EncodedImage)]
        for p in prefixes:
            if isinstance(p.source, EncodedImage):  # already prefilled elsewhere: copy its K/V in
                slots = torch.from_numpy(pool.slots(p.blocks, n)).to(m.device)
                for layer, (k, v) in enumerate(p.source.kv):
                    pool.k[layer][slots] = k[0].transpose(0, 1).to(pool.k[layer].dtype)
                    pool.v[layer][slots] = v[0].transpose(0, 1).to(pool.v[layer].dtype)
        if not fresh:
            return
        embeddings = embed_images(m, [p.source for p in fresh], [p.adapter for p in fresh])  # all crops in one forward
        bos = m.w.text.wte[m.cfg.tokenizer.bos_id]
        x = torch.stack([torch.cat([bos[None], e]) for e in embeddings])
        lora = _lora([p.adapter for p in fresh], m.device)
        rows = layout.prefix_rows(pool, [p.blocks for p in fresh], n)
        if self._replay(x, rows, n, m.w.text, lora) is not None:
            return
        slots = torch.from_numpy(np.stack([r.slots for r in rows])).to(m.device)
        pos = torch.arange(n, device=m.device)
        text.decoder(x, m.w.text, m.cfg.text, m.rope, pos, None, PagedBatch(pool, slots, None), lora=lora, kv_only=True)

    def _replay(
        self, x: torch.Tensor, rows: list[layout.Row], s: int, w: torch.nn.Module, lora: LoraBatch | None
    ) -> torch.Tensor | None:
        """The forward of x (B, t, D) over `s` keys through a captured graph: (B' >= B, t' >= t, D), valid until
        the next replay; None when no graph applies (not CUDA, other weights, an adapter, beyond the buckets)."""
        if self.graphs is None or lora is not None or w is not self.m.w.text:
            return None
        graph = self.graphs.find(len(rows), x.shape[1], s)
        return None if graph is None else graph.replay(x, layout.pack(self.pool, rows, graph.b, graph.t, graph.s))

    # --- text ---------------------------------------------------------------------------------------

    def forward(self, rows: list[Sequence], w: torch.nn.Module) -> torch.Tensor:
        """Feed every row's pending inputs (at most `chunk`; the rest stays pending); returns the hidden state after
        each row's last input fed (B, D)."""
        m, dev = self.m, self.m.device
        lengths = [min(len(s.pending), self.chunk or len(s.pending)) for s in rows]
        b, t, s = len(rows), max(lengths), max(seq.length + n for seq, n in zip(rows, lengths, strict=True))
        x = self._inputs(rows, lengths, t)
        lora = _lora([seq.req.adapter for seq in rows], dev)
        placed = layout.sequence_rows(self.pool, rows, lengths)
        h = self._replay(x, placed, s, w, lora)  # rows past b are padding
        if h is None:
            meta = torch.from_numpy(layout.pack(self.pool, placed, b, t, s)).to(dev)
            masked = t > 1 or any(seq.length + 1 != s for seq in rows)
            write, read, q_pos, mask = layout.unpack(meta, b, t, s, masked)
            h = text.decoder(x, w, m.cfg.text, m.rope, q_pos, mask, PagedBatch(self.pool, write, read), lora=lora)
        for seq, n in zip(rows, lengths, strict=True):
            seq.length += n
            seq.prefilling = n < len(seq.pending)
            if seq.prefilling:  # the rest of a long prompt: next step
                seq.pending = seq.pending[n:]
        if t == 1:
            return h[:b, 0]
        return h[torch.arange(b, device=dev), torch.tensor(lengths, device=dev) - 1]

    def _inputs(self, rows: list[Sequence], lengths: list[int], t: int) -> torch.Tensor:
        """(B, t, D) input embeddings: the heads' next embedding where a row has one, else its pending feeds."""
        m = self.m
        if t == 1:
            missing = [seq.pending[0] for seq in rows if seq.next_emb is None]
            fed = iter(self._embed(missing) if missing else [])
            return torch.stack([seq.next_emb if seq.next_emb is not None else next(fed) for seq in rows])[:, None]
        x = torch.zeros(len(rows), t, m.cfg.text.dim, device=m.device, dtype=m.dtype)
        for i, (seq, n) in enumerate(zip(rows, lengths, strict=True)):
            x[i, :n] = seq.next_emb[None] if seq.next_emb is not None else self._embed(seq.pending[:n])
        return x

    def _embed(self, feeds: list[Feed]) -> torch.Tensor:
        m = self.m
        x = torch.empty(len(feeds), m.cfg.text.dim, device=m.device, dtype=m.dtype)
        for kind, encode in (("token", m.embed_ids), ("coord", m.encode_coords), ("size", m.encode_sizes)):
            at = [i for i, f in enumerate(feeds) if getattr(f, kind) is not None]
            if at:
                x[at] = encode([getattr(feeds[i], kind) for i in at])
        return x

    def heads(self, rows: list[Sequence], hidden: torch.Tensor, w: torch.nn.Module) -> HeadOut:
        """Every head the rows' programs may need, on the device and without waiting for it: sampled tokens
        for LM rows; coordinates for coordinate rows and for LM rows that may go on with one (detect/point
        "another object" → x, a coord token in a reasoning trace); sizes; and the embedding each row will
        be fed next if it goes on. The programs see the values only in `commit`."""
        m, dev, b = self.m, self.m.device, len(rows)
        heads = [s.program.head() for s in rows]
        lm = [i for i, h in enumerate(heads) if h is Head.LM]
        follow = [s.program.coord_mode() for s in rows]
        coord_rows = [i for i in range(b) if heads[i] is Head.COORD or (heads[i] is Head.LM and follow[i] is not CoordMode.NEVER)]
        size_rows = [i for i in range(b) if heads[i] is Head.SIZE or follow[i] is CoordMode.ON_REGION_TOKEN]
        tokens = torch.zeros(b, dtype=torch.long, device=dev)
        extra = rollout_heads(m, rows)  # None unless a row records a rollout or has its own region head
        if lm:
            logits = text.lm_logits(hidden[_index(lm, b)], w).float()
            for j, i in enumerate(lm):
                if masked := rows[i].program.mask():
                    logits[j, list(masked)] = float("-inf")
                if allowed := list(rows[i].program.allowed):
                    kept = logits[j, allowed]
                    logits[j] = float("-inf")
                    logits[j, allowed] = kept
            if extra is not None:
                extra.restrict(lm, logits)
            tokens[_index(lm, b)] = sample_rows(logits, [rows[i] for i in lm], [rows[i].temperature for i in lm])
            if extra is not None:
                extra.tokens(lm, logits, tokens[lm])
        next_emb = m.w.text.wte[tokens]
        coords = torch.zeros(b, device=dev, dtype=m.dtype)
        use = torch.zeros(b, dtype=torch.bool, device=dev)  # rows fed their coordinate next, not their token
        if coord_rows:
            picked = _index(coord_rows, b)
            decoded = extra.coords(coord_rows, hidden) if extra is not None else m.decode_coord(hidden[picked])
            coords[picked] = decoded.to(m.dtype)
            use[[i for i in coord_rows if heads[i] is Head.COORD or follow[i] is CoordMode.ALWAYS]] = True
            on_token = [i for i in coord_rows if follow[i] in (CoordMode.ON_COORD_TOKEN, CoordMode.ON_REGION_TOKEN)]
            if on_token:
                use[on_token] = tokens[on_token] == m.cfg.tokenizer.coord_id
            next_emb = torch.where(use[:, None], m.encode_coords(coords), next_emb)
        sizes = torch.zeros(b, 2, device=dev, dtype=m.dtype)
        use_size = torch.zeros(b, dtype=torch.bool, device=dev)  # rows fed their size next
        if size_rows:
            picked = _index(size_rows, b)
            decoded = extra.sizes(size_rows, hidden) if extra is not None else m.decode_size(hidden[picked])
            sizes[picked] = decoded.to(m.dtype)
            use_size[[i for i in size_rows if heads[i] is Head.SIZE]] = True
            if on_token := [i for i in size_rows if heads[i] is Head.LM]:
                use_size[on_token] = tokens[on_token] == m.cfg.tokenizer.size_id
            next_emb = torch.where(use_size[:, None], m.encode_sizes(sizes), next_emb)
        rooms = [m.cfg.text.max_context - s.length for s in rows]
        for i, seq in enumerate(rows):  # what a pipelined step feeds before the programs have decided
            seq.next_emb = next_emb[i]
        values = torch.cat(
            [tokens.double(), coords.double(), sizes.double().ravel(), use.double(), use_size.double()]
        )  # one copy
        return HeadOut(rows, heads, rooms, values, next_emb, extra)

    def commit(self, out: HeadOut) -> list[Sequence]:
        """Hand the head values to the programs (this is where the host waits for the device). Returns the
        sequences whose program chose an input other than the one `heads` embedded (a reasoning trace cut
        by max_tokens goes on with the answer token): they are fed from their `pending` input instead."""
        b, values = len(out.rows), out.values.tolist()
        tokens, coords, use, use_size = [int(t) for t in values[:b]], values[b : 2 * b], values[4 * b : 5 * b], values[5 * b :]
        sizes = list(zip(values[2 * b : 4 * b : 2], values[2 * b + 1 : 4 * b : 2], strict=True))
        mispredicted = []
        for i, seq in enumerate(out.rows):
            if seq.status is Status.FINISHED or seq.cancelled:
                continue  # it rode along in a step launched before it finished
            program, head = seq.program, out.heads[i]
            then = None
            try:
                if head is Head.LM:
                    if (then := program.on_token(tokens[i], out.rooms[i])) is not None:
                        program.on_region(coords[i] if then is Head.COORD else sizes[i])
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
            if use_size[i]:
                embedded = Feed(size=sizes[i])
            elif use[i]:
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
    rooms: list[int]  # context left when the heads ran (a later forward may already have grown it)
    values: torch.Tensor  # float64: B token ids, B coordinates, B (w, h) sizes, B flags "fed the coordinate", B "... size"
    next_emb: torch.Tensor
    extra: RolloutHeads | None = None  # rollout log-probabilities and bins (engine/rollout.py)


def _index(rows: list[int], b: int) -> list[int] | slice:
    """Rows of a batch as an index; a slice when it is all of them (no index tensor to copy to the device)."""
    return slice(None) if len(rows) == b else rows


def _lora(adapters: list[Adapter | None], device: torch.device) -> LoraBatch | None:
    """Rows' adapters (None = base model) as one LoraBatch; None when no row has one."""
    distinct = {id(a): a for a in adapters if a is not None}  # in order of first use
    if not distinct:
        return None
    slot = {key: j for j, key in enumerate(distinct, 1)}
    return LoraBatch(list(distinct.values()), [0 if a is None else slot[id(a)] for a in adapters], device)
