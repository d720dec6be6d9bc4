"""Mixture-of-experts feed-forward of Moondream 3 (spec §5.6): a router (Linear with bias) scores every expert,
the k best raw logits are kept and softmaxed among themselves in float32, and each chosen expert computes
`fc2 · (gelu_exact(h) * (g + 1))` with `[h | g] = fc1 · x` and no biases.

The experts run grouped: the (token, expert) assignments are sorted by expert and each expert multiplies its
contiguous slice once (`torch._grouped_mm`, one kernel on CUDA and on the CPU, no host sync, so CUDA graphs can
capture it). Never a dense all-experts compute: the work is k/E of it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .layers import linear

ExpertDelta = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]  # LoraBatch.expert_delta


def moe_weights(dim: int, moe: MoEConfig) -> nn.Module:
    """`router` (E, dim) with bias; `fc1.weight` (E, 2·inner, dim) = [h | g] rows; `fc2.weight` (E, dim, inner)."""
    m = nn.Module()
    m.router = nn.Linear(dim, moe.num_experts)
    m.fc1, m.fc2 = nn.Module(), nn.Module()
    m.fc1.weight = nn.Parameter(torch.empty(moe.num_experts, 2 * moe.expert_inner_dim, dim))
    m.fc2.weight = nn.Parameter(torch.empty(moe.num_experts, dim, moe.expert_inner_dim))
    return m


def route(x_NC: torch.Tensor, w: nn.Module, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (N, E), the k chosen experts (N, k) in descending logit order, and their weights (N, k)."""
    logits = linear(x_NC, w.router)
    top = logits.topk(k, dim=-1)
    return logits, top.indices, torch.softmax(top.values.float(), dim=-1).to(x_NC.dtype)


def expert_activation(hg: torch.Tensor) -> torch.Tensor:
    h, g = hg.chunk(2, dim=-1)
    return F.gelu(h) * (g + 1)


def moe_ffn(
    x_BTC: torch.Tensor,
    w: nn.Module,
    moe: MoEConfig,
    routes: list[torch.Tensor] | None = None,
    adapt: ExpertDelta | None = None,
) -> torch.Tensor:
    """The MoE feed-forward of every token; `routes` collects the router logits (for parity and tests), `adapt`
    gives each row's per-expert LoRA deltas (target, x, experts, rows)."""
    x = x_BTC.reshape(-1, x_BTC.shape[-1])
    logits, ids, weights = route(x, w, moe.experts_per_token)
    if routes is not None:
        routes.append(logits.view(*x_BTC.shape[:-1], -1))
    return grouped_experts(x, ids, weights, w.fc1.weight, w.fc2.weight, adapt, x_BTC.shape[1]).view_as(x_BTC)


def grouped_experts(
    x_NC: torch.Tensor,
    ids_NK: torch.Tensor,
    weights_NK: torch.Tensor,
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    adapt: ExpertDelta | None = None,
    tokens_per_row: int = 1,
) -> torch.Tensor:
    """Σ_k weight · expert(x) for every token, the assignments sorted by expert (a stable sort, so each
    expert sees its tokens in order and the result does not depend on the batch around a token). `adapt` gives
    LoRA deltas for fc1 and fc2; token n is in batch row n // tokens_per_row."""
    n_experts, k = fc1.shape[0], ids_NK.shape[1]
    flat = ids_NK.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k
    ends = expert_ends(flat, n_experts)
    x = x_NC[token]
    experts, rows = flat[order], token // tokens_per_row
    hg = _plus(grouped_mm(x, fc1, ends), adapt and adapt("fc1", x, experts, rows))
    act = expert_activation(hg)
    y = _plus(grouped_mm(act, fc2, ends), adapt and adapt("fc2", act, experts, rows))
    y = y * weights_NK.reshape(-1)[order, None]
    return torch.zeros_like(x_NC).index_add_(0, token, y)


def expert_ends(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Cumulative assignment counts per expert (int32), counted without a host sync (`bincount` on CUDA reads
    the maximum back), so a CUDA graph can capture it."""
    counts = torch.zeros(n_experts, dtype=torch.int32, device=experts.device)
    return counts.index_add_(0, experts, torch.ones_like(experts, dtype=torch.int32)).cumsum(0, dtype=torch.int32)


def _plus(y: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return y if delta is None else y + delta


def grouped_mm(x_MI: torch.Tensor, w_EOI: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows `ends[e-1]:ends[e]` of x times expert e's (out, in) matrix transposed. One `torch._grouped_mm` where
    it applies (16-byte aligned rows, no autograd: its CPU backward rejects broadcast gradients); otherwise a
    loop over the experts that have rows."""
    aligned = (w_EOI.shape[1] * x_MI.element_size()) % 16 == 0 and (x_MI.shape[1] * x_MI.element_size()) % 16 == 0
    if (
        hasattr(torch, "_grouped_mm")
        and aligned
        and not (torch.is_grad_enabled() and (x_MI.requires_grad or w_EOI.requires_grad))
    ):
        try:
            return torch._grouped_mm(x_MI.contiguous(), w_EOI.transpose(1, 2), offs=ends)
        except RuntimeError:  # a dtype or device the kernel does not take (e.g. float32 on CUDA)
            pass
    out = x_MI.new_empty(x_MI.shape[0], w_EOI.shape[1])
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = x_MI[start:end] @ w_EOI[e].T
        start = end
    return out
