"""predicted-latency-scorer: the cost formula, what it learns online, and SLO headers."""

from __future__ import annotations

import math
import time

import pytest

from epp.api.types import Usage
from epp.datalayer.pool import EndpointPool
from epp.scheduling.config import EPP_DEFAULT_CONFIG, load_config
from epp.scheduling.plugins import ProfileResult, ResponseInfo, SchedulingResult
from epp_plugins.scorers.latency import (
    PRIOR_BASE,
    PRIOR_PER_TOKEN,
    STEP_SHARE,
    DecayedFit,
    EndpointRates,
    PredictedLatencyScorer,
    Prediction,
    PrefixRate,
    _Pending,
)
from tests.scorers_helpers import ep, req
from tests.unit.test_scorers_prefix import words


def setup(pool: EndpointPool | None = None):
    cfg = load_config(EPP_DEFAULT_CONFIG)  # the scorer as EPP's default configuration wires it
    if pool is not None:
        cfg.handle.pool = pool
    return cfg.plugins["predicted-latency-scorer"], cfg.plugins["prefix-cache-scorer"]


def pick(scorer, prefix, request, endpoints, target=None):
    """Score (both plugins), then report the pick to both, as the director does; ``target`` None takes the
    best score (the first of equals)."""
    prefix.score(request, endpoints)
    scores = scorer.score(request, endpoints)
    if target is None:
        target = endpoints[max(range(len(endpoints)), key=lambda k: (scores[k], -k))]
    target.inflight_requests += 1
    result = SchedulingResult({"default": ProfileResult([target])}, "default")
    prefix.pre_request(request, result)
    scorer.pre_request(request, result)
    return scores


def answer(scorer, prefix, request, target, ttft, decode=0.0, cached=0, tokens=10):
    """The response: first byte ``ttft`` seconds after the pick (the clock is moved, not waited for)."""
    pick_ = request.attributes[scorer._key]
    pick_.at -= ttft  # as if picked ttft seconds ago
    scorer.on_response_body(request, target, b"data: x", False)
    pick_.first_byte -= decode
    target.inflight_requests -= 1
    info = ResponseInfo(status=200, completed=True, usage=Usage(prompt_tokens=100, completion_tokens=tokens,
                                                                cached_tokens=cached))
    scorer.on_response_complete(request, target, info)
    prefix.on_response_complete(request, target, info)


def test_the_formula_prefill_queue_and_admission_wait():
    scorer, _ = setup()
    a, b = ep("a"), ep("b", index=1)
    r = scorer._rates(b)
    r.slots = 4
    r.occupancy.value = 2.0
    b.inflight_requests = 5  # two ahead of the next request for a slot: 2 * 2.0 / 4 = 1 s
    text = words(4000, 1)  # 1,000 tokens at the prior 4 characters per token
    preds = scorer.predict(req(text), [a, b])
    assert preds[0].uncached == 1000 and preds[0].wait == 0.0
    assert preds[0].ttft == pytest.approx(PRIOR_BASE + PRIOR_PER_TOKEN * 1000, rel=0.01)
    assert preds[1].wait == pytest.approx(1.0)
    assert preds[1].ttft == pytest.approx(preds[0].ttft + 1.0, rel=0.01)
    scores = scorer.score(req(text), [a, b])
    assert scores[0] == 1.0 and scores[1] < 0.2


def test_a_cached_prefix_is_worth_its_prefill_and_no_more():
    scorer, prefix = setup()
    a, b = ep("a"), ep("b", index=1)
    system = words(8000, 2)  # 2,000 tokens
    first = req(system + words(400, 3), rid="1")
    pick(scorer, prefix, first, [a, b], a)
    answer(scorer, prefix, first, a, ttft=0.22)
    # a holds the system prompt: it wins while its queue costs less than the 2,000-token prefill it saves
    follow = req(system + words(400, 4), rid="2")
    assert scorer.score(follow, [a, b])[0] == 1.0
    scorer._rates(a).pending[1] = _Pending(5000, time.monotonic() + 60)  # 5,000 tokens of prefill ahead on a
    follow = req(system + words(400, 5), rid="3")
    scores = scorer.score(follow, [a, b])
    assert scores[1] == 1.0 and scores[0] < 1.0  # a cold prefill on b is sooner than waiting on a


def test_cold_start_spreads_by_load_alone():
    scorer, prefix = setup()
    endpoints = [ep(f"e{i}", index=i) for i in range(4)]
    held = []
    for i in range(8):  # unrelated prompts, nothing answered yet
        r = req(words(2000, 100 + i), rid=str(i))
        pick(scorer, prefix, r, endpoints)
        held.append(r)
    assert [e.inflight_requests for e in endpoints] == [2, 2, 2, 2]  # queued prefill makes busy ones later


def test_a_cold_prompt_goes_where_few_requests_follow_it():
    """Three idle endpoints, one busy with a hot prefix (many recent picks, all answered: nothing queued). A
    cold prompt costs the same prefill everywhere, but on the busy one every request arriving meanwhile waits
    for it; a warm follow-up of the hot prefix still goes to the busy endpoint (its prefill is short)."""
    scorer, prefix = setup()
    endpoints = [ep(f"e{i}", index=i) for i in range(4)]
    hot, quiet = endpoints[1], endpoints[3]
    hot_prompt = words(12000, 1)  # 3,000 tokens
    for i in range(40):  # 4 requests a second for 10 s, all answered
        r = req(hot_prompt + words(400, 100 + i), rid=f"hot{i}")
        pick(scorer, prefix, r, endpoints, hot)
        answer(scorer, prefix, r, hot, ttft=0.32 if i == 0 else 0.03, cached=0 if i == 0 else 2900)
    r = req(words(12000, 2), rid="quiet")
    pick(scorer, prefix, r, endpoints, quiet)
    answer(scorer, prefix, r, quiet, ttft=0.32)
    scorer._since -= 10.0  # the picks came over 10 s, not at once: rates of ~4/s, not ~40/s
    for stat in scorer.prefixes.values():
        stat.first -= 10.0
    assert 3.0 < scorer._rates(hot).pick_rate(time.monotonic(), scorer._since) < 10.0
    cold = req(words(12000, 3), rid="cold")
    preds = scorer.predict(cold, endpoints)
    assert max(p.ttft for p in preds) < 1.2 * min(p.ttft for p in preds)  # about the same prefill everywhere
    scores = scorer.score(cold, endpoints)
    assert scores[1] < min(scores[0], scores[2], scores[3])  # not where the hot prefix keeps arriving
    assert scores[0] == scores[2] == 1.0 and scores[3] < 1.0  # nor on the one with some traffic
    warm = scorer.score(req(hot_prompt + words(400, 999), rid="warm"), endpoints)
    assert warm[1] == 1.0 and max(warm[0], warm[2], warm[3]) < 0.5


def test_a_slow_endpoint_is_learned():
    scorer, prefix = setup()
    fast, slow = ep("fast"), ep("slow", index=1)
    for i in range(30):  # the same prompt sizes on both (250 to 2,250 tokens); slow takes 5x as long per token
        for target, per_token in ((fast, 1e-4), (slow, 5e-4)):
            r = req(words(1000 + 2000 * (i % 5), 200 + i), rid=f"{target.name}{i}")
            pick(scorer, prefix, r, [target], target)
            tokens = request_tokens(scorer, r)
            answer(scorer, prefix, r, target, ttft=0.02 + per_token * tokens)
    probe = req(words(4000, 999))  # 1,000 tokens
    fast_p, slow_p = scorer.predict(probe, [fast, slow])
    # truth at 1,000 tokens: 0.12 s and 0.52 s; each endpoint's slowness moves slowly (a geometric mean)
    assert slow_p.ttft / fast_p.ttft > 3.0
    assert fast_p.ttft == pytest.approx(0.12, rel=0.5) and slow_p.ttft == pytest.approx(0.52, rel=0.5)
    scores = scorer.score(req(words(4000, 999)), [fast, slow])
    assert scores[0] == 1.0 and scores[1] < 0.4
    audit = scorer.audit.summary()
    assert audit["count"] == 60


def request_tokens(scorer, request) -> float:
    return request.attributes[scorer._key].tokens_ahead


def test_an_endpoint_restarting_with_an_empty_cache_loses_its_affinity():
    """The index says `a` holds the prompt; `a` restarted and reports nothing cached. After two consistent
    misses the prefix index stops believing it, and the predicted TTFT on `a` includes the full prefill."""
    pool = EndpointPool()
    scorer, prefix = setup(pool)
    a, b = ep("a"), ep("b", index=1)
    system = words(8000, 7)
    for i in range(3):
        r = req(system + words(400, 300 + i), rid=f"warm{i}")
        pick(scorer, prefix, r, [a, b], a)
        answer(scorer, prefix, r, a, ttft=0.05, cached=0 if i == 0 else 1984)
    assert scorer.predict(req(system + words(400, 9)), [a, b])[0].uncached < 200
    # restart: requests find nothing cached on a; other traffic went there meanwhile
    for i in range(2):
        other = req(words(8000, 500 + i), rid=f"other{i}")
        pick(scorer, prefix, other, [a], a)
        answer(scorer, prefix, other, a, ttft=0.25, cached=0)
        r = req(system + words(400, 400 + i), rid=f"after{i}")
        pick(scorer, prefix, r, [a, b], a)
        answer(scorer, prefix, r, a, ttft=0.25, cached=0)
    assert prefix.prefix_producer().horizon("a") is not None
    for i in range(3):  # what went there before the restart no longer counts as cached
        other = req(words(8000, 600 + i), rid=f"more{i}")
        pick(scorer, prefix, other, [a], a)
        answer(scorer, prefix, other, a, ttft=0.25, cached=0)
    fresh = scorer.predict(req(words(8000, 2) + words(400, 999)), [a, b])
    assert fresh[0].uncached > 1900


def test_slots_are_learned_from_waiting_that_the_prefill_backlog_does_not_explain():
    r = EndpointRates()
    e = ep("a", running=12, waiting=0)

    def scrape(running: int, waiting: int, backlog: float = 0.0, dt: float = 0.05) -> None:
        e.metrics.running_requests, e.metrics.waiting_requests = running, waiting
        e.metrics.updated_at += dt
        r.learn_slots(e, backlog)

    scrape(12, 0)
    for _ in range(6):  # prefills spend the token budget: requests wait, but 0.5 s of prefill queued there
        scrape(16, 2, backlog=0.5)  # explains the 0.3 s they waited
    assert r.slots == 0
    scrape(10, 0)
    scrape(16, 3)
    scrape(16, 5)
    assert r.slots == 0  # two scrapes are a blip
    scrape(16, 5)  # three in a row, no prefill queued to explain them: saturated at 16
    assert r.slots == 16
    scrape(20, 0)
    assert r.slots == 20  # it has since run more: it admits more
    for running in (18, 17, 15, 14):  # KV-bound: longer requests, fewer fit; still waiting
        scrape(running, 4)
    assert r.slots == 14


def test_slo_headers_prefer_endpoints_that_meet_them():
    scorer, _ = setup()
    a, b = ep("a"), ep("b", index=1)
    scorer._rates(a).tpot = DecayedFit(0.08, 0.0, 64, 0.0, 1.0)  # a answers first sooner but decodes slowly
    scorer._rates(b).speed.value = math.log(3.0)  # b is three times slower to first token
    text = words(400, 5)
    assert scorer.score(req(text), [a, b])[0] == 1.0  # by TTFT alone, a
    scores = scorer.score(req(text, headers={"x-llm-d-slo-tpot-ms": "40"}), [a, b])
    assert scores[1] > 0.5 > scores[0]  # only b meets 40 ms per token
    scores = scorer.score(req(text, headers={"x-llm-d-slo-ttft-ms": "1", "x-llm-d-slo-tpot-ms": "x"}), [a, b])
    assert scores[0] > scores[1]  # none meets 1 ms; a misses by least


def test_decayed_fit_prior_and_learning():
    f = DecayedFit(0.02, 1e-4, 4096, 1e-7, 0.1)
    assert f.predict(1000) == pytest.approx(0.12)
    f.observe(1000, 0.5)
    assert f.predict(1000) == pytest.approx(0.5)  # one observation: the line goes through it
    for _ in range(50):
        f.observe(1000, 0.05 + 2e-4 * 1000)
        f.observe(3000, 0.05 + 2e-4 * 3000)
    a, b = f.line()
    assert a == pytest.approx(0.05, abs=0.02) and b == pytest.approx(2e-4, rel=0.1)
    narrow = DecayedFit(0.02, 1e-4, 4096, 1e-7, 0.1)
    for i in range(50):  # a narrow range cannot tell a slope: the prior's stays, the level is learned
        narrow.observe(1000 + i % 3, 0.3 + (i % 2) * 0.01)
    assert narrow.line()[1] == pytest.approx(1e-4, rel=0.2) and narrow.predict(1000) == pytest.approx(0.305, abs=0.01)
    assert isinstance(PredictedLatencyScorer, type)


def test_the_batch_decoding_there_delays_a_first_token():
    """Two endpoints hold the prefix; one decodes ten times the other's batch. Each sequence lengthens every
    step (the TPOT fit's slope), and a new request waits out one and a half steps: it goes to the smaller batch."""
    scorer, prefix = setup()
    a, b = ep("a"), ep("b", index=1)
    system = words(8000, 2)
    for i, target in enumerate((a, b)):
        r = req(system + words(400, 10 + i), rid=f"warm{i}")
        pick(scorer, prefix, r, [target], target)
        answer(scorer, prefix, r, target, ttft=0.05, cached=1900)
    a.inflight_requests, b.inflight_requests = 20, 2
    pa, pb = scorer.predict(req(system + words(400, 99)), [a, b])
    for p, e in ((pa, a), (pb, b)):
        assert p.batch_delay == pytest.approx(STEP_SHARE * scorer._rates(e).tpot.line()[1] * e.inflight_requests)
    assert pa.batch_delay > 5 * pb.batch_delay and pa.ttft > pb.ttft
    scores = scorer.score(req(system + words(400, 98)), [a, b])
    assert scores[1] == 1.0 and scores[0] < 1.0


def hot_prefix(scorer, prefix, endpoints, holder, prompt, n, age):
    """``n`` answered requests of one prefix on ``holder``, the prefix first seen ``age`` seconds ago."""
    for i in range(n):
        r = req(prompt + words(400, 100 + i), rid=f"hot{holder.name}{i}")
        pick(scorer, prefix, r, endpoints, holder)
        answer(scorer, prefix, r, holder, ttft=0.32 if i == 0 else 0.03, decode=1.0, cached=0 if i == 0 else 2900)
    for stat in scorer.prefixes.values():
        stat.first -= age


def test_a_hot_prefix_gets_a_second_holder_and_a_lukewarm_one_does_not():
    """One endpoint takes every request of a prefix, many a second for a minute: its next request is credited
    on the others with what splitting the prefix's traffic saves, more than one cold prefill; the same prefix at
    a few requests a second stays where it is. Once it is spread and the other endpoints are as busy, no further
    copy is made."""
    scorer, prefix = setup()
    endpoints = [ep(f"e{i}", index=i) for i in range(4)]
    hot = endpoints[1]
    prompt = words(12000, 1)  # 3,000 tokens
    hot_prefix(scorer, prefix, endpoints, hot, prompt, 200, age=60.0)
    scores = scorer.score(req(prompt + words(400, 999), rid="next"), endpoints)
    assert scores[1] < 1.0  # a cold prefill elsewhere is worth it now

    scorer, prefix = setup()
    endpoints = [ep(f"e{i}", index=i) for i in range(4)]
    hot_prefix(scorer, prefix, endpoints, endpoints[1], prompt, 4, age=60.0)
    scores = scorer.score(req(prompt + words(400, 999), rid="next"), endpoints)
    assert scores[1] == 1.0 and max(scores[0], scores[2], scores[3]) < 0.5

    scorer, prefix = setup()
    endpoints = [ep(f"e{i}", index=i) for i in range(4)]
    hot_prefix(scorer, prefix, endpoints, endpoints[1], prompt, 100, age=0.0)
    hot_prefix(scorer, prefix, endpoints, endpoints[2], prompt, 100, age=60.0)
    for k in (0, 3):  # as busy with other prompts
        hot_prefix(scorer, prefix, endpoints, endpoints[k], words(12000, 50 + k), 100, age=0.0)
    scores = scorer.score(req(prompt + words(400, 999), rid="next"), endpoints)
    assert max(scores[1], scores[2]) == 1.0 and max(scores[0], scores[3]) < 0.5


def test_credited_endpoints_keep_their_order():
    """A prefix hot enough that its credit exceeds a cold prefill's whole cost on every other endpoint: they are
    not tied at the top (the picker would choose among them at random), the idle ones rank above a busy one."""
    scorer, prefix = setup()
    endpoints = [ep(f"e{i}", index=i) for i in range(4)]
    prompt = words(12000, 1)  # 3,000 tokens
    hot_prefix(scorer, prefix, endpoints, endpoints[1], prompt, 600, age=60.0)
    busy = scorer._rates(endpoints[0])
    busy.pending[1] = _Pending(4000, time.monotonic() + 60.0)  # a long prefill queued there
    scores = scorer.score(req(prompt + words(400, 999), rid="next"), endpoints)
    assert scores[1] < 1.0  # the copy is worth making...
    assert scores[2] == scores[3] == 1.0 and scores[0] < 1.0  # ...where nothing waits


def test_the_credit_counts_as_far_as_the_prefix_binds_its_requests():
    """The same hot prefix, the same holder: an endpoint where the prefix is nearly all of the request's prefill is
    credited with nearly the whole saving of a split; one where it is a third (a long conversation that only
    starts with the prefix goes where its own history is, or where load says) with a third as much."""
    scorer, _ = setup()
    key = 7
    scorer.prefixes[key] = stat = PrefixRate(first=time.monotonic() - 60.0)
    for _ in range(60):
        stat.count(time.monotonic())

    def credit(cold_work: float) -> float:
        request = req("x", rid=f"r{cold_work}")
        request.attributes[scorer._prefix_key] = key
        held = Prediction(0.1, 0.0, 100, 0, 0.02, 1, 0.2, rate=2.0, occupancy=1.0, step_share=3e-4)
        cold = Prediction(0.1, 0.0, 3100, 0, 0.02, 0, cold_work, rate=0.0, occupancy=1.0, step_share=3e-4)
        costs = [100.0, 100.0]
        scorer._credit_replicas(request, [held, cold], costs)
        assert costs[0] == 100.0  # the holder is not credited
        return 100.0 - costs[1]

    nearly_all, a_third = credit(6.2), credit(0.3)
    assert nearly_all > 0.0
    assert a_third / nearly_all == pytest.approx((0.1 / 0.3) / (6.0 / 6.2), rel=1e-4)  # (the rate decays meanwhile)


def test_a_restarted_server_learns_its_batch_slots_again():
    pool = EndpointPool()
    scorer, _ = setup(pool)
    scorer.start()
    a = ep("a")
    r = scorer._rates(a)
    r.slots, r.max_running, r.run_scrapes = 16, 16, 3
    r.occupancy.value = 2.5
    pool.restarted(a, time.monotonic())
    assert (r.slots, r.max_running, r.run_scrapes) == (0, 0, 0) and r.occupancy.value == 2.5
    scorer.stop()
