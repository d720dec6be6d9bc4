"""Weight containers and the few functional ops every model part shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp_weights(d_in: int, d_hidden: int, d_out: int) -> nn.ModuleDict:
    return nn.ModuleDict({"fc1": nn.Linear(d_in, d_hidden), "fc2": nn.Linear(d_hidden, d_out)})


def linear(x: torch.Tensor, w: nn.Module) -> torch.Tensor:
    if type(w) is nn.Linear:
        return F.linear(x, w.weight, w.bias)
    return w(x)  # a quantized linear layer (model/quant.py)


def layer_norm(x: torch.Tensor, w: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, w.normalized_shape, w.weight, w.bias, w.eps)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def mlp(x: torch.Tensor, w: nn.ModuleDict) -> torch.Tensor:
    return linear(gelu(linear(x, w["fc1"])), w["fc2"])
