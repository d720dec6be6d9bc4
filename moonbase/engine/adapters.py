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


class AdapterStore:
    """`get(name)`: an adapter registered under that name, or one loaded from `resolve(name)` (by default
    the name as a path to a variant file or directory; a hook may also return the Adapter itself, as the
    fine-tuning registry does). Loaded adapters live on the model's device."""

    def __init__(
        self,
        cfg: TextConfig,
        device: torch.device,
        dtype: torch.dtype,
        resolve: Callable[[str], Path | Adapter | None] | None = None,
        capacity: int = 8,
    ):
        self.cfg, self.device, self.dtype, self.capacity = cfg, device, dtype, capacity
        self.resolve = resolve or _as_path
        self._registered: dict[str, Adapter] = {}
        self._loaded: OrderedDict[str, Adapter] = OrderedDict()
        self._lock = threading.Lock()

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
        found = self.resolve(name)
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


def _as_path(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path if path.exists() else None
