"""int8 linear layers for CPU decode: per-output-channel int8 weights, activations quantized on the fly
(fbgemm on x86). Decode on a CPU is bound by reading weights; int8 reads a quarter of the bytes of fp32."""

from __future__ import annotations

import warnings

import torch
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float().cpu()
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; fbgemm's kernels are still the fast path
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        bias = None if lin.bias is None else lin.bias.detach().float().cpu()
        self.packed = torch.ops.quantized.linear_prepack(q, bias)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, so the int16 accumulation cannot overflow on CPUs without VNNI
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


def int8_text(text_w: nn.Module) -> nn.Module:
    """The text decoder's weight tree with every block linear and the LM head in int8; embeddings, layer
    norms, tau parameters and mixture-of-experts layers (their experts are 3-D stacks) are shared with
    `text_w`, not copied."""
    q = nn.Module()
    q.wte = text_w.wte
    q.blocks = nn.ModuleList(_int8_block(block) for block in text_w.blocks)
    q.post_ln = text_w.post_ln
    q.lm_head = Int8Linear(text_w.lm_head)
    return q


def _int8_block(block: nn.ModuleDict) -> nn.ModuleDict:
    attn = nn.ModuleDict({k: Int8Linear(block["attn"][k]) for k in ("qkv", "proj")})
    if "tau" in block["attn"]:
        attn["tau"] = block["attn"]["tau"]
    moe = hasattr(block["mlp"], "router")
    mlp = block["mlp"] if moe else nn.ModuleDict({k: Int8Linear(block["mlp"][k]) for k in ("fc1", "fc2")})
    return nn.ModuleDict({"ln": block["ln"], "attn": attn, "mlp": mlp})
