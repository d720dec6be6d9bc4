"""LoRA adapters by name, loaded from disk once and kept (least recently used dropped first)."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import TextConfig
from ..errors import AdapterNotFoundError
from ..model.lora import Adapter, load_adapter

Source = Callable[[str], Path | Adapter | None]  # a name -> a variant file or directory, an Adapter, or None


class AdapterStore:
    """`get(name)`: an adapter registered under that name, or the first that one of `sources` finds (by
    default the name as a path to a variant file or directory; the fine-tuning service adds its
    `<finetune_id>@<step>` checkpoints in front). Loaded adapters live on the model's device."""

    def __init__(self, cfg: TextConfig, device: torch.device, dtype: torch.dtype, capacity: int = 8):
        self.cfg, self.device, self.dtype, self.capacity = cfg, device, dtype, capacity
        self.sources: list[Source] = [path_source]
        self._registered: dict[str, Adapter] = {}
        self._loaded: OrderedDict[str, Adapter] = OrderedDict()
        self._lock = threading.Lock()

    def add_source(self, source: Source) -> None:
        """Consulted before the sources already there."""
        self.sources.insert(0, source)

    def registered(self, name: str) -> bool:
        with self._lock:
            return name in self._registered

    def register(self, adapter: Adapter) -> None:
        with self._lock:
            self._registered[adapter.name] = adapter.to(self.device, self.dtype)
            self._loaded.pop(adapter.name, None)

    def get(self, name: str) -> Adapter:
        with self._lock:
            if name in self._registered:
                return self._registered[name]
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        found = next((f for source in self.sources if (f := source(name)) is not None), None)
        if found is None:
            raise AdapterNotFoundError(f"unknown adapter (variant) {name!r}")
        adapter = found if isinstance(found, Adapter) else load_adapter(found, self.cfg)
        adapter = dataclasses.replace(adapter, name=name).to(self.device, self.dtype)
        with self._lock:
            self._loaded[name] = adapter
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
        return adapter

    def forget(self, name: str) -> None:
        """Drop a loaded adapter (e.g. its checkpoint was deleted), so the next `get` resolves it again."""
        with self._lock:
            self._loaded.pop(name, None)


def path_source(name: str) -> Path | None:
    """The name as a path (the Python API's default; the server only lets a request name registered adapters
    and finetune checkpoints, or paths inside its --allow-adapter-paths directory)."""
    path = Path(name).expanduser()
    return path if path.exists() else None
