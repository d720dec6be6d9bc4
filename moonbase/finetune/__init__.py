"""Fine-tuning: LoRA adapters trained by SFT and RL (GRPO), a registry of finetunes on disk, and the
service behind the tuning API. See docs/finetuning.md.

    from moonbase.finetune import Registry, TuningService, RunConfig, fine_tune, from_iterable, load_jsonl
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoraConfig": "lora",
    "TrainableLora": "lora",
    "Registry": "registry",
    "TuningService": "service",
    "StepConfig": "trainer",
    "Trainer": "trainer",
    "load_jsonl": "data",
    "from_iterable": "data",
    "RunConfig": "run",
    "fine_tune": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # imported on first use: the CLI imports this package before it needs torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
