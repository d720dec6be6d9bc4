"""Train-step bodies of the tuning API: limits, parsing into typed groups, and the digest that says whether
two bodies are the same request."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..config import ModelConfig
from ..errors import TuningError
from .trainer import StepConfig
from .types import Group, parse_group


@dataclass(frozen=True)
class Limits:
    max_rollouts: int = 16  # per /rollouts request
    max_groups: int = 256  # per train step
    max_step_rollouts: int = 1024  # RL rollouts per train step


def parse_step(
    body: dict[str, Any], image_of: Callable[[Any], Any], model_cfg: ModelConfig, step_cfg: StepConfig, limits: Limits
) -> tuple[list[Group], float, StepConfig]:
    """A train-step body -> (groups, lr, the step's config with any documented extras applied)."""
    raw = body.get("groups")
    if not isinstance(raw, list) or not raw:
        raise TuningError("groups must be a non-empty list")
    if len(raw) > limits.max_groups:
        raise TuningError(f"at most {limits.max_groups} groups per train step")
    groups = [parse_group(g, image_of, model_cfg, f"groups[{i}]") for i, g in enumerate(raw)]
    if sum(len(getattr(g, "rollouts", ())) for g in groups) > limits.max_step_rollouts:
        raise TuningError(f"at most {limits.max_step_rollouts} rollouts per train step")
    lr = body.get("lr", 2e-4)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and 0 < lr <= 1):
        raise TuningError(f"lr must be a number in (0, 1], got {lr!r}")
    cfg = step_cfg
    for name in ("kl_coef", "clip_low", "clip_high", "sft_weight"):  # documented extras train_step(**kwargs) forwards
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 <= v <= 10):
            raise TuningError(f"{name} must be a number in [0, 10]")
        cfg = replace(cfg, sft_weight=float(v)) if name == "sft_weight" else replace(cfg, rl=replace(cfg.rl, **{name: float(v)}))
    return groups, float(lr), cfg


def body_digest(body: dict[str, Any]) -> str:
    """SHA-256 of the body without its idempotency key (canonical JSON)."""
    unkeyed = {k: v for k, v in body.items() if k != "idempotency_key"}
    return hashlib.sha256(json.dumps(unkeyed, sort_keys=True, separators=(",", ":"), default=_digestable).encode()).hexdigest()


def finetune_id_of(body: Any) -> str:
    if not isinstance(body, dict):
        raise TuningError("the body must be a JSON object")
    fid = body.get("finetune_id")
    if not isinstance(fid, str) or not fid:
        raise TuningError("finetune_id is required")
    return fid


def int_of(v: Any, what: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise TuningError(f"{what} must be an integer, got {v!r}") from None


def _digestable(value: Any) -> str:
    """In-process callers pass images as arrays or PIL images: hash their pixels into the body digest."""
    data = getattr(value, "tobytes", None)
    return hashlib.blake2b(data() if data else repr(value).encode(), digest_size=16).hexdigest()
