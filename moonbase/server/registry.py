"""Which served model a request's `model` field names: `<base>`, or `<base>/<finetune_id>@<step>` for an
adapter. The official tuning client always writes the base as `moondream3-preview`, so a known alias
maps to the served base when only one is served."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..api import VL
from ..errors import ModelNotFoundError

ALIASES = ("moondream3-preview", "moondream3", "moondream2", "moondream-2", "moondream")


@dataclass
class Selection:
    name: str
    vl: VL
    adapter: str | None


@dataclass
class ModelRegistry:
    models: dict[str, VL]
    default: str
    aliases: tuple[str, ...] = field(default=ALIASES)

    def select(self, model: str | None, variant: str | None = None) -> Selection:
        base, adapter = (model or self.default), variant
        if "/" in base and "@" in base.rsplit("/", 1)[1]:
            base, adapter = base.rsplit("/", 1)
        base = base.removeprefix("moondream/") if base.removeprefix("moondream/") in self.models else base
        if base not in self.models:
            if base in self.aliases and len(self.models) == 1:
                base = self.default
            else:
                raise ModelNotFoundError(f"model {base!r} is not served here; served: {', '.join(self.models)}")
        return Selection(base, self.models[base], adapter)
