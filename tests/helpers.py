"""Helpers shared by several test modules (not collected as tests)."""

from __future__ import annotations

import torch

from moonbase.model.lora import Adapter, target_shapes


def random_adapter(cfg, rank: int, seed: int, name: str, scale: float = 0.2) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(cfg.n_layers):
        layer = {}
        for target, (d_in, d_out) in target_shapes(cfg).items():
            layer[target] = (torch.randn(rank, d_in, generator=g) * scale, torch.randn(d_out, rank, generator=g) * scale)
        layers.append(layer)
    return Adapter(name, tuple(layers))


def raw_variant_state(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The raw Phi-style key layout of variant files."""
    phi = {"qkv": "mixer.Wqkv", "proj": "mixer.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    state = {}
    for i, layer in enumerate(adapter.layers):
        for target, (a, b) in layer.items():
            prefix = f"text_model.transformer.h.{i}.{phi[target]}.parametrizations.weight.0"
            state[f"{prefix}.A"], state[f"{prefix}.B"] = a, b
    return state
