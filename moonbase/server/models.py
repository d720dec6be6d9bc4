"""Which served model a request's `model` field names: `<base>`, or `<base>/<finetune_id>@<step>` for an
adapter. The official tuning client always writes the base as `moondream3-preview`, so a known alias
maps to the served base when only one is served.

Adapters named by a request: a registered adapter or a finetune checkpoint, and a file only inside the
directory the server allows (`--allow-adapter-paths`). A request never makes the server open a path of
its choosing, and the refusal says nothing about the filesystem."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..api import VL
from ..errors import AdapterNotFoundError, ModelNotFoundError, SettingsError
from ..finetune.store import CHECKPOINT

ALIASES = ("moondream3-preview", "moondream3", "moondream2", "moondream-2", "moondream")


@dataclass(frozen=True)
class Selection:
    name: str
    vl: VL
    adapter: str | None


@dataclass
class ServedModels:
    models: dict[str, VL]
    default: str

    def select(self, model: str | None, variant: str | None = None) -> Selection:
        if model is not None and not isinstance(model, str):
            raise SettingsError("model must be a string")
        base, adapter = (model or self.default), variant
        if "/" in base and "@" in base.rsplit("/", 1)[1]:
            base, adapter = base.rsplit("/", 1)
        base = base.removeprefix("moondream/") if base.removeprefix("moondream/") in self.models else base
        if base not in self.models:
            if base in ALIASES and len(self.models) == 1:
                base = self.default
            else:
                raise ModelNotFoundError(f"model {base!r} is not served here; served: {', '.join(self.models)}")
        return Selection(base, self.models[base], adapter)


def checked_adapter(sel: Selection, finetunes: bool, allowed_dir: Path | None) -> str | None:
    """The adapter name a request may use, as the engine should look it up (a file inside `allowed_dir`
    becomes its resolved path)."""
    name = sel.adapter
    if name is None or sel.vl.engine.adapters.registered(name) or (finetunes and CHECKPOINT.fullmatch(name)):
        return name
    if allowed_dir is not None:
        root = allowed_dir.resolve()
        path = (root / name).resolve()  # symlinks and `..` resolved before the check
        if not path.is_relative_to(root):
            raise SettingsError("an adapter path must lie inside the directory this server allows (--allow-adapter-paths)")
        if not path.exists():
            raise AdapterNotFoundError(f"unknown adapter {name!r}")
        return str(path)
    if CHECKPOINT.fullmatch(name):
        raise AdapterNotFoundError(f"unknown adapter {name!r}: this server has no finetune store")
    if Path(name).name != name or name.startswith(("~", ".")):
        raise SettingsError(
            "adapters are chosen by name (a registered adapter or <finetune_id>@<step>); this server does not load "
            "adapter files named by a request (start it with --allow-adapter-paths DIR to allow files inside DIR)"
        )
    raise AdapterNotFoundError(f"unknown adapter {name!r}")
