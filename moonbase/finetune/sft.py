"""Supervised fine-tuning targets as training segments, and their loss, through the nano-training code
(`train/batch.py` renders and packs, `train/losses.py` scores): cross-entropy on answer tokens (and eos),
on the "another object" token, on x / y coordinate bins and on (w, h) log-size bins, teacher-forced through
the region encoders with the quantized values inference feeds back.

* query: the answer; with a reasoning target, the trace first (ended by the answer token), its grounded
  spans written as `<start_ground_points> span coord coord ... <end_ground>`, each coordinate decoded
  from the hidden state that produced its coord token, as inference does (the order of text and
  coordinates inside a span is our decision; inference parses it back to the same text and grounding).
* detect: boxes in the canonical order (left to right by centre, then top to bottom): the order nano was
  trained with and the order a teacher-forced list needs to be unambiguous.
* point: points in the same order (boxes without points stand for their centres).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .. import skills
from ..data.tasks import Task, canonical
from ..errors import TuningError
from ..image import load_image
from ..model import region
from ..model.lora import Adapter
from ..model.moondream import Moondream
from ..tokenizer import Tokenizer
from ..train.batch import SKILLS, Batch, Segment, pack_rows, render_task
from ..train.losses import losses
from .types import QueryTarget, RegionTarget, SFTGroup, SkillRequest


def request_prompt(req: SkillRequest, tokenizer: Tokenizer) -> skills.Prompt:
    """The prompt inference builds for this request (one renderer for inference, SFT and RL)."""
    refs = None if req.spatial_refs is None else [list(r) for r in req.spatial_refs]
    if req.skill == "query":
        return skills.query_prompt(tokenizer, req.question, refs, req.reasoning)
    return skills.object_prompt(tokenizer, req.skill, req.object, refs if req.skill == "point" else None)


def prompt_segment(prompt: skills.Prompt, m: Moondream) -> Segment:
    tok = m.cfg.tokenizer
    seg = Segment()
    coords, sizes = iter(prompt.coords), iter(prompt.sizes)
    for t in prompt.ids:
        seg.add(t, next(coords) if t == tok.coord_id else None, next(sizes) if t == tok.size_id else None)
    return seg


def trace_tokens(target: QueryTarget, m: Moondream) -> list[tuple[int, float | None]]:
    """A reasoning text with grounding spans -> (token id, coordinate fed in its place or None)."""
    tok, encode = m.cfg.tokenizer, m.tokenizer.encode
    out: list[tuple[int, float | None]] = []
    text, at = target.reasoning or "", 0
    for g in target.grounding:
        out += [(t, None) for t in encode(text[at : g.start])] if g.start > at else []
        out += [(tok.start_ground_points_id, None)] + [(t, None) for t in encode(text[g.start : g.end])]
        for x, y in g.points:
            out += [(tok.coord_id, x), (tok.coord_id, y)]
        out.append((tok.end_ground_id, None))
        at = g.end
    return out + ([(t, None) for t in encode(text[at:])] if at < len(text) else [])


def reasoning_segment(req: SkillRequest, target: QueryTarget, m: Moondream) -> Segment:
    tok, rc = m.cfg.tokenizer, m.cfg.region
    seg = prompt_segment(request_prompt(dataclasses.replace(req, reasoning=True), m.tokenizer), m)
    for t, coord in trace_tokens(target, m):
        seg.token_label[-1] = t
        if coord is None:
            seg.add(t)
            continue
        seg.coord_label[-1] = b = region.coord_to_bin(coord, rc)  # read from the same hidden state as the token
        seg.add(coord=float(region.coord_from_bin(torch.tensor(b), rc)))
    seg.token_label[-1] = tok.answer_id
    seg.add(tok.answer_id)
    for t in m.tokenizer.encode(target.answer) + [tok.eos_id]:
        seg.token_label[-1] = t
        seg.add(t)
    seg.drop_last()
    return seg


def sft_segment(req: SkillRequest, target, m: Moondream) -> Segment:
    if req.skill == "query":
        if not isinstance(target, QueryTarget):
            raise TuningError("a query SFT target needs an answer")
        if req.reasoning or target.reasoning is not None:
            return reasoning_segment(req, target, m)
        return render_task(Task("query", req.question, target.answer), m.tokenizer, m.cfg, request_prompt(req, m.tokenizer))
    if not isinstance(target, RegionTarget):
        raise TuningError(f"a {req.skill} SFT target needs boxes or points")
    if req.skill == "detect":
        boxes = canonical(list(target.boxes))
    else:
        points = list(target.points) or [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in target.boxes]
        boxes = canonical([(x, y, x, y) for x, y in points])
    return render_task(Task(req.skill, req.object, boxes=boxes), m.tokenizer, m.cfg, request_prompt(req, m.tokenizer))


def group_image(req: SkillRequest, max_pixels: int) -> np.ndarray:
    if req.image is None:
        raise TuningError("training needs an image in every group (text-only fine-tuning is not supported)")
    return load_image(req.image, max_pixels)


def sft_batch(groups: list[SFTGroup], m: Moondream, max_pixels: int) -> Batch:
    """One packed row per group (its image prefix, then its target segment)."""
    rows = [[(SKILLS.index(g.request.skill), sft_segment(g.request, g.target, m))] for g in groups]
    try:
        return pack_rows([group_image(g.request, max_pixels) for g in groups], rows, m.cfg)
    except ValueError as e:
        raise TuningError(f"an SFT target is too long: {e}") from e


def sft_loss(policy: Moondream, groups: list[SFTGroup], adapter: Adapter, max_pixels: int) -> torch.Tensor:
    """Mean over every labelled output of the SFT groups: token CE + coordinate-bin CE + size-bin CE."""
    parts = losses(policy, sft_batch(groups, policy, max_pixels), adapter=adapter)
    return parts["loss"]
