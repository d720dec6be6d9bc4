"""Training batches: every task about an image packed into one row behind a single image prefix.

A row is `[BOS, image tokens, task 1, task 2, ...]`. Each task segment restarts its positions right after
the prefix and attends only to the prefix and to itself (causally), so packing k tasks costs one prefix
instead of k and is exactly equivalent to k separate sequences. Prompts come from `skills`, the renderer
inference uses, so training and inference see the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import skills
from ..config import ModelConfig
from ..data.tasks import Box, Example, Task
from ..image import Crops, overlap_crops
from ..model import region
from ..tokenizer import Tokenizer

IGNORE = -100


@dataclass
class Segment:
    """One task: inputs (token ids, or coordinate / size values) and the labels read at each position."""

    ids: list[int] = field(default_factory=list)
    coord_in: list[float | None] = field(default_factory=list)
    size_in: list[tuple[float, float] | None] = field(default_factory=list)
    token_label: list[int] = field(default_factory=list)
    coord_label: list[int] = field(default_factory=list)
    size_label: list[tuple[int, int]] = field(default_factory=list)
    attend: list[tuple[Box, ...]] = field(default_factory=list)  # regions the output at i is about

    def add(self, token: int = 0, coord: float | None = None, size: tuple[float, float] | None = None) -> None:
        self.ids.append(token)
        self.coord_in.append(coord)
        self.size_in.append(size)
        self.token_label.append(IGNORE)
        self.coord_label.append(IGNORE)
        self.size_label.append((IGNORE, IGNORE))
        self.attend.append(())

    def drop_last(self) -> None:
        for column in (self.ids, self.coord_in, self.size_in, self.token_label, self.coord_label, self.size_label, self.attend):
            column.pop()

    def __len__(self) -> int:
        return len(self.ids)


def render_task(task: Task, tokenizer: Tokenizer, cfg: ModelConfig, prompt: skills.Prompt | None = None) -> Segment:
    """A task as one segment. `prompt` overrides the skill's default prompt (e.g. one with spatial refs)."""
    tok, rc = cfg.tokenizer, cfg.region
    seg = Segment()
    if task.skill in ("caption", "query"):
        if prompt is None and task.skill == "caption":
            prompt = skills.caption_prompt(tok, task.arg)
        elif prompt is None:
            prompt = skills.query_prompt(tokenizer, task.arg)
        target = tokenizer.encode(task.answer) + [tok.eos_id]
    else:
        prompt = prompt or skills.object_prompt(tokenizer, task.skill, task.arg)
        target = []
    coords, sizes = iter(prompt.coords), iter(prompt.sizes)
    for t in prompt.ids:
        seg.add(t, next(coords) if t == tok.coord_id else None, next(sizes) if t == tok.size_id else None)
    seg.attend[-1] = task.grounding
    for t in target:  # the label of input i is the token that follows it
        seg.token_label[-1] = t
        seg.add(t)
    if target:
        seg.drop_last()  # the final label (eos) is read at the last answer token; eos itself is never fed
        return seg
    for box in task.boxes:  # region loop: decide "another object", then x, y (and size), each fed back
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        seg.token_label[-1] = tok.coord_id
        seg.coord_label[-1] = bx = region.coord_to_bin(cx, rc)
        seg.attend[-1] = (box,)
        seg.add(coord=float(region.coord_from_bin(torch.tensor(bx), rc)))
        seg.coord_label[-1] = by = region.coord_to_bin(cy, rc)
        seg.attend[-1] = (box,)
        seg.add(coord=float(region.coord_from_bin(torch.tensor(by), rc)))
        if task.skill == "detect":
            bw, bh = region.size_to_bin(box[2] - box[0], rc), region.size_to_bin(box[3] - box[1], rc)
            seg.size_label[-1] = (bw, bh)
            seg.attend[-1] = (box,)
            wh = region.size_from_bin(torch.tensor([bw, bh]), rc).tolist()
            seg.add(size=(wh[0], wh[1]))
    seg.token_label[-1] = tok.eos_id
    return seg


@dataclass
class Batch:
    crops: list[Crops]
    ids: torch.Tensor  # (R, T) token ids; image and region positions hold a placeholder
    pos: torch.Tensor  # (R, T) RoPE positions: prefix 0..P, each task restarting at P + 1
    seg: torch.Tensor  # (R, T) 0 = prefix, k = task k, -1 = padding
    coord_in: torch.Tensor  # (R, T) fed coordinate values (NaN where the input is a token)
    size_in: torch.Tensor  # (R, T, 2) fed sizes (NaN where not)
    token_label: torch.Tensor  # (R, T)
    coord_label: torch.Tensor  # (R, T)
    size_label: torch.Tensor  # (R, T, 2)
    skill: torch.Tensor  # (R, T) index into SKILLS of the task at each position (-1 outside tasks)
    attend: torch.Tensor  # (R, T, P) image tokens covering the regions the output at each position is about
    patch_labels: torch.Tensor  # (R, P, 2) kind and colour of the object under each image token (0 = none)


SKILLS = ("caption", "query", "detect", "point")


def make_batch(examples: list[Example], tokenizer: Tokenizer, cfg: ModelConfig, max_len: int | None = None) -> Batch:
    rows = [[(SKILLS.index(t.skill), render_task(t, tokenizer, cfg)) for t in ex.tasks] for ex in examples]
    b = pack_rows([ex.image for ex in examples], rows, cfg, max_len)
    for i, ex in enumerate(examples):
        if ex.regions:  # scenes with every object known: dense labels for the image tokens
            b.patch_labels[i] = 0
            for kind, color, box in ex.regions:
                b.patch_labels[i, box_tokens(box, cfg.vision.grid, 0.5)] = torch.tensor([kind + 1, color + 1])
    return b


def pack_rows(images: list, rows: list[list[tuple[int, Segment]]], cfg: ModelConfig, max_len: int | None = None) -> Batch:
    """One row per image (HxWx3 uint8): the image prefix, then that row's (skill index, segment) pairs."""
    prefix = cfg.prefix_len
    t_max = max(prefix + sum(len(s) for _, s in segs) for segs in rows)
    limit = max_len or cfg.text.max_context
    if t_max > limit:
        raise ValueError(f"packed row of {t_max} tokens exceeds {limit}")
    r = len(rows)
    nan = float("nan")
    b = Batch(
        crops=[overlap_crops(image, cfg.vision) for image in images],
        ids=torch.zeros(r, t_max, dtype=torch.long),
        pos=torch.zeros(r, t_max, dtype=torch.long),
        seg=torch.full((r, t_max), -1, dtype=torch.long),
        coord_in=torch.full((r, t_max), nan),
        size_in=torch.full((r, t_max, 2), nan),
        token_label=torch.full((r, t_max), IGNORE, dtype=torch.long),
        coord_label=torch.full((r, t_max), IGNORE, dtype=torch.long),
        size_label=torch.full((r, t_max, 2), IGNORE, dtype=torch.long),
        skill=torch.full((r, t_max), -1, dtype=torch.long),
        attend=torch.zeros(r, t_max, cfg.vision.n_patches, dtype=torch.bool),
        patch_labels=torch.full((r, cfg.vision.n_patches, 2), IGNORE, dtype=torch.long),
    )
    for i, segs in enumerate(rows):
        b.ids[i, 0] = cfg.tokenizer.bos_id
        b.pos[i, :prefix] = torch.arange(prefix)
        b.seg[i, :prefix] = 0
        at = prefix
        for k, (skill, s) in enumerate(segs, start=1):
            n = len(s)
            sl = slice(at, at + n)
            b.ids[i, sl] = torch.tensor(s.ids)
            b.pos[i, sl] = torch.arange(prefix, prefix + n)
            b.seg[i, sl] = k
            b.coord_in[i, sl] = torch.tensor([nan if c is None else c for c in s.coord_in])
            b.size_in[i, sl] = torch.tensor([(nan, nan) if z is None else z for z in s.size_in])
            b.token_label[i, sl] = torch.tensor(s.token_label)
            b.coord_label[i, sl] = torch.tensor(s.coord_label)
            b.size_label[i, sl] = torch.tensor(s.size_label)
            b.skill[i, sl] = skill
            for j, boxes in enumerate(s.attend):
                for box in boxes:
                    b.attend[i, at + j] |= box_tokens(box, cfg.vision.grid)
            at += n
        b.pos[i, at:] = prefix  # padding: any valid position; its outputs are never read
    return b


def box_tokens(box: Box, grid: int, min_overlap: float = 0.25) -> torch.Tensor:
    """(grid*grid,) image tokens whose cell is covered at least `min_overlap` by the box (always the centre's)."""
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid
    ox = (torch.minimum(edges[1:], torch.tensor(box[2])) - torch.maximum(edges[:-1], torch.tensor(box[0]))).clamp_min(0) * grid
    oy = (torch.minimum(edges[1:], torch.tensor(box[3])) - torch.maximum(edges[:-1], torch.tensor(box[1]))).clamp_min(0) * grid
    cover = oy[:, None] * ox[None, :] >= min_overlap
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    cover[min(grid - 1, max(0, int(cy * grid))), min(grid - 1, max(0, int(cx * grid)))] = True
    return cover.flatten()


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """(R, T, T): every token sees the prefix; task tokens also see earlier tokens of their own task."""
    causal = torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool, device=seg.device).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & causal
    return same | (seg == 0)[:, None, :]
