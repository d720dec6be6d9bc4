"""Rollouts sampled by the engine: n copies of one prepared request, in one batch, each recording its
sampled actions (engine/rollout.py), returned in the tuning API's rollout shape plus what the trainer needs
to replay them: bins, the log-probability of every action under the sampling policy (`logprobs`), the
`temperature` and the adapter step that sampled it (`policy_step`). Clients treat rollouts as opaque and
send them back unchanged.

RL rollouts default to temperature 1 and top_p 1: with top_p < 1 the recorded log-probabilities are those
of the untruncated distribution, so the policy ratio is approximate for that rollout."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from ..api import VL
from ..engine.handle import Result
from ..model.lora import Adapter
from ..skills import SkillRequest
from ..skills.program import StopReason

ROLLOUT_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}


def sample_rollouts(
    vl: VL, req: SkillRequest, n: int, adapter: Adapter | None, policy_step: int, timeout: float | None = None
) -> list[dict[str, Any]]:
    """`adapter`: the policy to sample (the request's own `variant` is ignored); `timeout`: seconds for all n
    (default: the VL's)."""
    settings = ROLLOUT_DEFAULTS | {k: v for k, v in req.settings_dict.items() if k != "variant"}
    request = dataclasses.replace(vl.prepare(dataclasses.replace(req, settings=settings), rollout=True), adapter=adapter)
    seeds = [request.seed + i if request.seed is not None else random.getrandbits(62) for i in range(n)]
    results = vl.wait([vl.submit(dataclasses.replace(request, seed=s)) for s in seeds], timeout)
    return [_rollout(req, r, vl, request.temperature, policy_step) for r in results]


def _rollout(req: SkillRequest, result: Result, vl: VL, temperature: float, policy_step: int) -> dict[str, Any]:
    out, rec = result.output, result.record
    assert rec is not None
    return {
        "skill": req.skill.name,
        "finish_reason": out.stop_reason.finish_reason,
        "output": req.skill.render(out, vl.model.tokenizer, vl.clip),
        "answer_tokens": list(out.text.ids) if out.text is not None else [],
        "thinking_tokens": list(out.trace.ids) if out.trace is not None else [],
        "has_answer_separator": out.trace is not None and out.trace.stop_reason is StopReason.STOP,
        "coords": list(rec.coord_bins),
        "sizes": [list(s) for s in rec.size_bins],
        "logprobs": list(rec.logprobs),
        "temperature": temperature,
        "policy_step": policy_step,
    }
