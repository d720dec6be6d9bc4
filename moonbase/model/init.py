"""Random initialization for from-scratch training and for the tiny random test models."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_weights(weights: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in weights.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(("coord_features", "size_features")):
            p.copy_(torch.randn(p.shape, generator=g))  # Fourier frequencies: unit scale
        elif ".ln" in name or "post_ln" in name:
            p.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias":
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return weights
