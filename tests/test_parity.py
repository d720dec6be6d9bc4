"""The parity command on every golden fixture set, and proof that it fails when the model is wrong."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moonbase.cli import main
from tests.conftest import fixture_sets

SETS = fixture_sets()


@pytest.mark.skipif(not SETS, reason="no parity fixtures next to the repository (../shared/parity)")
@pytest.mark.parametrize("directory", SETS, ids=lambda p: p.name)
def test_parity_passes(directory, capsys):
    assert main(["parity", str(directory)]) == 0
    assert " 0 failed" in capsys.readouterr().out


@pytest.mark.skipif(not SETS, reason="no parity fixtures next to the repository (../shared/parity)")
def test_parity_fails_on_a_perturbed_model(tmp_path, capsys):
    src = SETS[0]
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    name = next(k for k in weights if k.endswith("text.blocks.0.mlp.fc2.bias"))
    weights[name] = weights[name] + torch.tensor(0.05, dtype=weights[name].dtype)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    assert main(["parity", str(dst)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "prefill logits" in out
