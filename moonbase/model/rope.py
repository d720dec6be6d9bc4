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


def rope_rows(cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the tables widened to the 2F rotated dims: (cos, cos) and (-sin, sin)."""
    return torch.cat([cos_TF, cos_TF], -1), torch.cat([-sin_TF, sin_TF], -1)


def apply_rope(x_BHTD: torch.Tensor, cos_T2F: torch.Tensor, sin_T2F: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2F dims of x with widened table rows (`rope_rows`); rotation in fp32.
    x1' = x1 cos - x2 sin and x2' = x2 cos + x1 sin, computed as x * cos + swap(x) * (-sin, sin): the same
    floating-point operations in fewer kernels."""
    rot_dims = cos_T2F.shape[-1]
    rot = x_BHTD[..., :rot_dims].float()
    rotated = rot * cos_T2F + rot.roll(rot_dims // 2, dims=-1) * sin_T2F
    return torch.cat([rotated.to(x_BHTD.dtype), x_BHTD[..., rot_dims:]], dim=-1)


def k_to_interleaved(k: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Our NeoX-layout K -> the reference's interleaved layout (ref[2j] = neox[j], ref[2j+1] = neox[j+half])."""
    half = rotary_dim // 2
    rot = k[..., :rotary_dim]
    inter = torch.stack([rot[..., :half], rot[..., half:]], dim=-1).flatten(-2)
    return torch.cat([inter, k[..., rotary_dim:]], dim=-1)
