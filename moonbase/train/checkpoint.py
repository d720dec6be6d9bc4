"""Training checkpoints: model, optimizer, step and the config/tokenizer to rebuild them, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from ..atomic import atomic_path
from ..config import ModelConfig


def save_checkpoint(
    path: Path,
    weights: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    cfg: ModelConfig,
    tok: HFTokenizer,
    args: dict[str, Any],
    elapsed: float,
    probe: nn.Module | None = None,
) -> None:
    state = {
        "model": weights.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "config": cfg.to_dict(),
        "tokenizer": tok.to_str(),
        "args": args,
        "elapsed": elapsed,
    }
    if probe is not None:  # a training-only head (nano's image-token probe): needed to resume exactly
        state["probe"] = probe.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
