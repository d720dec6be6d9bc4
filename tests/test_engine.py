"""The engine against the single-request path: with greedy settings every skill must give exactly what
`moonbase.simple` gives, alone, in a batch of mixed concurrent requests, with image-cache hits, and
under memory pressure (eviction and preemption)."""

from __future__ import annotations

import threading

import pytest
import torch

from moonbase import simple
from moonbase.api import VL
from moonbase.engine import engine as engine_module
from moonbase.engine.engine import Engine, EngineConfig
from moonbase.hub import ASSETS, nano
from moonbase.image import overlap_crops
from moonbase.skills import SkillRequest

from .helpers import GREEDY, check_adapters, check_batch, outcome, reference, request, scenes, skill_cases


@pytest.fixture(scope="module")
def images():
    return scenes(4)


def test_every_skill_alone_matches_the_single_request_path(tiny, images):
    engine = Engine(tiny, EngineConfig(kv_memory_mb=8), background=False)
    vl = VL(tiny, engine=engine)
    for case in skill_cases(images[:2]):
        want = reference(tiny, images, *case)
        assert outcome(engine.submit(request(vl, images, *case)).result().output, case[2]) == want, case


def test_mixed_concurrent_batch_matches(tiny, images):
    engine = check_batch(tiny, images, EngineConfig(max_batch=32, kv_memory_mb=8))
    assert engine.cache.hits > 0  # several questions per image: the prefix was reused
    assert engine.pool.n_free == engine.pool.n_blocks - sum(map(len, engine.cache.entries.values()))


def test_gqa_batch_matches(tiny_gqa, images):
    check_batch(tiny_gqa, images[:2], EngineConfig(max_batch=8, kv_memory_mb=8))


def test_small_pool_evicts_and_preempts_without_changing_answers(tiny, images):
    t = tiny.cfg.text
    per_token_mb = 2 * t.n_layers * t.n_kv_heads * t.hd * 4 / 2**20
    tokens = 3 * tiny.cfg.prefix_len + 60  # room for a few sequences only: forces preemption and eviction
    engine = check_batch(tiny, images, EngineConfig(max_batch=16, block_size=8, kv_memory_mb=tokens * per_token_mb))
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
    handle = engine.submit(request(vl, images, "caption", 0, {"length": "long"}))
    engine.step()
    handle.cancel()
    engine.step()
    assert handle.done and not engine.scheduler.running
    assert engine.pool.n_free == engine.pool.n_blocks - sum(map(len, engine.cache.entries.values()))


def test_background_engine_serves_threads(tiny, images):
    vl = VL(tiny)  # background thread
    want = reference(tiny, images, "caption", 0, {"length": "short"})
    out = vl.caption(images[0], "short", settings=GREEDY)["caption"]
    assert out == tiny.tokenizer.decode(want[0])
    streamed = "".join(vl.caption(images[0], "short", stream=True, settings=GREEDY)["caption"])
    assert streamed == out


def test_submitting_thread_and_idle_engine_thread_give_their_cpu_threads_back(tiny, images, monkeypatch):
    calls, idle = [], threading.Event()

    def record() -> None:
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "moonbase-engine":
            idle.set()

    monkeypatch.setattr(engine_module, "release_cpu_threads", record)
    vl = VL(tiny, engine=Engine(tiny, EngineConfig(kv_memory_mb=8)))
    vl.caption(images[0], "short", settings=GREEDY)
    assert threading.current_thread().name in calls  # at submit (the idle engine thread may have been first)
    assert idle.wait(timeout=5.0)  # and the engine thread, once it had nothing to do
    vl.engine.close()


HAS_NANO = (ASSETS / "nano" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "which", ["tiny", pytest.param("nano", marks=pytest.mark.skipif(not HAS_NANO, reason="no nano weights"))]
)
def test_two_adapters_and_the_base_in_one_batch(which, tiny, images):
    model = tiny if which == "tiny" else nano()
    check_adapters(model, images)


@pytest.mark.skipif(not HAS_NANO, reason="nano weights not built into this checkout")
def test_nano_mixed_batch_matches(images):
    check_batch(nano(), images[:3], EngineConfig(max_batch=16, kv_memory_mb=32))


def test_seeded_sampling_is_reproducible_inside_a_batch(tiny, images):
    hot = {"temperature": 0.8, "top_p": 0.9, "max_tokens": 10, "seed": 7}
    enc = tiny.prefill_image(tiny.embed_crops([overlap_crops(images[0], tiny.cfg.vision)])[0])
    want = simple.run(tiny, enc, SkillRequest("caption", settings=hot)).text.ids
    engine = Engine(tiny, EngineConfig(kv_memory_mb=8), background=False)
    vl = VL(tiny, engine=engine)
    others = [engine.submit(vl.prepare(SkillRequest("caption", images[i], settings={**hot, "seed": i}))) for i in (1, 2)]
    mine = engine.submit(vl.prepare(SkillRequest("caption", images[0], settings=hot)))
    assert mine.result().output.text.ids == want
    assert all(h.result().output.text.ids for h in others)


def test_results_carry_stats(tiny, images):
    engine = Engine(tiny, EngineConfig(kv_memory_mb=8), background=False)
    vl = VL(tiny, engine=engine)
    request = vl.prepare(SkillRequest("caption", images[0], length="short", settings=GREEDY))
    stats = engine.submit(request).result().stats
    assert stats["input_tokens"] == len(request.prompt.ids) == len(tiny.cfg.tokenizer.caption["short"])
    assert stats["output_tokens"] >= 1
    assert 0 < stats["ttft_ms"] <= stats["total_ms"]


def test_int8_decode_runs_every_skill_close_to_fp32(tiny, images):
    from moonbase.model.quant import int8_text
    from moonbase.model.text import lm_logits

    q = int8_text(tiny.w.text)
    h = torch.randn(4, tiny.cfg.text.dim, generator=torch.Generator().manual_seed(0))
    want, got = lm_logits(h, tiny.w.text), lm_logits(h, q)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    # The same greedy requests through an fp32 engine and an int8 one. Only single-token decode steps run in int8,
    # so an answer can only part from fp32's where fp32's choice (token, coordinate or size bin) was a near tie that
    # the int8 error above tips over. Measured: all 19 cases here come out identical; over six other random tiny
    # models and two image pairs about one case in five differed somewhere (random weights give flat logits, so
    # near ties are common). Two differing cases are allowed for a tie that another CPU's kernels round the other
    # way; a broken int8 path changes most of them.
    cases = skill_cases(images)
    outcomes = {}
    for int8 in (False, True):
        engine = Engine(tiny, EngineConfig(kv_memory_mb=8, int8_decode=int8), background=False)
        vl = VL(tiny, engine=engine)
        handles = [engine.submit(request(vl, images, *c)) for c in cases]
        outcomes[int8] = [outcome(h.result().output, c[2]) for h, c in zip(handles, cases, strict=True)]
    differ = [c for c, want, got in zip(cases, outcomes[False], outcomes[True], strict=True) if got != want]
    assert len(differ) <= 2, differ


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny, images):
    vl = VL(tiny, engine=Engine(tiny, EngineConfig(kv_memory_mb=8)))  # background thread
    real_schedule = vl.engine.scheduler.schedule

    def broken(**_):
        vl.engine.scheduler.schedule = real_schedule
        raise RuntimeError("boom")

    vl.engine.scheduler.schedule = broken
    with pytest.raises(RuntimeError, match="boom"):
        vl.caption(images[0], "short", settings=GREEDY)
    assert vl.caption(images[0], "short", settings=GREEDY)["caption"] == tiny.tokenizer.decode(
        reference(tiny, images, "caption", 0, {"length": "short"})[0]
    )


def test_many_requests_leave_nothing_behind(tiny):
    from moonbase.bench import soak

    engine = Engine(tiny, EngineConfig(max_batch=16, kv_memory_mb=0.5))  # the prefix cache evicts all along
    out = soak(VL(tiny, engine=engine), 400, seed=3, clients=8)
    assert out["leaked_blocks"] == 0 and out["in_flight"] == 0 and out["sequences_alive"] == 0, out
    assert engine.cache.evictions > 0
    assert out["rss_end_mb"] - out["rss_after_warmup_mb"] < 50, out
    engine.close()


def test_threads_first_touching_the_api_share_one_engine(tiny):
    vl, start = VL(tiny), threading.Barrier(16)
    seen = []

    def touch() -> None:
        start.wait()
        seen.append(vl.engine)

    threads = [threading.Thread(target=touch) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(e) for e in seen}) == 1
    vl.engine.close()


def test_threads_submitting_at_once_start_one_engine_thread(tiny, images):
    vl, start = VL(tiny, engine=Engine(tiny, EngineConfig(kv_memory_mb=8))), threading.Barrier(16)
    before = set(threading.enumerate())  # other tests' engines may still be running

    def ask() -> None:
        start.wait()
        vl.caption(images[0], "short", settings=GREEDY)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(t.name == "moonbase-engine" for t in set(threading.enumerate()) - before) == 1
    vl.engine.close()


def test_bench_work_counts_the_linear_layers(tiny):
    from moonbase.bench import scene_images, work

    out = work(VL(tiny), scene_images(4, 1), sequential_rps=1.0)
    t = tiny.cfg.text
    question = SkillRequest("query", question="What color is the star?")
    prompt = len(question.skill.prompt(question, tiny.tokenizer).ids)
    per_token = 2 * t.dim * (t.qkv_dim + t.dim + 2 * t.ff_dim) * t.n_layers
    assert out["followup_first_token_mflop"] * 1e6 == prompt * per_token + 2 * t.dim * t.vocab_size
    assert out["image_mflop"] > out["followup_first_token_mflop"] and out["request_mflop"] > out["image_mflop"]
    assert out["followup_speedup_bound"] == pytest.approx(1 + out["image_mflop"] / out["followup_first_token_mflop"])


@pytest.mark.parametrize("which", ["tiny", "tiny3"])
def test_prompts_longer_than_a_step_are_prefilled_in_chunks(which, images, request, monkeypatch):
    """A 5-input step budget cuts every prompt into chunks over several steps (no forward's mask or attention
    exceeds chunk x context); the answers do not change, alone or batched, blocking or pipelined."""
    from moonbase.engine.kv import PagedBatch
    from moonbase.model import text

    model, widths, decoder = request.getfixturevalue(which), [], text.decoder

    def spy(x, *args, **kw):
        if any(isinstance(a, PagedBatch) for a in args) and not kw.get("kv_only"):  # the engine's text forwards
            widths.append(x.shape[1])
        return decoder(x, *args, **kw)

    monkeypatch.setattr(text, "decoder", spy)
    check_batch(model, images[:2], EngineConfig(max_batch=8, kv_memory_mb=8, max_step_tokens=5))
    assert max(widths) == 5  # every prompt here is longer than 5 inputs: none went in at once
