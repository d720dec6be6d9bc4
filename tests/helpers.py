"""Helpers shared by several test modules (not collected as tests): LoRA adapters with random weights, and
the harness that holds the engine to the single-request path (`moonbase.simple`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from moonbase import simple
from moonbase.api import VL
from moonbase.data.shapes import render_scene
from moonbase.engine.engine import Engine, EngineConfig
from moonbase.image import overlap_crops
from moonbase.model.lora import Adapter, n_experts, target_shapes
from moonbase.skills import Request, SkillRequest
from moonbase.skills.program import Output


def random_adapter(cfg, rank: int, seed: int, name: str, scale: float = 0.2) -> Adapter:
    """Every target of every layer; MoE experts get rank / experts_per_token each, as Kestrel splits it."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(cfg.n_layers):
        layer = {}
        for target, (d_in, d_out) in target_shapes(cfg, i).items():
            e = n_experts(cfg, i, target)
            lead, r = ((), rank) if e is None else ((e,), rank // cfg.moe.experts_per_token)
            layer[target] = (torch.randn(*lead, r, d_in, generator=g) * scale, torch.randn(*lead, d_out, r, generator=g) * scale)
        layers.append(layer)
    return Adapter(name, tuple(layers))


def raw_variant_state(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The raw Phi-style key layout of variant files."""
    phi = {"qkv": "mixer.Wqkv", "proj": "mixer.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    state = {}
    for i, layer in enumerate(adapter.layers):
        for target, (a, b) in layer.items():
            prefix = f"text_model.transformer.h.{i}.{phi[target]}.parametrizations.weight.0"
            state[f"{prefix}.A"], state[f"{prefix}.B"] = a, b
    return state


# --- the engine against the single-request path ----------------------------------------------------------

GREEDY = {"temperature": 0.0, "max_tokens": 12, "max_objects": 6}


def scenes(n: int, seed: int = 0) -> list[np.ndarray]:
    return [np.asarray(render_scene(seed + i, max_objects=4).image) for i in range(n)]


def skill_cases(images: list[np.ndarray], segment: bool = False) -> list[tuple[str, int, dict]]:
    """(skill, image index, arguments) covering every skill and variant, images reused across cases; `segment`
    for models that segment (Moondream 3)."""
    cases = []
    for i in range(len(images)):
        cases += [
            ("caption", i, {"length": ["short", "normal", "long"][i % 3]}),
            ("query", i, {"question": "How many circles are there?"}),
            ("detect", i, {"object": "circle"}),
            ("point", i, {"object": "red shape"}),
        ]
    cases += [
        ("query", 0, {"question": "Where is the star?", "reasoning": True}),
        ("query", 1, {"question": "What color is it?", "spatial_refs": [[0.5, 0.5]]}),
        ("query", None, {"question": "What is a circle?"}),
    ]
    return cases + ([("segment", i, {"object": "circle"}) for i in range(len(images))] if segment else [])


def skill_request(images, skill, idx, args, settings=GREEDY) -> SkillRequest:
    return SkillRequest(skill, None if idx is None else images[idx], settings=settings, **args)


def reference(m, images, skill, idx, args, adapter=None):
    enc = None
    if idx is not None:
        enc = m.prefill_image(m.embed_crops([overlap_crops(images[idx], m.cfg.vision)])[0], adapter)
    out = simple.run(m, enc, skill_request(images, skill, None, args), adapter)
    return outcome(out, args)


def request(vl: VL, images, skill, idx, args, variant=None) -> Request:
    return vl.prepare(skill_request(images, skill, idx, args, {**GREEDY, "variant": variant}))


def outcome(out: Output, args):
    if out.objects is not None:
        return [(o.x, o.y, o.size) for o in out.objects]
    if out.trace is not None:
        return (out.text.ids, out.trace.ids, out.trace.coords)
    return (out.text.ids, out.text.coords, out.text.sizes)


def check_batch(m, images, engine_cfg: EngineConfig, repeat: int = 1) -> Engine:
    """Blocking and pipelined engines against the reference; returns the pipelined engine."""
    cases = skill_cases(images, segment=bool(m.cfg.tokenizer.segment_prefix)) * repeat
    expected = [reference(m, images, *c) for c in cases]
    for pipeline in (False, True):
        engine = Engine(m, dataclasses.replace(engine_cfg, pipeline=pipeline), background=False)
        vl = VL(m, engine=engine)
        handles = [engine.submit(request(vl, images, *c)) for c in cases]  # all in flight at once
        got = [outcome(h.result().output, c[2]) for h, c in zip(handles, cases, strict=True)]
        for c, want, have in zip(cases, expected, got, strict=True):
            assert have == want, (c, pipeline)
    return engine


def check_adapters(tiny, images):
    engine = Engine(tiny, EngineConfig(max_batch=32, kv_memory_mb=8), background=False)
    adapters = {
        name: random_adapter(tiny.cfg.text, rank, seed, name).to(tiny.device, tiny.dtype)
        for name, rank, seed in (("one", 4, 1), ("two", 8, 2))
    }
    for adapter in adapters.values():
        engine.adapters.register(adapter)
    vl = VL(tiny, engine=engine)
    cases = [(c, v) for c in skill_cases(images[:2], bool(tiny.cfg.tokenizer.segment_prefix)) for v in (None, "one", "two")]
    expected = [reference(tiny, images, *c, adapter=adapters.get(v)) for c, v in cases]
    handles = [engine.submit(request(vl, images, *c, variant=v)) for c, v in cases]
    for (c, v), want, h in zip(cases, expected, handles, strict=True):
        assert outcome(h.result().output, c[2]) == want, (c, v)
    assert expected[0] != expected[1]  # the adapters change the answers
    assert len(engine.cache.entries) == 6  # one prefix per (image, adapter)
