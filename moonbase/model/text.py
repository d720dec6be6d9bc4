"""Phi-style text decoder with a prefix-LM mask: BOS + image tokens attend bidirectionally, text causally.
Moondream 3 adds tau attention (q and v scaled per head by learned token and position terms) and a
mixture-of-experts FFN from `moe.start_layer` on."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import TextConfig
from .layers import gelu, layer_norm, linear, mlp_weights
from .lora import LoraBatch
from .moe import moe_ffn, moe_weights
from .rope import apply_rope, rope_rows


def build_text(cfg: TextConfig) -> nn.Module:
    m = nn.Module()
    m.wte = nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))
    m.blocks = nn.ModuleList(_block(cfg, i) for i in range(cfg.n_layers))
    m.post_ln = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
    m.lm_head = nn.Linear(cfg.dim, cfg.vocab_size)
    return m


def _block(cfg: TextConfig, layer: int) -> nn.ModuleDict:
    attn = nn.ModuleDict({"qkv": nn.Linear(cfg.dim, cfg.qkv_dim), "proj": nn.Linear(cfg.n_heads * cfg.hd, cfg.dim)})
    if cfg.tau_attn:  # one row per head over the whole qkv output, and a position slope per head
        attn["tau"] = nn.Module()
        attn["tau"].wq = nn.Parameter(torch.empty(cfg.n_heads, cfg.qkv_dim))
        attn["tau"].wv = nn.Parameter(torch.empty(cfg.n_heads, cfg.qkv_dim))
        attn["tau"].alpha = nn.Parameter(torch.empty(cfg.n_heads))
    ffn = moe_weights(cfg.dim, cfg.moe) if cfg.is_moe(layer) and cfg.moe else mlp_weights(cfg.dim, cfg.ff_dim, cfg.dim)
    return nn.ModuleDict({"ln": nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps), "attn": attn, "mlp": ffn})


def tau_scaled(qkv: torch.Tensor, tau: nn.Module, pos: torch.Tensor, cfg: TextConfig) -> torch.Tensor:
    """q and v of each head times `tanh(w · gelu(qkv)) + 1 + (sigmoid(alpha · ln(pos + 1)) - 1/2)`, before RoPE;
    k unchanged (spec §5.3). The token term reads the whole qkv vector, in [q | k | v] order."""
    b, t, _ = qkv.shape
    nq, hd = cfg.n_heads, cfg.hd
    f = F.gelu(qkv, approximate="none" if cfg.tau_gelu == "exact" else "tanh")
    where = torch.log(pos.to(torch.float32) + 1)[..., None] * tau.alpha.float()  # (T, H) or (B, T, H)
    p = (1 + (torch.sigmoid(where) - 0.5)).to(qkv.dtype)
    q = qkv[..., : nq * hd].view(b, t, nq, hd) * (torch.tanh(f @ tau.wq.T) + p)[..., None]
    v = qkv[..., 2 * nq * hd :].view(b, t, nq, hd) * (torch.tanh(f @ tau.wv.T) + p)[..., None]
    return torch.cat([q.flatten(2), qkv[..., nq * hd : 2 * nq * hd], v.flatten(2)], dim=-1)


class KVStore(Protocol):
    """Where a forward pass keeps its keys and values: a contiguous cache or the engine's paged pool."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class KVCache:
    """Contiguous K/V buffers for one batch of sequences that share positions (the single-request path). K is
    stored after RoPE, in NeoX layout. Capacity grows in chunks up to max_context."""

    CHUNK = 256

    def __init__(self, cfg: TextConfig, batch: int, device: torch.device, dtype: torch.dtype, prefix_len: int = 0):
        # prefix_len: leading positions that attend to each other bidirectionally (BOS + image)
        self.cfg, self.length, self.prefix_len = cfg, 0, prefix_len
        shape = (batch, cfg.n_kv_heads, 0, cfg.hd)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]

    @classmethod
    def from_prefix(cls, cfg: TextConfig, kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> KVCache:
        k0 = kv[0][0]
        cache = cls(cfg, k0.shape[0], k0.device, k0.dtype, prefix_len=k0.shape[2])
        cache.reserve(k0.shape[2])
        for i, (k, v) in enumerate(kv):
            cache.update(i, k, v)
        cache.length = k0.shape[2]
        return cache

    def reserve(self, total: int) -> None:
        if total > self.cfg.max_context:
            raise ValueError(f"sequence of {total} tokens exceeds max_context {self.cfg.max_context}")
        cap = self.k[0].shape[2]
        if total <= cap:
            return
        new_cap = min(self.cfg.max_context, -(-total // self.CHUNK) * self.CHUNK)
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                buf[i] = torch.cat([t, t.new_empty(t.shape[0], t.shape[1], new_cap - cap, t.shape[3])], dim=2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new K/V (B, n_kv, T, hd) at `length` and return every key and value up to them."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def prefix(self, length: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Copies of the first `length` positions of every layer (for an encoded image)."""
        return tuple((k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in zip(self.k, self.v, strict=True))


def prefix_lm_mask(q_pos: torch.Tensor, n_keys: int, prefix_len: int) -> torch.Tensor | None:
    """Boolean (T, n_keys) mask, True = may attend; None when plain causal attention sees every key."""
    k_pos = torch.arange(n_keys, device=q_pos.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    allowed |= (q_pos[:, None] < prefix_len) & (k_pos[None, :] < prefix_len)
    return None if bool(allowed.all()) else allowed


def decoder(
    x_BTC: torch.Tensor,
    w: nn.Module,
    cfg: TextConfig,
    rope: tuple[torch.Tensor, torch.Tensor],
    pos: torch.Tensor,
    mask: torch.Tensor | None,
    cache: KVStore | None = None,
    taps: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    lora: LoraBatch | None = None,
    kv_only: bool = False,
    routes: list[torch.Tensor] | None = None,
    checkpoint: bool = False,
) -> torch.Tensor | None:
    """The decoder blocks over input embeddings; returns pre-`post_ln` hidden states (B, T, D).

    pos: (T,) or (B, T) RoPE positions. mask: None (all keys), (T, S) or (B, T, S), True = may attend.
    With a cache, each layer's K/V go through `cache.update`, which stores them and returns the keys and
    values to attend to; without one (training), attention covers the T inputs themselves. `taps` collects
    each layer's post-RoPE (q, k), `routes` each MoE layer's router logits (B, T, E). `lora` adds each row's
    adapter to qkv, proj, fc1 and fc2. With `kv_only` (an image prefix: only its cached K/V are ever read) the
    last layer stops once its K/V are stored (a fifth of nano's prefix work, 3% of Moondream 2's) and nothing
    is returned. With `checkpoint` (training: no cache, taps or routes), each block's activations are recomputed
    in the backward pass instead of kept (gradient checkpointing).
    """
    if checkpoint and (cache is not None or taps is not None or routes is not None):
        raise ValueError("gradient checkpointing is for training forwards without a cache, taps or routes")
    b, t, _ = x_BTC.shape
    cos, sin = rope_rows(rope[0][pos], rope[1][pos])
    if pos.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]
    if mask is not None and mask.dim() == 3:
        mask = mask[:, None]
    hd, nq, nkv = cfg.hd, cfg.n_heads, cfg.n_kv_heads
    x = x_BTC

    def layer(i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        h = layer_norm(x, block["ln"])
        qkv = _adapted(linear(h, block["attn"]["qkv"]), lora, i, "qkv", h)
        if cfg.tau_attn:
            qkv = tau_scaled(qkv, block["attn"]["tau"], pos, cfg)
        qk = apply_rope(qkv[..., : (nq + nkv) * hd].view(b, t, nq + nkv, hd).transpose(1, 2), cos, sin)
        q, k = qk[:, :nq], qk[:, nq:]  # q and k rotated together: one set of kernels
        v = qkv[..., (nq + nkv) * hd :].view(b, t, nkv, hd).transpose(1, 2)
        if taps is not None:
            taps.append((q, k))
        if cache is not None:
            k, v = cache.update(i, k, v)
            if kv_only and i == len(w.blocks) - 1:
                return None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nq != nkv)
        attn_out = _adapted(linear(a.transpose(1, 2).reshape(b, t, nq * hd), block["attn"]["proj"]), lora, i, "proj", h)
        if cfg.is_moe(i) and cfg.moe:
            ffn_out = moe_ffn(h, block["mlp"], cfg.moe, routes, None if lora is None else partial(lora.expert_delta, i))
        else:
            g = gelu(_adapted(linear(h, block["mlp"]["fc1"]), lora, i, "fc1", h))
            ffn_out = _adapted(linear(g, block["mlp"]["fc2"]), lora, i, "fc2", g)
        return x + attn_out + ffn_out

    for i, block in enumerate(w.blocks):
        if checkpoint:  # recompute the block in the backward pass instead of keeping its activations
            x = torch.utils.checkpoint.checkpoint(layer, i, block, x, use_reentrant=False)
        elif (x := layer(i, block, x)) is None:
            return None
    return x


def _adapted(y: torch.Tensor, lora: LoraBatch | None, layer: int, target: str, x: torch.Tensor) -> torch.Tensor:
    if lora is None:
        return y
    delta = lora.delta(layer, target, x)
    return y if delta is None else y + delta


def text_hidden(
    x_BTC: torch.Tensor,
    w: nn.Module,
    cfg: TextConfig,
    cache: KVCache,
    rope: tuple[torch.Tensor, torch.Tensor],
    lora: LoraBatch | None = None,
    kv_only: bool = False,
    routes: list[torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Append T inputs to the cache at the next positions, with the prefix-LM rule for the mask."""
    start, t = cache.length, x_BTC.shape[1]
    cache.reserve(start + t)
    pos = torch.arange(start, start + t, device=x_BTC.device)
    mask = prefix_lm_mask(pos, start + t, cache.prefix_len)
    out = decoder(x_BTC, w, cfg, rope, pos, mask, cache, lora=lora, kv_only=kv_only, routes=routes)
    cache.length = start + t
    return out


def lm_logits(hidden: torch.Tensor, w: nn.Module) -> torch.Tensor:
    return linear(layer_norm(hidden, w.post_ln), w.lm_head)


@dataclass(frozen=True)
class EncodedImage:
    """An image run through the vision stack and prefilled: reusable across any number of questions."""

    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (1, n_kv, prefix_len, head_dim)
    key: str | None = None  # content hash of the image, so an engine can share its cached prefix
    variant: str | None = None  # the adapter the prefix was computed with

    @property
    def length(self) -> int:
        return self.kv[0][0].shape[2]
