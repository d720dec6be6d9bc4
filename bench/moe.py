"""One Moondream 3 mixture-of-experts layer (random weights), three ways, side by side in one run:

- grouped: assignments sorted by expert, one grouped matmul per projection (`moonbase.model.moe`, what the
  model runs);
- per-token loop: every token, each of its k experts, one matrix-vector product at a time;
- dense-equivalent: every expert on every token, then the k chosen ones weighted (E/k times the work).

At the tiny fixture sizes and at the real layer sizes (dim 2048, 64 experts, top-8, inner 1024), for a decode
step (1 token), a small batch and a prompt. Prints JSON; record it with the machine it ran on.

python bench/moe.py [--sizes tiny,real] [--tokens 1,16,256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moonbase.bench import machine
from moonbase.config import MoEConfig
from moonbase.model.moe import expert_activation, grouped_experts, moe_weights, route

SIZES = {"tiny": (128, MoEConfig(8, 0, 2, 64)), "real": (2048, MoEConfig(64, 0, 8, 1024))}


def per_token(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, g in zip(ids[t].tolist(), weights[t], strict=True):
            out[t] += g * (fc2[e] @ expert_activation(fc1[e] @ x[t]))
    return out


def dense(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    y = torch.einsum("eoi,nei->neo", fc2, expert_activation(torch.einsum("eoi,ni->neo", fc1, x)))  # (N, E, dim)
    return (y.gather(1, ids[..., None].expand(-1, -1, y.shape[-1])) * weights[..., None]).sum(1)


def timed(fn, repeat: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


@torch.no_grad()
def run(size: str, n_tokens: int, repeat: int) -> dict:
    dim, moe = SIZES[size]
    g = torch.Generator().manual_seed(0)
    w = moe_weights(dim, moe)
    for p in w.parameters():
        p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
    x = torch.randn(n_tokens, dim, generator=g)
    _, ids, weights = route(x, w, moe.experts_per_token)
    fc1, fc2 = w.fc1.weight, w.fc2.weight
    row = {"size": size, "dim": dim, "experts": moe.num_experts, "top_k": moe.experts_per_token, "tokens": n_tokens}
    t_grouped, ref = timed(lambda: grouped_experts(x, ids, weights, fc1, fc2), repeat)
    row["grouped_ms"] = round(1e3 * t_grouped, 3)
    for name, fn in (("per_token", per_token), ("dense", dense)):
        t, out = timed(lambda fn=fn: fn(x, ids, weights, fc1, fc2), repeat)
        row[f"{name}_ms"] = round(1e3 * t, 3)
        row[f"{name}_over_grouped"] = round(t / t_grouped, 2)
        row[f"{name}_max_abs_diff"] = float((out - ref).abs().max())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,real")
    ap.add_argument("--tokens", default="1,16,256")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rows = [run(s, int(n), a.repeat) for s in a.sizes.split(",") for n in a.tokens.split(",")]
    print(json.dumps({"bench": "moe-layer", "machine": machine(torch.device("cpu")), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
