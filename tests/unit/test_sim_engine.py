"""The simulator's engine and KV cache, driven directly (no HTTP)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp_sim.config import SimConfig
from epp_sim.engine import Engine, SimRequest
from epp_sim.kv_cache import KVCacheManager
from epp_sim.tokenizer import PseudoTokenizer

TOK = PseudoTokenizer()


def make_engine(**kw: object) -> Engine:
    cfg = SimConfig(profile="instant", **kw)  # type: ignore[arg-type]
    return Engine(cfg.resolved(), TOK)


async def finish(req: SimRequest, timeout: float = 5.0) -> SimRequest:
    async with asyncio.timeout(timeout):
        while not req.finished:
            await req.wait(req.max_tokens)
    return req


def prompt(seed: int, n: int) -> list[int]:
    return [1000 + (seed * 7919 + i * 104729) % 100000 for i in range(n)]


@pytest.fixture
async def engine_factory():
    engines: list[Engine] = []

    def factory(**kw: object) -> Engine:
        e = make_engine(**kw)
        e.start()
        engines.append(e)
        return e

    yield factory
    for e in engines:
        await e.stop()


async def test_repeat_prompt_hits_cache_but_never_whole_prompt(engine_factory) -> None:
    e = engine_factory(block_size=16)
    p = prompt(1, 160)  # exactly 10 blocks: the hit must stop one block short
    first = await finish(e.submit(p, 4))
    second = await finish(e.submit(p, 4))
    assert first.cached_tokens == 0
    assert second.cached_tokens == 144
    assert e.stats.prefix_hits == 144 and e.stats.prefix_queries == 320
    third = await finish(e.submit([*p, 5, 6, 7], 4))
    assert third.cached_tokens == 160


async def test_salt_and_lora_do_not_share_cache(engine_factory) -> None:
    e = engine_factory(lora_adapters=["a1"])
    p = prompt(2, 100)
    await finish(e.submit(p, 2))
    assert (await finish(e.submit(p, 2, cache_salt="s"))).cached_tokens == 0
    assert (await finish(e.submit(p, 2, lora="a1"))).cached_tokens == 0
    assert (await finish(e.submit(p, 2, cache_salt="s"))).cached_tokens == 96


async def test_generated_blocks_are_cached_for_the_next_turn(engine_factory) -> None:
    e = engine_factory(block_size=16)
    p = prompt(3, 40)
    r = await finish(e.submit(p, 40))
    follow_up = p + r.output_ids + prompt(4, 10)
    r2 = await finish(e.submit(follow_up, 2))
    # 40 prompt + 39 computed output tokens = 79 tokens of KV -> 4 full blocks
    assert r2.cached_tokens == 64


def test_lru_evicts_least_recently_freed_and_tail_first() -> None:
    class Req:
        def __init__(self, ids: list[int]) -> None:
            from epp_sim.kv_cache import chain_hashes

            self.ids = ids
            self.blocks: list[int] = []
            self.num_cached_blocks = 0
            self.lora = None
            from array import array

            self.hashes = chain_hashes(array("I", ids).tobytes(), 7, 0, len(ids) // 4, 4)

        num_tokens = property(lambda self: len(self.ids))

        def block_hash(self, i: int) -> int:
            return self.hashes[i]

        def block_hashes(self, n: int) -> list[int]:
            return self.hashes

        def block_tokens(self, i: int) -> list[int]:
            return self.ids[i * 4:(i + 1) * 4]

    kv = KVCacheManager(num_blocks=8, block_size=4, collect_events=True)
    a, b = Req(prompt(1, 16)), Req(prompt(2, 16))
    assert kv.allocate(a, 0, 16) and kv.allocate(b, 0, 16)
    assert kv.num_free == 0 and kv.usage == 1.0
    assert not kv.allocate(Req(prompt(3, 16)), 0, 16)  # nothing free: refused, nothing changed
    kv.free(a)
    kv.free(b)
    assert kv.num_free == 8 and kv.num_cached == 8 and kv.usage == 0.0
    c = Req(prompt(3, 8))
    assert kv.allocate(c, 0, 8)
    # a was freed first, and its tail block leaves first
    removed = [e[1][0] for e in kv.drain_events() if e[0] == "BlockRemoved"]
    assert removed == [a.hashes[3], a.hashes[2]]
    assert len(kv.lookup(Req(a.ids))) == 2  # a's first two blocks survive
    assert len(kv.lookup(Req(b.ids))) == 3  # b intact (lookup stops one token short of the end)


async def test_waiting_queue_bounded_by_max_num_seqs(engine_factory) -> None:
    e = engine_factory(max_num_seqs=2, step_fixed_s=0.002)
    reqs = [e.submit(prompt(i, 20), 10) for i in range(6)]
    await asyncio.sleep(0.01)
    assert len(e.running) == 2 and len(e.waiting) == 4
    for r in reqs:
        await finish(r)
    assert all(r.num_output == 10 and r.finish_reason == "length" for r in reqs)
    assert e.state()["kv_blocks_used"] == 0


async def test_chunked_prefill_respects_token_budget(engine_factory) -> None:
    e = engine_factory(max_num_batched_tokens=64, block_size=16)
    r = await finish(e.submit(prompt(5, 300), 3))
    # ceil(300 / 64) = 5 prefill steps, then 2 decode steps
    assert e.stats.steps == 7
    assert r.num_output == 3


async def test_memory_pressure_preempts_and_recomputes_instead_of_failing(engine_factory) -> None:
    e = engine_factory(num_gpu_blocks=24, block_size=16, max_num_seqs=8)
    reqs = [e.submit(prompt(10 + i, 100), 60) for i in range(4)]  # each needs up to 10 blocks
    for r in reqs:
        await finish(r, timeout=10)
    assert all(r.num_output == 60 for r in reqs)
    assert e.stats.preemptions > 0
    assert e.kv.num_used == 0


async def test_abort_frees_blocks_and_counts(engine_factory) -> None:
    e = engine_factory(step_fixed_s=0.01)
    r = e.submit(prompt(6, 64), 100)
    await asyncio.sleep(0.03)
    assert e.kv.num_used > 0
    e.abort(r)
    assert r.finished and r.finish_reason == "abort" and e.kv.num_used == 0
    assert e.stats.finished["abort"] == 1


async def test_max_loras_gates_admission(engine_factory) -> None:
    e = engine_factory(lora_adapters=["a", "b"], max_loras=1, step_fixed_s=0.002)
    ra = e.submit(prompt(7, 20), 20, lora="a")
    rb = e.submit(prompt(8, 20), 20, lora="b")
    rbase = e.submit(prompt(9, 20), 20)
    await asyncio.sleep(0.01)
    assert ra in e.running and rbase in e.running and rb in e.waiting
    await finish(rb)


async def test_output_is_deterministic_per_prompt_and_seed() -> None:
    outs = []
    for seed in (1, 1, 2):
        e = make_engine(seed=seed)
        e.start()
        try:
            outs.append((await finish(e.submit(prompt(1, 30), 12))).output_ids)
        finally:
            await e.stop()
    assert outs[0] == outs[1] != outs[2]


def test_pseudo_tokenizer_is_prefix_stable_and_reversible() -> None:
    from epp_sim.prompts import render_chat

    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there, friend"}]
    p1 = TOK.encode(render_chat(turn1))
    answer_ids, words = TOK.output_vocab()
    answer = "".join(words[:5])
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "more"}]
    p2 = TOK.encode(render_chat(turn2))
    assert p2[:len(p1)] == p1
    assert p2[len(p1):len(p1) + 5] == answer_ids[:5]
    assert TOK.decode(TOK.encode("hello world")) == "hello world"


@given(st.lists(st.text(alphabet="ab <|>\n\té", max_size=300), max_size=6))
@settings(max_examples=200, deadline=None)
def test_segment_tokenisation_equals_whole(texts: list[str]) -> None:
    from epp_sim.prompts import chat_segments

    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t * 3} for i, t in enumerate(texts)]
    if not msgs:
        return
    segments = chat_segments(msgs)
    tok = PseudoTokenizer()
    assert tok.encode_segments(segments) == tok.encode("".join(segments))
    assert tok.encode_segments(segments) == tok.encode("".join(segments))  # cached path too
