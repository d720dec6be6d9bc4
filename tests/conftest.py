from __future__ import annotations

import json
from pathlib import Path

import pytest

from moonbase.config import MOONDREAM3_KEYS
from moonbase.hub import tiny_random

REPO = Path(__file__).resolve().parents[1]
PARITY_ROOT = REPO.parent / "shared" / "parity"


@pytest.fixture(scope="session")
def tiny():
    return tiny_random(seed=0)


@pytest.fixture(scope="session")
def tiny_gqa():
    return tiny_random(seed=1, n_kv_heads=1)


def fixture_sets(family: str | None = None) -> list[Path]:
    """Golden fixture sets next to the repository; `family` "md2" or "md3" keeps one model family (Moondream 3
    sets have MoE/tau keys in their text config)."""
    sets = sorted(p.parent for p in PARITY_ROOT.glob("*/expected.json"))
    return [d for d in sets if family is None or ("md3" if _is_md3(d) else "md2") == family]


def _is_md3(directory: Path) -> bool:
    text = json.loads((directory / "config.json").read_text()).get("text", {})
    return any(text.get(k) for k in MOONDREAM3_KEYS)


@pytest.fixture(scope="session")
def tiny3():
    """A tiny random Moondream 3: tau attention, 4 experts top-2 from layer 1, the linear region head."""
    return tiny_random(seed=0, moondream3=True)
