"""Rollouts sampled by the engine: n requests of one skill, in one batch, each recording its sampled
actions (engine/rollout.py), returned in the tuning API's rollout shape plus what the trainer needs to
replay them: bins, the log-probability of every action under the sampling policy (`logprobs`), the
`temperature` and the adapter step that sampled it (`policy_step`). Clients treat rollouts as opaque and
send them back unchanged.

RL rollouts default to temperature 1 and top_p 1: with top_p < 1 the recorded log-probabilities are those
of the untruncated distribution, so the policy ratio is approximate for that rollout."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from .. import simple, skills
from ..api import VL, image_key
from ..engine.sequence import Request
from ..errors import RequestTimeoutError
from ..image import load_image, overlap_crops
from ..model.lora import Adapter
from .sft import request_prompt
from .types import SkillRequest

ROLLOUT_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}


def sample_rollouts(vl: VL, req: SkillRequest, n: int, adapter: Adapter | None, policy_step: int) -> list[dict[str, Any]]:
    m = vl.model
    settings = skills.resolve_settings(
        ROLLOUT_DEFAULTS | {k: v for k, v in req.settings_dict.items() if k != "variant"}, m.cfg.defaults
    )
    prompt = request_prompt(req, m.tokenizer)
    source = key = None
    if req.image is not None:
        source = overlap_crops(load_image(req.image, vl.max_pixels), m.cfg.vision)
        key = image_key(source)
    else:
        prompt = skills.Prompt((m.cfg.tokenizer.bos_id,)) + prompt
    room = m.cfg.text.max_context - (0 if source is None else m.cfg.prefix_len)
    if len(prompt.ids) >= room:
        raise skills.SettingsError(f"prompt of {len(prompt.ids)} tokens does not fit the context ({room} left)")
    seeds = [settings.seed + i if settings.seed is not None else random.getrandbits(62) for i in range(n)]
    handles = [
        vl.engine.submit(
            Request(req.skill, prompt, dataclasses.replace(settings, seed=s), source, key, req.reasoning, adapter, rollout=True)
        )
        for s in seeds
    ]
    try:
        results = [h.result(vl.timeout) for h in handles]
    except TimeoutError:
        for h in handles:
            h.cancel()  # frees their places in the engine
        raise RequestTimeoutError(f"rollouts did not finish within {vl.timeout} s") from None
    return [_rollout(req, r, vl, settings.temperature, policy_step) for r in results]


def _rollout(req: SkillRequest, result, vl: VL, temperature: float, policy_step: int) -> dict[str, Any]:
    m, rec = vl.model, result.record
    out: dict[str, Any] = {"skill": req.skill}
    if req.skill == "query":
        trace = result.trace
        output: dict[str, Any] = {"answer": m.tokenizer.decode(result.run.ids)}
        if req.reasoning:
            output["reasoning"] = skills.reasoning_output(simple.reasoning_chunks(trace, m), m.tokenizer)
        out |= {
            "finish_reason": "stop" if result.run.stop_reason == "stop" else "length",
            "output": output,
            "answer_tokens": list(result.run.ids),
            "thinking_tokens": list(trace.ids) if trace is not None else [],
            "has_answer_separator": trace is not None and trace.stop_reason == "stop",
            "coords": list(rec.coord_bins),
            "sizes": [],
        }
    else:
        objs = result.objects
        if req.skill == "detect":
            output = {"objects": [skills.region_output(o.x, o.y, *o.size) for o in objs]}
        else:
            output = {"points": [{"x": o.x, "y": o.y} for o in objs]}
        out |= {
            "finish_reason": "stop" if rec.finish == "stop" else "length",
            "output": output,
            "answer_tokens": [],
            "thinking_tokens": [],
            "has_answer_separator": False,
            "coords": list(rec.coord_bins),
            "sizes": [list(s) for s in rec.size_bins],
        }
    return out | {"logprobs": list(rec.logprobs), "temperature": temperature, "policy_step": policy_step}
