"""Random initialization for from-scratch training and for the tiny random test models."""

from __future__ import annotations

import torch
from torch import nn


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sine/cosine position codes: half the channels for rows, half for columns."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(grid, dtype=torch.float32)
    ang = coords[:, None] * freqs[None] * torch.pi / 2
    row = torch.cat([ang.sin(), ang.cos()], -1)[:, None, :].expand(grid, grid, 2 * quarter)
    col = torch.cat([ang.sin(), ang.cos()], -1)[None, :, :].expand(grid, grid, 2 * quarter)
    out = torch.zeros(grid, grid, dim)
    out[..., : 4 * quarter] = torch.cat([row, col], -1)
    return out.reshape(grid * grid, dim)


@torch.no_grad()
def init_weights(weights: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in weights.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name == "vision.pos_emb":  # start with usable 2-D positions; learned from there
            grid = int(round(p.shape[1] ** 0.5))
            p.copy_(0.5 * sincos_2d(grid, p.shape[2])[None])
        elif name.endswith(("coord_features", "size_features")):
            p.copy_(torch.randn(p.shape, generator=g))  # Fourier frequencies: unit scale
        elif name.endswith("router.weight"):  # unit scale: decisive routing from the start, no near-ties
            p.copy_(torch.randn(p.shape, generator=g))
        elif ".ln" in name or "post_ln" in name:
            p.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias":
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return weights
