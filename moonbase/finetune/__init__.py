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


# Imported on first use. Not to defer torch (`moonbase/__init__` imports it first): every `moonbase` command
# (through `.cli`) and the server (through `.registry`) import this package, and the modules behind these names
# (service, trainer, sft, rl, data, ...) would add 0.06-0.12 s to each start (measured on 2 CPU cores).
def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
