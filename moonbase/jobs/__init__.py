"""Jobs over many images: `moonbase batch` (folders, lists, JSONL, Parquet; resumable JSONL/Parquet output) and
`moonbase video`. Imported lazily, so that the command line's parser stays free of torch."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "batch": "run",
    "parse_tasks": "run",
    "run_batch": "run",
    "task_label": "run",
    "Item": "inputs",
    "count_inputs": "inputs",
    "read_inputs": "inputs",
    "Journal": "journal",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'moonbase.jobs' has no attribute {name!r}")


__all__ = list(_LAZY)
