"""Skills: each one validates its arguments, builds its prompt, creates its engine program and renders its
result, for every path alike (the Python API, the server, rollouts, bench and eval), and says what
fine-tuning needs (targets, the moves that teach them, rewards). Adding a skill is one module plus one line
in `REGISTRY`.

    req = SkillRequest("detect", image, object="cat")
    result = engine.submit(skills.prepare(model, req, adapters)).result()
    req.skill.render(result.output, model.tokenizer)      # {"objects": [...]}
"""

from __future__ import annotations

from ..errors import SettingsError
from .base import SETTING_KEYS, Prompt, Settings, Skill, SkillRequest, resolve_settings, spatial_prompt
from .caption import Caption
from .locate import Detect, Point
from .query import Query
from .request import ImageLimits, Request, parse_request, prepare
from .segment import Segment

REGISTRY: dict[str, Skill] = {s.name: s for s in (Caption(), Query(), Detect(), Point(), Segment())}


def get(name: str) -> Skill:
    skill = REGISTRY.get(name) if isinstance(name, str) else None
    if skill is None:
        raise SettingsError(f"unknown skill {name!r}; skills: {', '.join(REGISTRY)}")
    return skill


__all__ = [
    "REGISTRY",
    "SETTING_KEYS",
    "ImageLimits",
    "Prompt",
    "Request",
    "Settings",
    "Skill",
    "SkillRequest",
    "get",
    "parse_request",
    "prepare",
    "resolve_settings",
    "spatial_prompt",
]
