"""The one sampler: temperature and nucleus (top-p) sampling, per row, greedy where temperature is 0."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sample(
    logits_BV: torch.Tensor,
    temperature_B: torch.Tensor,
    top_p_B: torch.Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
    any_hot: bool | None = None,
) -> torch.Tensor:
    """Token ids (B,). Top-p keeps a token when the probability mass ranked before it is <= top_p (the top
    token is always kept). The draw is an exponential race (argmax p/E, E ~ Exp(1)), which picks token i
    with probability p_i / sum(p) without renormalizing; `generators` make each row reproducible.
    `any_hot`: whether some temperature is > 0, when the caller knows (saves waiting for the device)."""
    greedy = logits_BV.argmax(-1)
    hot = temperature_B > 0
    if not (bool(hot.any()) if any_hot is None else any_hot):
        return greedy
    temp = torch.where(hot, temperature_B, torch.ones_like(temperature_B))
    probs = torch.softmax(logits_BV.float() / temp[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p_B[:, None], 0.0)
    noise = torch.empty_like(sorted_p)
    for i in range(noise.shape[0]):
        noise[i].exponential_(generator=generators[i] if generators else None)
    drawn = order.gather(-1, (sorted_p / noise).argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(hot, drawn, greedy)
