"""Fine-tuning: LoRA adapters trained by SFT and RL (GRPO), a store of finetunes on disk, and the
service behind the tuning API. See docs/finetuning.md.

    from moonbase.finetune import FinetuneStore, TuningService, RunConfig, fine_tune, from_iterable, load_jsonl
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoraConfig": "lora",
    "TrainableLora": "lora",
    "FinetuneStore": "store",
    "TuningService": "service",
    "StepConfig": "trainer",
    "Trainer": "trainer",
    "load_jsonl": "data",
    "from_iterable": "data",
    "RunConfig": "run",
    "fine_tune": "run",
}
__all__ = sorted(_EXPORTS)


# Imported on first use: every `moonbase` command imports this package (through `.cli`), and the modules behind
# these names import torch; `moonbase --help` and `import moonbase.finetune.cli` stay free of it.
def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
