import json

import pytest

from moonbase.config import ModelConfig, md2
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
def test_moondream3_config_is_refused_with_a_clear_message(directory):
    with pytest.raises(ConfigError, match="Moondream 3 configuration"):
        ModelConfig.from_file(directory / "config.json")


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
