import json

import pytest

from moonbase.config import ModelConfig, md2, md3
from moonbase.errors import ConfigError
from tests.conftest import fixture_sets


def test_md2_preset_derives_reference_constants():
    cfg = md2()
    assert cfg.prefix_len == 730
    assert cfg.vision.grid == 27 and cfg.vision.window_px == 266 and cfg.vision.margin_px == 56
    assert cfg.text.hd == 64 and cfg.text.qkv_dim == 6144
    assert cfg.region.coord_bins == 1024 and cfg.region.size_bins == 1024


def test_round_trip_through_dict():
    cfg = md2()
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("directory", fixture_sets(), ids=lambda p: p.name)
def test_reference_config_json_loads(directory):
    raw = json.loads((directory / "config.json").read_text())
    cfg = ModelConfig.from_file(directory / "config.json")
    assert cfg.text.dim == raw["text"]["dim"] and cfg.vision.enc_dim == raw["vision"]["enc_dim"]
    assert cfg.tokenizer.query_prefix == tuple(raw["tokenizer"]["templates"]["query"]["prefix"])


@pytest.mark.parametrize("directory", fixture_sets("md3"), ids=lambda p: p.name)
def test_moondream3_config_json_takes_moondream3_conventions(directory):
    raw = json.loads((directory / "config.json").read_text())
    cfg = ModelConfig.from_file(directory / "config.json")
    assert cfg.text.moe is not None and cfg.text.moe.num_experts == raw["text"]["moe"]["num_experts"]
    assert cfg.text.tau_attn and cfg.region.decoder_arch == "linear" and cfg.region.use_ln
    # what its config.json does not say comes from Moondream 3, not Moondream 2
    assert not cfg.tokenizer.repeat_query_suffix and cfg.tokenizer.restricted_object_decisions
    assert cfg.defaults == md3().defaults and cfg.defaults.reasoning
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_md3_preset():
    cfg = md3()
    assert cfg.prefix_len == 730 and cfg.text.qkv_dim == 6144 and cfg.text.rope_theta == 1.5e6
    assert [cfg.text.is_moe(i) for i in (0, 3, 4, 23)] == [False, False, True, True]
    assert cfg.tokenizer.segment_prefix == (1, 17374, 2) and md2().tokenizer.segment_prefix == ()
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_tau_attention_needs_one_kv_head_per_query_head():
    d = md3().to_dict()
    d["text"]["n_kv_heads"] = 8
    with pytest.raises(ConfigError, match="tau attention"):
        ModelConfig.from_dict(d)


def test_hf_wrapper_config_means_md2(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["HfMoondream"], "config": {}, "model_type": "moondream1"})
    )
    assert ModelConfig.from_file(tmp_path / "config.json") == md2()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"text": {"dimm": 3}}, "unknown text config keys"),
        ({"textt": {}}, "unknown config sections"),
        ({"text": {"n_heads": 32, "n_kv_heads": 5}}, "multiple of n_kv_heads"),
        ({"vision": {"crop_size": 380}}, "not a multiple of patch"),
        ({"text": {"vocab_size": 1000}}, "does not fit vocab_size"),
        ({"text": {"max_context": 700}}, "does not fit max_context"),
        ({"region": {"size_decoding": "cubic"}}, "size_decoding"),
    ],
)
def test_invalid_configs_are_rejected(bad, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(bad)
