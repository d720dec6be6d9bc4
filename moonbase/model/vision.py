"""SigLIP-style vision encoder, tile reconstruction and the projection into text space.

Functions of (inputs, weights, config). Shapes: N crops, P patches per crop, C encoder width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .layers import layer_norm, linear, mlp, mlp_weights


def build_vision(cfg: VisionConfig) -> nn.Module:
    m = nn.Module()
    m.patch_emb = nn.Linear(cfg.patch_dim, cfg.enc_dim)
    m.pos_emb = nn.Parameter(torch.empty(1, cfg.n_patches, cfg.enc_dim))
    m.blocks = nn.ModuleList(
        nn.ModuleDict(
            {
                "ln1": nn.LayerNorm(cfg.enc_dim, eps=cfg.layer_norm_eps),
                "attn": nn.ModuleDict(
                    {"qkv": nn.Linear(cfg.enc_dim, 3 * cfg.enc_dim), "proj": nn.Linear(cfg.enc_dim, cfg.enc_dim)}
                ),
                "ln2": nn.LayerNorm(cfg.enc_dim, eps=cfg.layer_norm_eps),
                "mlp": mlp_weights(cfg.enc_dim, cfg.enc_ff_dim, cfg.enc_dim),
            }
        )
        for _ in range(cfg.enc_n_layers)
    )
    m.post_ln = nn.LayerNorm(cfg.enc_dim, eps=cfg.layer_norm_eps)
    m.proj_mlp = mlp_weights(2 * cfg.enc_dim, cfg.proj_inner_dim, cfg.proj_out_dim)
    return m


def patchify(x_NCHW: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, P, C*patch*patch): patches row-major, each flattened channel-major."""
    n, c, h, w = x_NCHW.shape
    x = x_NCHW.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def _attention(x_NPC: torch.Tensor, w: nn.ModuleDict, n_heads: int) -> torch.Tensor:
    n, p, c = x_NPC.shape
    q, k, v = linear(x_NPC, w["qkv"]).view(n, p, 3, n_heads, c // n_heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)
    return linear(out.transpose(1, 2).reshape(n, p, c), w["proj"])


def encode_crops(crops_NCHW: torch.Tensor, w: nn.Module, cfg: VisionConfig) -> torch.Tensor:
    """Normalized crops -> encoder features (N, P, C) after the final LayerNorm."""
    x = linear(patchify(crops_NCHW, cfg.enc_patch_size), w.patch_emb) + w.pos_emb
    for block in w.blocks:
        x = x + _attention(layer_norm(x, block["ln1"]), block["attn"], cfg.enc_n_heads)
        x = x + mlp(layer_norm(x, block["ln2"]), block["mlp"])
    return layer_norm(x, w.post_ln)


def reconstruct(local_NggC: torch.Tensor, tiling: tuple[int, int], margin: int) -> torch.Tensor:
    """Stitch tile features into one (th*(g-2m) + 2m, tw*(g-2m) + 2m, C) grid, dropping each tile's margin on
    sides shared with a neighbour."""
    th, tw = tiling
    _, g, _, c = local_NggC.shape
    stride = g - 2 * margin
    out = local_NggC.new_empty(th * stride + 2 * margin, tw * stride + 2 * margin, c)
    for ty in range(th):
        top, bottom = (0 if ty == 0 else margin), (g if ty == th - 1 else g - margin)
        for tx in range(tw):
            left, right = (0 if tx == 0 else margin), (g if tx == tw - 1 else g - margin)
            tile = local_NggC[ty * tw + tx]
            out[ty * stride + top : ty * stride + bottom, tx * stride + left : tx * stride + right] = tile[top:bottom, left:right]
    return out


def pool_grid(grid_HWC: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pool a stitched grid to size x size, flattened row-major: (size*size, C)."""
    pooled = F.adaptive_avg_pool2d(grid_HWC.permute(2, 0, 1), (size, size))
    return pooled.permute(1, 2, 0).reshape(size * size, -1)


def project(global_PC: torch.Tensor, pooled_PC: torch.Tensor, w: nn.Module) -> torch.Tensor:
    """[global | pooled local] features -> text-space image embeddings (P, D)."""
    return mlp(torch.cat([global_PC, pooled_PC], dim=-1), w.proj_mlp)


def image_embeddings(features_NPC: torch.Tensor, tiling: tuple[int, int], w: nn.Module, cfg: VisionConfig) -> torch.Tensor:
    """Encoder features of one image's crops (global first, then tiles row-major) -> (P, D)."""
    g = cfg.grid
    local = features_NPC[1:].reshape(-1, g, g, features_NPC.shape[-1])
    pooled = pool_grid(reconstruct(local, tiling, cfg.overlap_margin), g)
    return project(features_NPC[0], pooled, w)
