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


def _perturbed(src, tmp_path, suffix: str, change) -> str:
    """A copy of fixture set `src` whose first tensor named `...suffix` went through `change`."""
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    name = next(k for k in sorted(weights) if k.endswith(suffix))
    weights[name] = change(weights[name])
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


@pytest.mark.skipif(not SETS, reason="no parity fixtures next to the repository (../shared/parity)")
def test_parity_fails_on_a_perturbed_model(tmp_path, capsys):
    assert main(["parity", _perturbed(SETS[0], tmp_path, "text.blocks.0.mlp.fc2.bias", lambda t: t + 0.05)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "prefill logits" in out


MD3_SETS = fixture_sets("md3")


@pytest.mark.skipif(not MD3_SETS, reason="no Moondream 3 parity fixtures next to the repository")
def test_parity_fails_when_routing_changes(tmp_path, capsys):
    """Routing is discrete: one expert favoured by its router bias changes the chosen sets, and parity says so."""
    favour = lambda t: t + torch.nn.functional.one_hot(torch.tensor(0), t.shape[0]).to(t.dtype) * 20  # noqa: E731
    assert main(["parity", _perturbed(MD3_SETS[0], tmp_path, "mlp.router.bias", favour)]) == 1
    assert "expert sets" in "\n".join(line for line in capsys.readouterr().out.splitlines() if "FAIL" in line)
