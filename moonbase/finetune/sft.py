"""Supervised fine-tuning: each group's target taught the way its skill teaches it (`Skill.teach`), packed
behind the group's image prefix by the nano-training code (`train/batch.py`) and scored by
`train/losses.py`: cross-entropy on answer tokens (and eos), on the "another object" token, on x / y
coordinate bins and on (w, h) log-size bins, teacher-forced through the region encoders with the quantized
values inference feeds back."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import TuningError
from ..image import load_image
from ..model.lora import Adapter
from ..model.moondream import Moondream
from ..skills import SkillRequest
from ..train.batch import SKILLS, pack_rows, transcript
from ..train.losses import losses
from .types import SFTGroup


def group_image(req: SkillRequest, max_pixels: int) -> np.ndarray:
    if req.image is None:
        raise TuningError("training needs an image in every group (text-only fine-tuning is not supported)")
    return load_image(req.image, max_pixels)


def sft_loss(policy: Moondream, groups: list[SFTGroup], adapter: Adapter, max_pixels: int) -> torch.Tensor:
    """Mean over every labelled output of the SFT groups (token CE + coordinate-bin CE + size-bin CE), packed one
    row per group: its image prefix, then its target segment."""
    rows = []
    for g in groups:
        prompt, moves = g.request.skill.teach(g.request, g.target, policy.tokenizer, policy.cfg)
        rows.append([(SKILLS.index(g.request.skill.name), transcript(prompt, moves, policy.cfg.tokenizer))])
    try:
        batch = pack_rows([group_image(g.request, max_pixels) for g in groups], rows, policy.cfg)
    except ValueError as e:
        raise TuningError(f"an SFT target is too long: {e}") from e
    return losses(policy, batch, adapter=adapter)["loss"]
