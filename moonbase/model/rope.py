"""Partial rotary position embedding, NeoX layout (pairs (j, j + rotary_dim/2) within the first rotary_dim dims).

The reference writes rotated pairs back interleaved; applied identically to q and k that layout gives the
same attention scores, so only cached K differs (see `k_to_interleaved`).
"""

from __future__ import annotations

import torch


def rope_table(
    rotary_dim: int, max_context: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_context, rotary_dim // 2), always float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
    angles = torch.outer(torch.arange(max_context, device=device, dtype=torch.float32), inv_freq)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x_BHTD: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2F dims of x at the positions whose cos/sin rows are given; rotation in fp32."""
    half = cos_TF.shape[-1]
    rot = x_BHTD[..., : 2 * half].float()
    x1, x2 = rot[..., :half], rot[..., half:]
    rotated = torch.cat([x1 * cos_TF - x2 * sin_TF, x1 * sin_TF + x2 * cos_TF], dim=-1)
    return torch.cat([rotated.to(x_BHTD.dtype), x_BHTD[..., 2 * half :]], dim=-1)


def k_to_interleaved(k: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Our NeoX-layout K -> the reference's interleaved layout (ref[2j] = neox[j], ref[2j+1] = neox[j+half])."""
    half = rotary_dim // 2
    rot = k[..., :rotary_dim]
    inter = torch.stack([rot[..., :half], rot[..., half:]], dim=-1).flatten(-2)
    return torch.cat([inter, k[..., rotary_dim:]], dim=-1)
