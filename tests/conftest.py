from __future__ import annotations

from pathlib import Path

import pytest

from moonbase.hub import tiny_random

REPO = Path(__file__).resolve().parents[1]
PARITY_ROOT = REPO.parent / "shared" / "parity"


@pytest.fixture(scope="session")
def tiny():
    return tiny_random(seed=0)


@pytest.fixture(scope="session")
def tiny_gqa():
    return tiny_random(seed=1, n_kv_heads=1)


def fixture_sets() -> list[Path]:
    return sorted(p.parent for p in PARITY_ROOT.glob("*/expected.json"))
