"""Region module: Fourier encoders that embed coordinates and sizes, decoders that read them back as bins:
an MLP each (Moondream 2), or a LayerNorm `ln` then one Linear each (Moondream 3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import RegionConfig
from .layers import layer_norm, linear, mlp, mlp_weights


def build_region(cfg: RegionConfig) -> nn.Module:
    def decoder(d_out: int) -> nn.Module:
        return nn.Linear(cfg.dim, d_out) if cfg.decoder_arch == "linear" else mlp_weights(cfg.dim, cfg.inner_dim, d_out)

    m = nn.Module()
    m.coord_features = nn.Parameter(torch.empty(1, cfg.coord_feat_dim // 2))
    m.coord_encoder = nn.Linear(cfg.coord_feat_dim, cfg.dim)
    m.coord_decoder = decoder(cfg.coord_out_dim)
    m.size_features = nn.Parameter(torch.empty(2, cfg.size_feat_dim // 2))
    m.size_encoder = nn.Linear(cfg.size_feat_dim, cfg.dim)
    m.size_decoder = decoder(cfg.size_out_dim)
    if cfg.use_ln:
        m.ln = nn.LayerNorm(cfg.dim)
    return m


def _decode(hidden_BC: torch.Tensor, w: nn.Module, decoder: nn.Module) -> torch.Tensor:
    """The weight tree says which head it is: `ln` first if present, an MLP (fc1, fc2) or one linear layer."""
    x = layer_norm(hidden_BC, w.ln) if hasattr(w, "ln") else hidden_BC
    return mlp(x, decoder) if isinstance(decoder, nn.ModuleDict) else linear(x, decoder)


def fourier(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    f = (2 * math.pi * x) @ freqs
    return torch.cat([torch.cos(f), torch.sin(f)], dim=-1)


def encode_coordinate(coord_B1: torch.Tensor, w: nn.Module) -> torch.Tensor:
    return linear(fourier(coord_B1, w.coord_features), w.coord_encoder)


def encode_size(size_B2: torch.Tensor, w: nn.Module) -> torch.Tensor:
    return linear(fourier(size_B2, w.size_features), w.size_encoder)


def coord_logits(hidden_BC: torch.Tensor, w: nn.Module) -> torch.Tensor:
    return _decode(hidden_BC, w, w.coord_decoder)


def size_logits(hidden_BC: torch.Tensor, w: nn.Module) -> torch.Tensor:
    """(B, 2, size_bins): width logits first, then height."""
    out = _decode(hidden_BC, w, w.size_decoder)
    return out.view(*out.shape[:-1], 2, -1)


def coord_from_bin(bin_idx: torch.Tensor, cfg: RegionConfig) -> torch.Tensor:
    return bin_idx / cfg.coord_bins


def size_from_bin(bin_idx: torch.Tensor, cfg: RegionConfig) -> torch.Tensor:
    """Log scale from 2**size_min_log2 to 1 (linear bin/size_bins for pre-2025-03-27 checkpoints)."""
    if cfg.size_decoding == "linear":
        return bin_idx / cfg.size_bins
    lo = cfg.size_min_log2
    return torch.pow(2.0, (bin_idx / (cfg.size_bins - 1)) * -lo + lo)


def coord_to_bin(value: float, cfg: RegionConfig) -> int:
    """Training label: the bin whose decoded value k/bins is nearest (spec D2; the reference script uses p*1023)."""
    return max(0, min(cfg.coord_bins - 1, round(value * cfg.coord_bins)))


def size_to_bin(size: float, cfg: RegionConfig) -> int:
    """Training label: inverse of `size_from_bin`, clamped to the valid bins."""
    n = cfg.size_bins
    if cfg.size_decoding == "linear":
        return max(0, min(n - 1, round(size * n)))
    lo = cfg.size_min_log2
    return max(0, min(n - 1, round((math.log2(max(size, 2.0**lo)) - lo) / -lo * (n - 1))))
