"""The runner's hook for fine-tuning: heads for rows that record a rollout or whose adapter brings its own
region head, and image embeddings for adapters that bring their own vision encoder.

A rollout row (`Request.rollout`) samples every choice it makes at its temperature and records the
log-probability of each sampled action under exactly the distribution it was drawn from, so a trainer can
form the policy ratio on the same actions (finetuning.md §5.2):

* tokens: log_softmax(masked logits / T) of the drawn token (T = 1 for a greedy row);
* detect/point "another object?": a two-way choice between the coord token (go on) and eos (stop), the
  other logits masked, so continuing and stopping are the only actions;
* x and y: one of the coordinate bins; a size: one (w, h) pair of log-size bins (sum of both log-probs).

Coordinates inside a reasoning trace stay greedy, like the reference: their bins are recorded (the
trainer must feed the same values back) but they are not actions. Normal rows never come here unless an
adapter in the batch has its own region head, and then they decode greedily as before.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from ..model import region
from ..model.moondream import Moondream
from ..skills.program import Head
from .sequence import Sequence, sample_rows


def _samples_regions(seq: Sequence) -> bool:
    return seq.record is not None and seq.program.samples_regions


class RolloutHeads:
    """The extra head values of one forward's rows, on the device until `commit`."""

    def __init__(self, m: Moondream, rows: list[Sequence]):
        self.m, self.rows = m, rows
        b, dev = len(rows), m.device
        self.token_logp = torch.zeros(b, device=dev)
        self.coord_bins = torch.zeros(b, dtype=torch.long, device=dev)
        self.coord_logp = torch.zeros(b, device=dev)
        self.size_bins = torch.zeros(b, 2, dtype=torch.long, device=dev)
        self.size_logp = torch.zeros(b, device=dev)
        self._host: dict[str, list] | None = None  # the values above, read back once at commit

    def restrict(self, lm: list[int], logits: torch.Tensor) -> None:
        """Rollout rows whose program decides among a few ids (detect/point: go on with the coord token, or
        stop with eos) sample among those only."""
        for j, i in enumerate(lm):
            seq = self.rows[i]
            if seq.record is not None and seq.program.decisions:
                keep = torch.tensor(seq.program.decisions, device=logits.device)
                kept = logits[j, keep]
                logits[j] = float("-inf")
                logits[j, keep] = kept

    def tokens(self, lm: list[int], logits: torch.Tensor, drawn: torch.Tensor) -> None:
        self.token_logp[lm] = _logp(logits, drawn, [self.rows[i].temperature for i in lm])

    def coords(self, idx: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """Coordinates (len(idx),) for rows `idx`: sampled for rollout rows, argmax otherwise."""
        bins, logp = self._draw(idx, hidden, region.coord_logits)
        self.coord_bins[idx], self.coord_logp[idx] = bins, logp
        return region.coord_from_bin(bins, self.m.cfg.region)

    def sizes(self, idx: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """Sizes (len(idx), 2): a (w, h) pair of log-size bins per row."""
        bins, logp = self._draw(idx, hidden, lambda h, w: region.size_logits(h, w).flatten(0, 1), per_row=2)
        bins, logp = bins.view(-1, 2), logp.view(-1, 2).sum(-1)
        self.size_bins[idx], self.size_logp[idx] = bins, logp
        return region.size_from_bin(bins, self.m.cfg.region)

    def _draw(self, idx: list[int], hidden: torch.Tensor, head, per_row: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.rows[i] for i in idx]
        bins = torch.zeros(len(idx) * per_row, dtype=torch.long, device=hidden.device)
        logp = torch.zeros(len(idx) * per_row, device=hidden.device)
        for w, members in _by_region_weights(rows, self.m):  # one decoder call per distinct region head
            at = torch.tensor([k * per_row + r for k in members for r in range(per_row)], device=hidden.device)
            logits = head(hidden[idx][members], w).float()
            each = [rows[k] for k in members for _ in range(per_row)]
            temps = [s.temperature if _samples_regions(s) else 0.0 for s in each]
            drawn = sample_rows(logits, each, temps)
            bins[at], logp[at] = drawn, _logp(logits, drawn, temps)
        return bins, logp

    def commit(self, i: int, seq: Sequence, head: Head, then: Head | None) -> None:
        """Record what row i's program consumed: `head` read this step, `then` = a coordinate or size read from
        the same hidden state after a token (detect/point x after "go on", a coord or size token in a trace or a
        segment)."""
        rec = seq.record
        if rec is None:
            return
        if self._host is None:
            names = ("token_logp", "coord_bins", "coord_logp", "size_bins", "size_logp")
            self._host = {n: getattr(self, n).tolist() for n in names}
        v = self._host
        if head is Head.LM and not seq.program.limited:  # a token, or go on / stop by choice (not by a limit)
            rec.logprobs.append(v["token_logp"][i])
        if head is Head.COORD or then is Head.COORD:
            rec.coord_bins.append(v["coord_bins"][i])
            if _samples_regions(seq):
                rec.logprobs.append(v["coord_logp"][i])
        if head is Head.SIZE or then is Head.SIZE:  # a box's size, or a size token's value (segment)
            rec.size_bins.append(tuple(v["size_bins"][i]))
            if _samples_regions(seq):
                rec.logprobs.append(v["size_logp"][i])


def _logp(logits: torch.Tensor, drawn: torch.Tensor, temps: list[float]) -> torch.Tensor:
    """log_softmax(logits / T) of the drawn ids; T = 1 for a greedy row."""
    t = torch.tensor([x if x > 0 else 1.0 for x in temps], device=logits.device)
    return torch.log_softmax(logits / t[:, None], -1).gather(-1, drawn[:, None]).squeeze(-1)


def _by_region_weights(rows: list[Sequence], m: Moondream) -> list[tuple[torch.nn.Module, list[int]]]:
    groups: dict[int, tuple[torch.nn.Module, list[int]]] = {}
    for k, s in enumerate(rows):
        w = s.req.adapter.region if s.req.adapter is not None and s.req.adapter.region is not None else m.w.region
        groups.setdefault(id(w), (w, []))[1].append(k)
    return list(groups.values())


def rollout_heads(m: Moondream, rows: list[Sequence]) -> RolloutHeads | None:
    """The hook for a forward's rows; None (the plain path) unless one records or has its own region head."""
    if any(s.record is not None or (s.req.adapter is not None and s.req.adapter.region is not None) for s in rows):
        return RolloutHeads(m, rows)
    return None


def embed_images(m: Moondream, sources: Seq, adapters: Seq) -> list[torch.Tensor]:
    """`m.embed_crops`, except that images prefilled for an adapter with its own vision encoder use it."""
    visions = [None if a is None else a.vision for a in adapters]
    if all(v is None for v in visions):
        return m.embed_crops(list(sources))
    out: list[torch.Tensor | None] = [None] * len(sources)
    for v in {id(v): v for v in visions}.values():
        members = [k for k, x in enumerate(visions) if x is v]
        for k, e in zip(members, m.embed_crops([sources[k] for k in members], v), strict=True):
            out[k] = e
    return out  # type: ignore[return-value]
