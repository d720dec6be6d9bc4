"""The engine against the single-request path: with greedy settings every skill must give exactly what
`moonbase.simple` gives, alone, in a batch of mixed concurrent requests, with image-cache hits, and
under memory pressure (eviction and preemption)."""

from __future__ import annotations

import numpy as np
import pytest

from moonbase import simple, skills
from moonbase.api import VL
from moonbase.data.shapes import render_scene
from moonbase.engine.engine import Engine, EngineConfig
from moonbase.engine.sequence import Request
from moonbase.hub import ASSETS, nano

GREEDY = {"temperature": 0.0, "max_tokens": 12, "max_objects": 6}


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    return [np.asarray(render_scene(seed + i, max_objects=4).image) for i in range(n)]


def _cases(images: list[np.ndarray]) -> list[tuple[str, int, dict]]:
    """(skill, image index, arguments) covering every skill and variant, images reused across cases."""
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
    return cases


def _reference(m, images, skill, idx, args):
    s = skills.resolve_settings(GREEDY, m.cfg.defaults)
    enc = None if idx is None else VL(m, engine=Engine(m, EngineConfig(kv_memory_mb=8))).encode_image(images[idx])
    if skill == "caption":
        return list(simple.caption(m, enc, args["length"], s))
    if skill == "query":
        trace = simple.TextRun()
        ids = list(
            simple.query(m, enc, args["question"], s, args.get("spatial_refs"), args.get("reasoning", False), reasoning_run=trace)
        )
        return (ids, trace.ids, trace.coords) if args.get("reasoning") else ids
    return [(o.x, o.y, o.size) for o in simple.locate(m, enc, skill, args["object"], s)]


def _request(vl: VL, images, skill, idx, args) -> Request:
    m, s = vl.model, vl._settings(GREEDY)
    tok = m.cfg.tokenizer
    if skill == "caption":
        prompt = skills.caption_prompt(tok, args["length"])
    elif skill == "query":
        prompt = skills.query_prompt(m.tokenizer, args["question"], args.get("spatial_refs"), args.get("reasoning", False))
    else:
        prompt = skills.object_prompt(m.tokenizer, skill, args["object"])
    image = None if idx is None else images[idx]
    return vl._request(skill, image, prompt, s, reasoning=args.get("reasoning", False))


def _outcome(result, args):
    if result.objects is not None:
        return [(o.x, o.y, o.size) for o in result.objects]
    if args.get("reasoning"):
        return (result.run.ids, result.trace.ids, result.trace.coords)
    return result.run.ids


def _check_batch(m, images, engine_cfg: EngineConfig, repeat: int = 1):
    cases = _cases(images) * repeat
    expected = [_reference(m, images, *c) for c in cases]
    engine = Engine(m, engine_cfg, background=False)
    vl = VL(m, engine=engine)
    handles = [engine.submit(_request(vl, images, *c)) for c in cases]  # all in flight at once
    got = [_outcome(h.result(), c[2]) for h, c in zip(handles, cases, strict=True)]
    for c, want, have in zip(cases, expected, got, strict=True):
        assert have == want, c
    return engine


@pytest.fixture(scope="module")
def images():
    return _images(4)


def test_every_skill_alone_matches_the_single_request_path(tiny, images):
    engine = Engine(tiny, EngineConfig(kv_memory_mb=8), background=False)
    vl = VL(tiny, engine=engine)
    for case in _cases(images[:2]):
        want = _reference(tiny, images, *case)
        assert _outcome(engine.submit(_request(vl, images, *case)).result(), case[2]) == want, case


def test_mixed_concurrent_batch_matches(tiny, images):
    engine = _check_batch(tiny, images, EngineConfig(max_batch=32, kv_memory_mb=8))
    assert engine.cache.hits > 0  # several questions per image: the prefix was reused
    assert engine.pool.n_free == engine.pool.n_blocks - sum(len(e.blocks) for e in engine.cache.entries.values())


def test_gqa_batch_matches(tiny_gqa, images):
    _check_batch(tiny_gqa, images[:2], EngineConfig(max_batch=8, kv_memory_mb=8))


def test_small_pool_evicts_and_preempts_without_changing_answers(tiny, images):
    t = tiny.cfg.text
    per_token_mb = 2 * t.n_layers * t.n_kv_heads * t.hd * 4 / 2**20
    tokens = 3 * tiny.cfg.prefix_len + 60  # room for a few sequences only: forces preemption and eviction
    engine = _check_batch(tiny, images, EngineConfig(max_batch=16, block_size=8, kv_memory_mb=tokens * per_token_mb))
    assert engine.scheduler.preemptions > 0 and engine.cache.evictions > 0


def test_sequence_too_large_for_the_pool_fails_cleanly(tiny, images):
    engine = Engine(tiny, EngineConfig(block_size=8, kv_memory_mb=0.001), background=False)
    vl = VL(tiny, engine=engine)
    with pytest.raises(MemoryError):
        vl.caption(images[0])
    assert engine.pool.n_free == engine.pool.n_blocks


def test_cancel_frees_the_sequence(tiny, images):
    engine = Engine(tiny, EngineConfig(kv_memory_mb=8), background=False)
    vl = VL(tiny, engine=engine)
    handle = engine.submit(_request(vl, images, "caption", 0, {"length": "long"}))
    engine.step()
    handle.cancel()
    engine.step()
    assert handle.done and not engine.scheduler.running
    assert engine.pool.n_free == engine.pool.n_blocks - sum(len(e.blocks) for e in engine.cache.entries.values())


def test_background_engine_serves_threads(tiny, images):
    vl = VL(tiny)  # background thread
    want = _reference(tiny, images, "caption", 0, {"length": "short"})
    out = vl.caption(images[0], "short", settings=GREEDY)["caption"]
    assert out == tiny.tokenizer.decode(want)
    streamed = "".join(vl.caption(images[0], "short", stream=True, settings=GREEDY)["caption"])
    assert streamed == out


@pytest.mark.skipif(not (ASSETS / "nano" / "model.safetensors").is_file(), reason="nano weights not built into this checkout")
def test_nano_mixed_batch_matches(images):
    _check_batch(nano(), images[:3], EngineConfig(max_batch=16, kv_memory_mb=32))
