"""Request bodies, validated before anything runs. Unknown keys are ignored (clients add their own), and
settings may come nested (`settings`) or at the top level, as some Moondream clients send them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

SETTING_KEYS = ("temperature", "top_p", "max_tokens", "max_objects", "seed")


class SkillRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    variant: str | None = None  # legacy adapter selector (0.1.x clients, npm)
    settings: dict[str, Any] | None = None

    def merged_settings(self) -> dict[str, Any]:
        """Nested settings win over top-level ones; `variant` is resolved separately (see `adapter`)."""
        extra = self.model_extra or {}
        top = {k: extra[k] for k in SETTING_KEYS if k in extra}
        nested = dict(self.settings or {})
        return top | {k: v for k, v in nested.items() if k != "variant"}

    def adapter(self) -> str | None:
        return self.variant or (self.settings or {}).get("variant")


class CaptionRequest(SkillRequest):
    image_url: str
    length: Literal["short", "normal", "long"] = "normal"
    stream: StrictBool = False


class QueryRequest(SkillRequest):
    question: str = Field(min_length=1)
    image_url: str | None = None
    stream: StrictBool = False
    reasoning: StrictBool = False
    spatial_refs: list[list[float]] | None = None


class DetectRequest(SkillRequest):
    image_url: str
    object: str = Field(min_length=1)


class PointRequest(DetectRequest):
    spatial_refs: list[list[float]] | None = None
