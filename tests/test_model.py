import math

import pytest
import torch

from moonbase.config import RegionConfig, md2
from moonbase.model import region
from moonbase.model.rope import apply_rope, k_to_interleaved, rope_rows, rope_table
from moonbase.model.text import KVCache, prefix_lm_mask


def _interleaved_rope(x, cos, sin):
    """The reference layout: rotate pairs (j, j+16) and write them back interleaved (r0, i0, r1, i1, ...)."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    r, i = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    return torch.cat([torch.stack([r, i], -1).flatten(-2), x[..., 2 * half :]], -1)


def test_rope_layouts_give_equal_scores_and_permuted_keys():
    cos, sin = rope_table(32, 64, 10000.0)
    q, k = torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64)
    pos = torch.arange(5, 15)
    rows = rope_rows(cos[pos], sin[pos])
    qn, kn = apply_rope(q, *rows), apply_rope(k, *rows)
    qi, ki = _interleaved_rope(q, cos[pos], sin[pos]), _interleaved_rope(k, cos[pos], sin[pos])
    assert torch.allclose(qn @ kn.transpose(-1, -2), qi @ ki.transpose(-1, -2), atol=1e-4)
    assert torch.allclose(k_to_interleaved(kn, 32), ki, atol=1e-6)
    assert not torch.allclose(kn, ki)
    assert torch.equal(apply_rope(q, *rope_rows(cos[:10], sin[:10]))[..., 32:], q[..., 32:])  # pass-through dims
    c, s, x1, x2 = cos[pos], sin[pos], q[..., :16], q[..., 16:32]  # the textbook rotation, bit for bit
    assert torch.equal(qn[..., :32], torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1))


def test_rope_frequencies():
    cos, sin = rope_table(32, 4, 10000.0)
    assert cos.shape == (4, 16)
    assert math.isclose(float(torch.atan2(sin[1, 3], cos[1, 3])), 10000 ** (-6 / 32), rel_tol=1e-6)


def test_prefix_lm_mask():
    m = prefix_lm_mask(torch.arange(0, 6), 6, prefix_len=3)
    assert m[0, 2] and m[2, 0]  # bidirectional inside the prefix
    assert not m[2, 3] and m[3, 2] and not m[3, 4] and m[5, 0]
    assert prefix_lm_mask(torch.tensor([7]), 8, prefix_len=3) is None  # one decode step sees everything


@pytest.mark.parametrize("cfg", [md2().region, RegionConfig(coord_out_dim=256, size_out_dim=512, size_min_log2=-8)])
def test_region_bins_round_trip(cfg):
    for b in range(cfg.coord_bins):
        value = float(region.coord_from_bin(torch.tensor(b), cfg))
        assert region.coord_to_bin(value, cfg) == b
    for b in range(cfg.size_bins):
        value = float(region.size_from_bin(torch.tensor(b), cfg))
        assert region.size_to_bin(value, cfg) == b
    assert float(region.size_from_bin(torch.tensor(cfg.size_bins - 1), cfg)) == 1.0
    assert float(region.size_from_bin(torch.tensor(0), cfg)) == pytest.approx(2**cfg.size_min_log2)
    assert region.size_to_bin(1e-9, cfg) == 0 and region.size_to_bin(5.0, cfg) == cfg.size_bins - 1


def test_linear_size_decoding_for_old_checkpoints():
    cfg = RegionConfig(size_decoding="linear")
    assert float(region.size_from_bin(torch.tensor(512), cfg)) == 0.5
    assert region.size_to_bin(0.5, cfg) == 512


def test_fourier_features_cos_first():
    w = torch.tensor([[0.25, 0.5]])
    f = region.fourier(torch.tensor([[1.0]]), w)
    assert torch.allclose(f, torch.tensor([[0.0, -1.0, 1.0, 0.0]]), atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_gqa"])
def test_incremental_decode_equals_single_pass(fixture, request):
    m = request.getfixturevalue(fixture)
    img = m.prefill_image(torch.randn(m.cfg.vision.n_patches, m.cfg.text.dim))
    x = m.embed_ids(list(range(10, 22)))
    with torch.no_grad():
        full = m.hidden(m.new_cache(img), x[None])[0]
        cache = m.new_cache(img)
        parts = [m.hidden(cache, x[None, :4])[0]] + [m.hidden(cache, x[None, i : i + 1])[0] for i in range(4, 12)]
    assert torch.allclose(torch.cat(parts), full, atol=1e-5)


def test_gqa_matches_repeated_heads(tiny_gqa):
    """A 1-kv-head model equals the same weights expanded to full multi-head attention."""
    import dataclasses

    from moonbase.model.moondream import Moondream, build_model

    m = tiny_gqa
    cfg = m.cfg
    mha_cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, n_kv_heads=cfg.text.n_heads))
    mha = build_model(mha_cfg)
    state = dict(m.w.state_dict())
    hd, nq, nkv = cfg.text.hd, cfg.text.n_heads, cfg.text.n_kv_heads
    for i in range(cfg.text.n_layers):
        for p in ("weight", "bias"):
            t = state[f"text.blocks.{i}.attn.qkv.{p}"]
            q, k, v = t.split([nq * hd, nkv * hd, nkv * hd])
            rep = lambda z: z.reshape(nkv, hd, *z.shape[1:]).repeat_interleave(nq // nkv, 0).reshape(nq * hd, *z.shape[1:])  # noqa: E731
            state[f"text.blocks.{i}.attn.qkv.{p}"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    other = Moondream(mha_cfg, mha, m.tokenizer)
    x = m.embed_ids(list(range(10, 20)))[None]
    with torch.no_grad():
        a = m.hidden(KVCache(cfg.text, 1, m.device, m.dtype, prefix_len=3), x)
        b = other.hidden(KVCache(mha_cfg.text, 1, m.device, m.dtype, prefix_len=3), x)
    assert torch.allclose(a, b, atol=1e-5)


def test_context_limit_is_enforced(tiny):
    cache = KVCache(tiny.cfg.text, 1, tiny.device, tiny.dtype)
    with pytest.raises(ValueError, match="exceeds max_context"):
        cache.reserve(tiny.cfg.text.max_context + 1)
