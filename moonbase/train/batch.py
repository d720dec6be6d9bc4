"""Training batches: every task about an image packed into one row behind a single image prefix.

A row is `[BOS, image tokens, task 1, task 2, ...]`. Each task segment restarts its positions right after
the prefix and attends only to the prefix and to itself (causally), so packing k tasks costs one prefix
instead of k and is exactly equivalent to k separate sequences. Prompts and the moves that teach a target
come from the skills, the renderer inference uses, so training and inference see the same ids.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import skills
from ..config import ModelConfig, TokenizerConfig
from ..data.tasks import Box, Example, Task
from ..image import Crops, overlap_crops
from ..skills.program import Head
from ..skills.training import Move, Target
from ..tokenizer import Tokenizer

IGNORE = -100
ATTEND_OVERLAP = 0.25  # an image token is about a region when the region covers this much of its cell


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


def transcript(prompt: skills.Prompt, moves: list[Move], tok: TokenizerConfig) -> Segment:
    """A prompt and the moves after it as one segment: each move's label is read at the current last input,
    then its feed is appended. Inputs after the last label are never read, and are dropped."""
    seg = Segment()
    for t, f in zip(prompt.ids, prompt.feeds(tok), strict=True):  # region inputs keep their placeholder id
        seg.add(t, f.coord, f.size)
    last = len(seg) - 1
    for move in moves:
        at = len(seg) - 1
        if move.label is not None:
            column = {Head.LM: seg.token_label, Head.COORD: seg.coord_label, Head.SIZE: seg.size_label}[move.head]
            column[at], last = move.label, at
        if move.about:
            seg.attend[at] = move.about
        if (f := move.feed) is not None:
            seg.add(0 if f.token is None else f.token, f.coord, f.size)
    while len(seg) - 1 > last:
        seg.drop_last()
    return seg


def render_task(task: Task, tokenizer: Tokenizer, cfg: ModelConfig) -> Segment:
    """A synthetic task as one segment, taught the way its skill teaches a target."""
    skill = skills.get(task.skill)
    target = Target(answer=task.answer, boxes=task.boxes, about=task.grounding)
    prompt, moves = skill.teach(skills.SkillRequest.of(skill, None, task.arg), target, tokenizer, cfg)
    return transcript(prompt, moves, cfg.tokenizer)


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


SKILLS = tuple(skills.REGISTRY)


def make_batch(examples: list[Example], tokenizer: Tokenizer, cfg: ModelConfig, max_len: int | None = None) -> Batch:
    rows = [[(SKILLS.index(t.skill), render_task(t, tokenizer, cfg)) for t in ex.tasks] for ex in examples]
    b = pack_rows([ex.image for ex in examples], rows, cfg, max_len)
    for i, ex in enumerate(examples):
        if ex.regions:  # scenes with every object known: dense labels for the image tokens
            b.patch_labels[i] = 0
            for kind, color, box in ex.regions:
                cells = torch.from_numpy(_box_cells(box, cfg.vision.grid, 0.5).copy())  # the cached array is read-only
                b.patch_labels[i, cells] = torch.tensor([kind + 1, color + 1])
    return b


def pack_rows(images: list, rows: list[list[tuple[int, Segment]]], cfg: ModelConfig, max_len: int | None = None) -> Batch:
    """One row per image (HxWx3 uint8): the image prefix, then that row's (skill index, segment) pairs."""
    prefix = cfg.prefix_len
    t_max = max(prefix + sum(len(s) for _, s in segs) for segs in rows)
    limit = max_len or cfg.text.max_context
    if t_max > limit:
        raise ValueError(f"packed row of {t_max} tokens exceeds {limit}")
    r, grid = len(rows), cfg.vision.grid
    nan = float("nan")
    # columns are filled as numpy arrays and converted once: per-segment tensors made batch rendering the
    # training loop's biggest CPU cost after the model itself
    col = {
        "ids": np.zeros((r, t_max), dtype=np.int64),
        "pos": np.full((r, t_max), prefix, dtype=np.int64),  # padding: any valid position; its outputs are never read
        "seg": np.full((r, t_max), -1, dtype=np.int64),
        "coord_in": np.full((r, t_max), nan, dtype=np.float32),
        "size_in": np.full((r, t_max, 2), nan, dtype=np.float32),
        "token_label": np.full((r, t_max), IGNORE, dtype=np.int64),
        "coord_label": np.full((r, t_max), IGNORE, dtype=np.int64),
        "size_label": np.full((r, t_max, 2), IGNORE, dtype=np.int64),
        "skill": np.full((r, t_max), -1, dtype=np.int64),
        "attend": np.zeros((r, t_max, cfg.vision.n_patches), dtype=bool),
    }
    for i, segs in enumerate(rows):
        col["ids"][i, 0] = cfg.tokenizer.bos_id
        col["pos"][i, :prefix] = np.arange(prefix)
        col["seg"][i, :prefix] = 0
        at = prefix
        for k, (skill, s) in enumerate(segs, start=1):
            n = len(s)
            sl = slice(at, at + n)
            for name in ("ids", "token_label", "coord_label", "size_label"):
                col[name][i, sl] = getattr(s, name)
            col["pos"][i, sl] = np.arange(prefix, prefix + n)
            col["seg"][i, sl] = k
            col["skill"][i, sl] = skill
            col["coord_in"][i, sl] = [nan if c is None else c for c in s.coord_in]
            col["size_in"][i, sl] = [(nan, nan) if z is None else z for z in s.size_in]
            for j, boxes in enumerate(s.attend):
                for box in boxes:
                    col["attend"][i, at + j] |= _box_cells(box, grid, ATTEND_OVERLAP)
            at += n
    return Batch(
        crops=[overlap_crops(image, cfg.vision) for image in images],
        patch_labels=torch.full((r, cfg.vision.n_patches, 2), IGNORE, dtype=torch.long),
        **{name: torch.from_numpy(array) for name, array in col.items()},
    )


@functools.lru_cache(maxsize=4096)  # a scene's boxes recur at every position of every task about them
def _box_cells(box: Box, grid: int, min_overlap: float) -> np.ndarray:
    """(grid*grid,) image tokens whose cell is covered at least `min_overlap` by the box (always the centre's)."""
    edges = np.arange(grid + 1, dtype=np.float32) / grid
    lo, hi = edges[:-1], edges[1:]
    x0, y0, x1, y1 = (np.float32(v) for v in box)
    ox = (np.minimum(hi, x1) - np.maximum(lo, x0)).clip(min=0) * grid
    oy = (np.minimum(hi, y1) - np.maximum(lo, y0)).clip(min=0) * grid
    cover = oy[:, None] * ox[None, :] >= min_overlap
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    cover[min(grid - 1, max(0, int(cy * grid))), min(grid - 1, max(0, int(cx * grid)))] = True
    cover = cover.flatten()
    cover.flags.writeable = False
    return cover


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """(R, T, T): every token sees the prefix; task tokens also see earlier tokens of their own task."""
    causal = torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool, device=seg.device).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & causal
    return same | (seg == 0)[:, None, :]
