"""Training losses shared by pre-training and fine-tuning: cross-entropy on answer tokens and on
coordinate and log-size bins, teacher-forced through the region encoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.shapes import COLORS, SHAPES
from ..model import region
from ..model.lora import Adapter, LoraBatch
from ..model.moondream import Moondream
from ..model.text import decoder, lm_logits
from .batch import IGNORE, SKILLS, Batch, segment_mask

KINDS, COLOURS = 1 + len(SHAPES), 1 + len(COLORS)  # the probe's classes; 0 = no object under the token


def image_probe(dim: int, grid: int = 0) -> torch.nn.Linear:
    """Nano's training-only probe: kind and colour logits per image token, and with `grid` > 0 also the token's
    own row and column in the `grid` x `grid` token grid (so an objective about content keeps position)."""
    return torch.nn.Linear(dim, KINDS + COLOURS + 2 * grid)


def _soft_ce(logits: torch.Tensor, target: torch.Tensor, sigma: float) -> torch.Tensor:
    """Cross-entropy against a Gaussian over neighbouring bins (sigma in bins; 0 = the exact bin)."""
    if sigma <= 0:
        return F.cross_entropy(logits, target)
    bins = torch.arange(logits.shape[-1], device=logits.device)
    q = torch.exp(-0.5 * ((bins[None] - target[:, None]) / sigma) ** 2)
    q = q / q.sum(-1, keepdim=True)
    return -(q * F.log_softmax(logits, -1)).sum(-1).mean()


def embed_inputs(m: Moondream, b: Batch) -> torch.Tensor:
    """Token embeddings, with the image prefix and the fed-back coordinates and sizes in place."""
    dev, dtype = m.device, m.dtype
    x = m.w.text.wte[b.ids.to(dev)]
    img = torch.stack(m.embed_crops(b.crops))
    x = torch.cat([x[:, :1], img, x[:, 1 + img.shape[1] :]], dim=1)
    coord = b.coord_in.to(dev)
    is_coord = ~coord.isnan()
    if is_coord.any():
        x = x.index_put((is_coord,), region.encode_coordinate(coord[is_coord][:, None].to(dtype), m.w.region))
    size = b.size_in.to(dev)
    is_size = ~size[..., 0].isnan()
    if is_size.any():
        x = x.index_put((is_size,), region.encode_size(size[is_size].to(dtype), m.w.region))
    return x


def attention_loss(
    taps: list[tuple[torch.Tensor, torch.Tensor]], attend: torch.Tensor, mask: torch.Tensor, heads: int = 2
) -> list[torch.Tensor]:
    """-log of the attention mass that the first `heads` heads of every layer but the first put on the image tokens of the regions
    an output is about (at the positions that have such regions). A training-only signal that speeds up
    grounding. Layer 0 is left alone: its queries have not yet seen the prompt, so they cannot know the object."""
    sel = attend.any(-1)
    counts = sel.sum(1)
    n = int(counts.max())
    if n == 0:
        return []
    # only the few positions with regions are scored: gather them (in order, padded per row) before the
    # query-key products instead of scoring every position and discarding most
    r, t, p = attend.shape
    scored = torch.sort(sel.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n]

    def at_scored(x: torch.Tensor) -> torch.Tensor:  # (R, T, D) -> (R, n, D)
        return x.gather(1, scored[..., None].expand(-1, -1, x.shape[-1]))

    valid = torch.arange(n, device=attend.device)[None] < counts[:, None]
    scored_mask = at_scored(mask)
    target = torch.zeros(r, n, t, dtype=torch.bool, device=attend.device)
    target[:, :, 1 : 1 + p] = at_scored(attend)
    out = []
    group = taps[0][0].shape[1] // taps[0][1].shape[1]  # query heads per kv head
    for q, k in taps[1:]:
        for h in range(heads):
            logits = (at_scored(q[:, h]) @ k[:, h // group].transpose(-1, -2)) / q.shape[-1] ** 0.5
            logp = torch.log_softmax(logits.float().masked_fill(~scored_mask, float("-inf")), -1)
            out.append(-torch.logsumexp(logp.masked_fill(~target, float("-inf")), -1)[valid])
    return out


def length_buckets(lengths: torch.Tensor, ratio: float = 1.25) -> list[torch.Tensor]:
    """Row indices grouped by similar length, so each group is padded only to its own longest row."""
    order = lengths.argsort().tolist()
    groups, current = [], [order[0]]
    for i in order[1:]:
        if lengths[i] > ratio * lengths[current[0]]:
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    return [torch.tensor(g) for g in groups]


def losses(
    m: Moondream,
    b: Batch,
    label_sigma: float = 0.0,
    attn_weight: float = 0.0,
    adapter: Adapter | None = None,
    probe: torch.nn.Module | None = None,
    probe_weight: float = 1.0,
    checkpoint: bool = False,
) -> dict[str, torch.Tensor]:
    """Mean token, coordinate and size losses (and the grounding attention loss when `attn_weight` > 0), plus
    the token loss of each skill for logging. `adapter`: a LoRA on the text decoder (fine-tuning). `probe`
    (training only): a linear map from each image token to the kind and colour of the object under it, a
    dense signal for the vision encoder. `checkpoint`: gradient checkpointing of the decoder blocks (no `attn_weight`)."""
    dev = m.device
    x = embed_inputs(m, b)
    probe_loss = None
    if probe is not None and bool((b.patch_labels[..., 0] != IGNORE).any()):
        probe_loss = _probe_loss(probe(x[:, 1 : 1 + b.patch_labels.shape[1]]).float(), b)
    lengths = (b.seg >= 0).sum(1)
    hidden_parts: dict[str, list[torch.Tensor]] = {"tok": [], "coord": [], "size": []}
    label_parts: dict[str, list[torch.Tensor]] = {"tok": [], "coord": [], "size": [], "skill": []}
    attn_parts: list[torch.Tensor] = []
    for rows in length_buckets(lengths):
        t = int(lengths[rows].max())
        seg, pos = b.seg[rows, :t].to(dev), b.pos[rows, :t].to(dev)
        mask = segment_mask(seg)
        taps: list | None = [] if attn_weight > 0 else None
        lora = LoraBatch.single(adapter, len(rows), dev)
        hidden = decoder(
            x[rows.to(dev), :t], m.w.text, m.cfg.text, m.rope, pos, mask, taps=taps, lora=lora, checkpoint=checkpoint
        )
        if taps:
            attn_parts += attention_loss(taps, b.attend[rows, :t].to(dev), mask)
        for key, labels in (("tok", b.token_label), ("coord", b.coord_label), ("size", b.size_label)):
            lab = labels[rows, :t].to(dev)
            sel = (lab[..., 0] if key == "size" else lab) != IGNORE
            hidden_parts[key].append(hidden[sel])
            label_parts[key].append(lab[sel])
        label_parts["skill"].append(b.skill[rows, :t].to(dev)[b.token_label[rows, :t].to(dev) != IGNORE])
    h = {k: torch.cat(v) for k, v in hidden_parts.items()}
    lab = {k: torch.cat(v) for k, v in label_parts.items()}
    out: dict[str, torch.Tensor] = {}
    per_token = F.cross_entropy(lm_logits(h["tok"], m.w.text).float(), lab["tok"], reduction="none")
    out["token"] = per_token.mean()
    for i, name in enumerate(SKILLS):
        if (lab["skill"] == i).any():
            out[f"token_{name}"] = per_token[lab["skill"] == i].mean().detach()
    if len(lab["coord"]):
        out["coord"] = _soft_ce(region.coord_logits(h["coord"], m.w.region).float(), lab["coord"], label_sigma)
    if len(lab["size"]):
        logits = region.size_logits(h["size"], m.w.region).float()
        out["size"] = _soft_ce(logits.flatten(0, 1), lab["size"].flatten(), label_sigma)
    out["loss"] = out["token"] + out.get("coord", 0.0) + out.get("size", 0.0)
    if attn_parts:
        out["attn"] = torch.cat(attn_parts).mean()
        out["loss"] = out["loss"] + attn_weight * out["attn"]
    if probe_loss is not None:
        out["probe"] = probe_loss
        out["loss"] = out["loss"] + probe_weight * probe_loss
    return out


def vision_losses(m: Moondream, b: Batch, probe: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The vision pre-training phase: the probe's loss on the image embeddings alone (no text decoder), so
    the encoder learns what is under each token from many more images per second than the full model sees."""
    loss = _probe_loss(probe(torch.stack(m.embed_crops(b.crops))).float(), b)
    return {"probe": loss, "loss": loss}


def _probe_loss(logits: torch.Tensor, b: Batch) -> torch.Tensor:
    """Cross-entropy on the kind and the colour of every labelled image token, plus on its row and column when
    the probe reads position."""
    labels = b.patch_labels.to(logits.device)
    kind, colour, where = logits.split([KINDS, COLOURS, logits.shape[-1] - KINDS - COLOURS], -1)
    loss = F.cross_entropy(kind.flatten(0, 1), labels[..., 0].flatten())
    loss = loss + F.cross_entropy(colour.flatten(0, 1), labels[..., 1].flatten())
    if where.shape[-1]:
        grid = where.shape[-1] // 2
        cell = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[:2])
        row, col = where.split([grid, grid], -1)
        loss = loss + F.cross_entropy(row.flatten(0, 1), (cell // grid).flatten())
        loss = loss + F.cross_entropy(col.flatten(0, 1), (cell % grid).flatten())
    return loss


def hidden_at(m: Moondream, b: Batch, select: torch.Tensor, adapter: Adapter | None = None) -> torch.Tensor:
    """Pre-`post_ln` hidden states (N, D) at the selected (row, position) pairs of `select` (R, T), in
    row-major order: the positions whose outputs a caller reads (e.g. every action of a rollout)."""
    dev = m.device
    x = embed_inputs(m, b)
    lengths = (b.seg >= 0).sum(1)
    parts, order = [], []
    for rows in length_buckets(lengths):
        t = int(lengths[rows].max())
        seg, pos = b.seg[rows, :t].to(dev), b.pos[rows, :t].to(dev)
        lora = LoraBatch.single(adapter, len(rows), dev)
        hidden = decoder(x[rows.to(dev), :t], m.w.text, m.cfg.text, m.rope, pos, segment_mask(seg), lora=lora)
        sel = select[rows, :t]
        parts.append(hidden[sel.to(dev)])
        flat = rows[:, None] * select.shape[1] + torch.arange(t)[None]  # row-major index of each position
        order.append(flat[sel])
    h, keys = torch.cat(parts), torch.cat(order)
    return h[keys.argsort().to(dev)]
