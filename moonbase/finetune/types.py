"""Typed fine-tuning inputs, parsed and validated from the tuning API's JSON (and from data files): skill
requests (`skills.parse_request`), SFT targets and ground truth (each skill's `parse_target`), rollouts and
train-step groups. Every problem is an error that says which field is wrong; nothing downstream sees
unchecked input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig, RegionConfig
from ..errors import SettingsError, TuningError
from ..model import region
from ..skills import REGISTRY, Skill, SkillRequest, parse_request
from ..skills.training import Rollout, Target, items, number, obj

TUNABLE = tuple(name for name, skill in REGISTRY.items() if skill.tunable)


@dataclass(frozen=True)
class RLGroup:
    request: SkillRequest
    rollouts: tuple[Rollout, ...]
    rewards: tuple[float, ...]


@dataclass(frozen=True)
class SFTGroup:
    request: SkillRequest
    target: Target


Group = RLGroup | SFTGroup


def parse_tuning_request(d: Any, image_of: Callable[[Any], Any], where: str = "request") -> SkillRequest:
    """A skill request of the tuning API: a skill it trains, with its image."""
    skill = obj(d, where).get("skill")
    if skill not in TUNABLE:
        raise TuningError(f"{where}.skill must be one of {', '.join(TUNABLE)}, got {skill!r}")
    try:
        return parse_request(d, image_of, where=where)
    except SettingsError as e:
        raise TuningError(str(e)) from None


def parse_target(req: SkillRequest, d: Any, where: str = "target") -> Target:
    return req.skill.parse_target(obj(d, where), where)


def _bin(v: Any, where: str, rc: RegionConfig, size: bool = False) -> int:
    """A coordinate (or size) bin index (int), or a value in [0, 1] (float) converted the way training labels are."""
    n = rc.size_bins if size else rc.coord_bins
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TuningError(f"{where} must be a bin index or a value in [0, 1], got {v!r}")
    if isinstance(v, int):
        if not 0 <= v < n:
            raise TuningError(f"{where}: bin {v} out of range 0..{n - 1}")
        return v
    return (region.size_to_bin if size else region.coord_to_bin)(number(v, where, 0, 1), rc)


def parse_rollout(skill: Skill, d: Any, cfg: ModelConfig, where: str = "rollout") -> Rollout:
    d = obj(d, where)
    if d.get("skill", skill.name) != skill.name:
        raise TuningError(f"{where}.skill {d.get('skill')!r} does not match the request's {skill.name!r}")
    vocab = cfg.text.vocab_size

    def ids(key: str) -> tuple[int, ...]:
        out = items(d, key, where)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in out):
            raise TuningError(f"{where}.{key} must hold token ids in 0..{vocab - 1}")
        return tuple(out)

    coords = tuple(_bin(v, f"{where}.coords[{k}]", cfg.region) for k, v in enumerate(items(d, "coords", where)))
    sizes = []
    for k, s in enumerate(items(d, "sizes", where)):
        if isinstance(s, dict):
            s = [s.get("w", s.get("width")), s.get("h", s.get("height"))]
        if not isinstance(s, list) or len(s) != 2:
            raise TuningError(f"{where}.sizes[{k}] must be [w, h]")
        sizes.append(tuple(_bin(v, f"{where}.sizes[{k}]", cfg.region, size=True) for v in s))
    logprobs = d.get("logprobs")
    if logprobs is not None:
        logprobs = tuple(number(x, f"{where}.logprobs", None, 0) for x in items(d, "logprobs", where))
    finish = d.get("finish_reason") or "stop"
    if not isinstance(finish, str):
        raise TuningError(f"{where}.finish_reason must be a string")
    separator = d.get("has_answer_separator", False)
    if not isinstance(separator, bool):
        raise TuningError(f"{where}.has_answer_separator must be a boolean")
    temperature = number(d.get("temperature", 1.0), f"{where}.temperature", 0, None)
    out = Rollout(ids("answer_tokens"), ids("thinking_tokens"), separator, coords, tuple(sizes), finish, logprobs, temperature)
    skill.check_rollout(out, where)
    return out


def parse_group(d: Any, image_of: Callable[[Any], Any], cfg: ModelConfig, where: str) -> Group:
    d = obj(d, where)
    mode = d.get("mode")
    request = parse_tuning_request(d.get("request"), image_of, f"{where}.request")
    request.skill.require(cfg, f"{where}: this model")
    if mode == "sft":
        return SFTGroup(request, parse_target(request, d.get("target"), f"{where}.target"))
    if mode != "rl":
        raise TuningError(f"{where}.mode must be 'rl' or 'sft', got {mode!r}")
    rollouts = tuple(
        parse_rollout(request.skill, r, cfg, f"{where}.rollouts[{k}]") for k, r in enumerate(items(d, "rollouts", where))
    )
    rewards = tuple(number(r, f"{where}.rewards[{k}]") for k, r in enumerate(items(d, "rewards", where)))
    if not rollouts:
        raise TuningError(f"{where}.rollouts must not be empty")
    if len(rewards) != len(rollouts):
        raise TuningError(f"{where}: {len(rewards)} rewards for {len(rollouts)} rollouts")
    return RLGroup(request, rollouts, rewards)
