"""LoRA adapters in the Moondream variant convention: loading, shape checks, and the maths."""

from __future__ import annotations

import pytest
import torch

from moonbase.errors import CheckpointError
from moonbase.model.lora import TARGETS, LoraBatch, adapter_from_state_dict, load_adapter
from moonbase.model.text import decoder

from .helpers import random_adapter, raw_variant_state


def test_variant_files_load_from_raw_and_renamed_keys(tiny, tmp_path):
    cfg = tiny.cfg.text
    adapter = random_adapter(cfg, 4, 0, "x")
    torch.save(raw_variant_state(adapter), tmp_path / "final.pt")
    loaded = load_adapter(tmp_path / "final.pt", cfg)
    assert loaded.rank == 4
    for want, got in zip(adapter.layers, loaded.layers, strict=True):
        assert set(got) == set(TARGETS)
        assert all(torch.equal(want[t][0], got[t][0]) and torch.equal(want[t][1], got[t][1]) for t in TARGETS)
    renamed = {f"text.blocks.0.attn.qkv.{p}": t for p, t in zip("AB", adapter.layers[0]["qkv"], strict=True)}
    assert set(adapter_from_state_dict("y", renamed, cfg).layers[0]) == {"qkv"}


def test_bad_adapters_are_rejected_with_the_reason(tiny):
    cfg = tiny.cfg.text
    a, b = random_adapter(cfg, 4, 0, "x").layers[0]["qkv"]
    with pytest.raises(CheckpointError, match="expected A"):
        adapter_from_state_dict("bad", {"text.blocks.0.attn.qkv.A": a[:, :-1], "text.blocks.0.attn.qkv.B": b}, cfg)
    with pytest.raises(CheckpointError, match="needs A and B"):
        adapter_from_state_dict("bad", {"text.blocks.0.attn.qkv.A": a}, cfg)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        adapter_from_state_dict("bad", {"vision.blocks.0.attn.qkv.A": a}, cfg)
    with pytest.raises(CheckpointError, match="within"):
        adapter_from_state_dict(
            "bad", {f"text.blocks.{cfg.n_layers}.attn.qkv.{p}": t for p, t in zip("AB", (a, b), strict=True)}, cfg
        )


def _explicit_decoder(x, w, cfg, rope, adapter):
    """The variant rule written out with merged weights: W' = W + B A for qkv, fc1, fc2; proj's delta
    reads the attention input."""
    import torch.nn.functional as F

    from moonbase.model.rope import apply_rope, rope_rows

    b, t, _ = x.shape
    pos = torch.arange(t)
    cos, sin = rope_rows(rope[0][pos], rope[1][pos])
    hd, nq, nkv = cfg.hd, cfg.n_heads, cfg.n_kv_heads
    for i, block in enumerate(w.blocks):
        lo = adapter.layers[i]
        h = F.layer_norm(x, block["ln"].normalized_shape, block["ln"].weight, block["ln"].bias, block["ln"].eps)
        qkv = F.linear(h, block["attn"]["qkv"].weight + lo["qkv"][1] @ lo["qkv"][0], block["attn"]["qkv"].bias)
        q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        q = apply_rope(q.view(b, t, nq, hd).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, t, nkv, hd).transpose(1, 2), cos, sin)
        v = v.view(b, t, nkv, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nq != nkv).transpose(1, 2).reshape(b, t, -1)
        attn = F.linear(a, block["attn"]["proj"].weight, block["attn"]["proj"].bias) + h @ lo["proj"][0].T @ lo["proj"][1].T
        g = F.gelu(
            F.linear(h, block["mlp"]["fc1"].weight + lo["fc1"][1] @ lo["fc1"][0], block["mlp"]["fc1"].bias), approximate="tanh"
        )
        x = x + attn + F.linear(g, block["mlp"]["fc2"].weight + lo["fc2"][1] @ lo["fc2"][0], block["mlp"]["fc2"].bias)
    return x


def test_decoder_applies_each_rows_adapter(tiny):
    cfg = tiny.cfg.text
    ad1, ad2 = random_adapter(cfg, 4, 1, "one"), random_adapter(cfg, 8, 2, "two")
    x = torch.randn(3, 5, cfg.dim, generator=torch.Generator().manual_seed(0))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    lora = LoraBatch([ad1, ad2], [2, 0, 1], torch.device("cpu"))
    got = decoder(x, tiny.w.text, cfg, tiny.rope, torch.arange(5), causal, lora=lora)
    base = decoder(x, tiny.w.text, cfg, tiny.rope, torch.arange(5), causal)
    torch.testing.assert_close(got[1], base[1])
    torch.testing.assert_close(got[0], _explicit_decoder(x[:1], tiny.w.text, cfg, tiny.rope, ad2)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[2], _explicit_decoder(x[2:], tiny.w.text, cfg, tiny.rope, ad1)[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], base[0], atol=1e-3)
