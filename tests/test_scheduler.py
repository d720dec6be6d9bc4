"""The scheduling policy on its own: plain Python over block ids, no model."""

from __future__ import annotations

import torch

from moonbase.config import TextConfig
from moonbase.engine.kv import KVPool, PrefixCache
from moonbase.engine.scheduler import Scheduler, SchedulerConfig
from moonbase.engine.sequence import Sequence, Status
from moonbase.skills import Prompt, Request
from moonbase.skills.program import TextProgram

PREFIX = 10


def _setup(n_blocks=16, block_size=4, max_batch=8, max_step_tokens=1000):
    cfg = TextConfig(dim=8, ff_dim=16, n_layers=1, vocab_size=32, max_context=64, n_heads=2, n_kv_heads=2)
    pool = KVPool(cfg, n_blocks, block_size, torch.device("cpu"), torch.float32)
    cache = PrefixCache(pool)
    return pool, cache, Scheduler(SchedulerConfig(max_batch, max_step_tokens), pool, cache, PREFIX)


def _seq(i, tok, image=None, prompt_len=3):
    program = lambda: TextProgram(tok, (tok.answer_id,), (tok.eos_id,), 8)  # noqa: E731
    req = Request(Prompt(tuple(range(11, 11 + prompt_len))), program, 0.0, 1.0, image=image, image_key=image)
    return Sequence(i, req, tok, torch.device("cpu"))


def test_admission_shares_one_new_prefix_and_respects_the_batch(tiny):
    pool, cache, sched = _setup(max_batch=3)
    for i in range(5):
        sched.add(_seq(i, tiny.cfg.tokenizer, image="a" if i < 4 else "b"))
    plan = sched.schedule()
    assert [s.id for s in plan.prefills] == [0, 1, 2] and len(plan.prefixes) == 1
    prefix = cache.get(("a", None))
    assert all(pool.refs[b] == 4 for b in prefix)  # the cache and three sequences
    assert cache.hits == 2 and len(sched.waiting) == 2


def test_token_budget_defers_the_rest_but_never_blocks_a_lone_request(tiny):
    _, _, sched = _setup(max_step_tokens=PREFIX + 3)
    for i in range(3):
        sched.add(_seq(i, tiny.cfg.tokenizer, image=f"img{i}"))
    assert [s.id for s in sched.schedule().prefills] == [0]  # each costs prefix + prompt = the whole budget
    _, _, lone = _setup(max_step_tokens=1)
    lone.add(_seq(9, tiny.cfg.tokenizer, image="x"))
    assert [s.id for s in lone.schedule().prefills] == [9]


def test_idle_prefixes_are_evicted_least_recently_used_first(tiny):
    pool, cache, sched = _setup(n_blocks=9, block_size=4)  # a prefix takes 3 blocks, a prompt 1
    for key in ("a", "b"):
        seq = _seq(0, tiny.cfg.tokenizer, image=key)
        sched.add(seq)
        sched.schedule()
        sched.finish(seq)
    cache.get(("a", None))  # touch a: b is now the oldest
    sched.add(_seq(1, tiny.cfg.tokenizer, image="c"))
    sched.schedule()
    assert set(cache.entries) == {("a", None), ("c", None)} and cache.evictions == 1


def test_full_pool_preempts_the_newest_and_replays_it(tiny):
    pool, _, sched = _setup(n_blocks=2, block_size=4)
    old, new = _seq(0, tiny.cfg.tokenizer, prompt_len=4), _seq(1, tiny.cfg.tokenizer, prompt_len=4)
    sched.add(old), sched.add(new)
    sched.schedule()
    for s in (old, new):  # pretend both prefilled and decided one input each
        s.length, s.pending = 4, s.pending[:1]
    plan = sched.schedule()  # old needs a second block: only by preempting new
    assert plan.decodes == [old] and new.status is Status.WAITING and sched.preemptions == 1
    assert len(new.pending) == 4 and new.length == 0 and new.blocks == []
    stalled = _setup(n_blocks=2, block_size=4)[2]
    a, b = _seq(0, tiny.cfg.tokenizer, prompt_len=4), _seq(1, tiny.cfg.tokenizer, prompt_len=4)
    stalled.add(a), stalled.add(b)
    stalled.schedule()
    for s in (a, b):
        s.length, s.pending = 4, s.pending[:1]
    assert stalled.schedule(preempt=False).stalled and b.status is Status.RUNNING
