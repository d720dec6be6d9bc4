import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from moonbase.config import md2, md3
from moonbase.errors import CheckpointError
from moonbase.hub import load_dir, save_dir
from moonbase.model.moondream import build_model
from moonbase.weights import check_sources, dequantize_int4, plan_sources
from tests.conftest import PARITY_ROOT


def _meta_shapes(cfg):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


@pytest.mark.parametrize("manifest", ["md2-2b-manifest.json", "md2-2b-int4-manifest.json"])
def test_published_checkpoint_layouts_are_accepted(manifest):
    path = PARITY_ROOT / manifest
    if not path.is_file():
        pytest.skip(f"{path} not present")
    header = {t["name"]: tuple(t["shape"]) for t in json.loads(path.read_text())["tensors"]}
    sources, problems = plan_sources(header)
    assert problems == []
    assert check_sources(sources, _meta_shapes(md2()), header) == []
    assert len(sources) == 592  # every model tensor, int4 or not
    assert sum(s.int4 for s in sources.values()) == (0 if "int4" not in manifest else 24 * 4 + 6)


def test_wrong_checkpoint_lists_missing_unexpected_and_misshaped(tmp_path, tiny):
    state = {"model." + k: v.clone() for k, v in tiny.w.state_dict().items()}
    del state["model.text.post_ln.bias"]
    state["model.text.extra.weight"] = torch.zeros(3)
    state["model.text.lm_head.bias"] = torch.zeros(7)
    save_dir(tiny, tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_dir(tmp_path)
    msg = str(e.value)
    assert "1 missing" in msg and "text.post_ln.bias" in msg
    assert "1 unexpected" in msg and "text.extra.weight" in msg
    assert "1 mis-shaped" in msg and "text.lm_head.bias: checkpoint (7,)" in msg


def test_round_trip_and_prefix_free_checkpoint_with_buffers(tmp_path, tiny):
    save_dir(tiny, tmp_path)
    loaded = load_dir(tmp_path)
    for k, v in tiny.w.state_dict().items():
        assert torch.equal(loaded.w.state_dict()[k], v)
    # the reference fine-tuning scripts save without "model." and with KV-cache buffers
    state = {k: v for k, v in tiny.w.state_dict().items()}
    state["text.blocks.0.kv_cache.k_cache"] = torch.zeros(1, 2, 8, 16)
    state["text.freqs_cis"] = torch.zeros(4)
    save_file(state, str(tmp_path / "model.safetensors"))
    assert torch.equal(load_dir(tmp_path).w.text.wte, tiny.w.text.wte)


def _legacy_name(name: str) -> str:
    """Hand-written 2024 layout names (independent of the loader's table)."""
    v, t = "vision_encoder.encoder.model.visual.", "text_model.transformer."
    rules = [
        ("vision.patch_emb.", v + "patch_embed.linear."),
        ("vision.pos_emb", v + "pos_embed"),
        ("vision.post_ln.", v + "norm."),
        ("vision.proj_mlp.", "vision_encoder.projection.mlp."),
        ("text.wte", t + "embd.wte.weight"),
        ("text.post_ln.", "text_model.lm_head.ln."),
        ("text.lm_head.", "text_model.lm_head.linear."),
        ("region.coord_features", "region_model.coordinate_features.weight"),
        ("region.size_features", "region_model.size_features.weight"),
        ("region.coord_", "region_model.coordinate_"),
        ("region.size_", "region_model.size_"),
    ]
    if name.startswith("vision.blocks."):
        return v + name[len("vision.") :].replace(".ln1.", ".norm1.").replace(".ln2.", ".norm2.")
    if name.startswith("text.blocks."):
        n = name.replace("text.blocks.", t + "h.")
        return n.replace(".attn.qkv.", ".mixer.Wqkv.").replace(".attn.proj.", ".mixer.out_proj.")
    for ours, legacy in rules:
        if name.startswith(ours):
            return legacy + name[len(ours) :]
    raise AssertionError(name)


def test_legacy_layout_with_transposed_features(tmp_path, tiny):
    save_dir(tiny, tmp_path)
    state = {}
    for k, v in tiny.w.state_dict().items():
        state[_legacy_name(k)] = v.T.contiguous() if k.endswith("_features") else v.clone()
    state["text_model.transformer.h.0.mixer.Wqkv._orig_mod.weight"] = state.pop("text_model.transformer.h.0.mixer.Wqkv.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load_dir(tmp_path)
    for k, v in tiny.w.state_dict().items():
        assert torch.equal(loaded.w.state_dict()[k], v), k


def _quantize_int4(w: torch.Tensor, group: int):
    """Test-side reference packer: asymmetric uint4 per group of `group` row-major weights."""
    g = w.reshape(-1, group)
    lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    scale = (hi - lo).clamp_min(1e-8) / 15
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale + zero), 0, 15).to(torch.uint8)
    half = q.shape[0] // 2
    return (q[:half] << 4) | q[half:], scale, zero, (q.float() - zero) * scale


def test_int4_dequantization_layout():
    w = torch.randn(8, 64)
    packed, scale, zero, expect = _quantize_int4(w, 16)
    assert packed.shape == (8 * 64 // 32, 16)
    assert torch.allclose(dequantize_int4(packed, scale, zero, (8, 64)), expect.reshape(8, 64))


def test_int4_checkpoint_loads(tmp_path, tiny):
    save_dir(tiny, tmp_path)
    state = {"model." + k: v.clone() for k, v in tiny.w.state_dict().items()}
    expected = {}
    for name in ["text.blocks.0.attn.qkv.weight", "region.coord_decoder.fc1.weight"]:
        packed, scale, zero, deq = _quantize_int4(state.pop("model." + name), 32)
        state |= {f"model.{name}.packed": packed, f"model.{name}.scale": scale, f"model.{name}.zero_point": zero}
        expected[name] = deq.reshape(tiny.w.state_dict()[name].shape)
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load_dir(tmp_path)
    assert loaded.cfg.text.group_size == 32
    for name, deq in expected.items():
        assert torch.allclose(loaded.w.state_dict()[name], deq)
    del state["model.region.coord_decoder.fc1.weight.scale"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="incomplete int4 weight region.coord_decoder.fc1.weight"):
        load_dir(tmp_path)


def test_missing_files_and_garbage(tmp_path, tiny):
    from moonbase.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="has no model.safetensors"):
        load_dir(tmp_path)
    save_dir(tiny, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_dir(tmp_path)


def test_moondream3_manifest_is_accepted_on_the_meta_device():
    path = PARITY_ROOT / "md3-manifest.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    manifest = json.loads(path.read_text())
    header = {t["name"]: tuple(t["shape"]) for t in manifest["tensors"]}
    sources, problems = plan_sources(header)
    assert problems == [] and check_sources(sources, _meta_shapes(md3()), header) == []
    assert len(sources) == 662
    assert sum(math.prod(s) for s in _meta_shapes(md3()).values()) == manifest["n_elements"]


def _shard(tmp_path, m, n_shards: int):
    """`m` saved as a Hugging Face sharded checkpoint: n shard files and their index."""
    save_dir(m, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        part = names[i::n_shards]
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(tmp_path / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def test_a_sharded_moondream3_checkpoint_loads_shard_by_shard(tmp_path, tiny3):
    state = _shard(tmp_path, tiny3, 3)
    m = load_dir(tmp_path)
    assert m.cfg == tiny3.cfg
    for k, v in m.w.state_dict().items():
        assert torch.equal(v, state["model." + k]), k


def test_a_wrong_shard_set_fails_with_the_readable_list(tmp_path, tiny3):
    _shard(tmp_path, tiny3, 2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.text.blocks.1.mlp.router.weight"] = "model-00009-of-00009.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file beside it"):
        load_dir(tmp_path)
    del index["weight_map"]["model.text.blocks.1.mlp.router.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"1 missing:\n\s+text.blocks.1.mlp.router.weight"):
        load_dir(tmp_path)


def test_kestrel_fp8_checkpoints_are_refused_with_a_message(tmp_path):
    (tmp_path / "model_fp8.pt").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="FP8"):
        load_dir(tmp_path)


def test_a_gated_hub_repo_says_how_to_get_access(monkeypatch):
    """moondream/moondream3-preview is gated: the error says what to do, and its short name resolves to it."""
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    from moonbase.errors import ModelNotFoundError
    from moonbase.hub import load

    asked = []

    def gated(repo_id, **_):
        asked.append(repo_id)
        response = httpx.Response(401, request=httpx.Request("GET", f"https://huggingface.co/{repo_id}"))
        raise GatedRepoError("401 Client Error: access to this model is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(ModelNotFoundError, match=r"is gated: request access .* `huggingface-cli login`"):
        load("moondream3-preview")
    assert asked == ["moondream/moondream3-preview"]
