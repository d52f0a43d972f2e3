"""Load, LoRA, session and no-hit-lru scorers: formulas, edge cases, stale metrics, configuration."""

from __future__ import annotations

import base64

import pytest

from epp.plugin import DEFAULT_SCORER_STALENESS
from epp.scheduling.config import load_config
from epp.scheduling.plugins import ProfileResult, SchedulingResult
from epp.scheduling.registry import PluginConfigError
from epp_plugins.scorers.load import QueueScorer
from tests.scorers_helpers import HEAD, config, ep, eps, plugin, req, score


def result(endpoint, profile="default", **others):
    results = {profile: ProfileResult([endpoint])}
    results.update({k: ProfileResult([v]) for k, v in others.items()})
    return SchedulingResult(results, profile)


# -- queue / running / kv-cache ---------------------------------------------------------------------

def test_queue_scorer_min_max_formula():
    q = plugin("queue-scorer")
    assert score(q, eps({"waiting": 3}, {"waiting": 0}, {"waiting": 10})) == [0.7, 1.0, 0.0]


def test_queue_scorer_all_equal_single_and_empty():
    q = plugin("queue-scorer")
    assert score(q, eps({"waiting": 4}, {"waiting": 4})) == [1.0, 1.0]
    assert score(q, eps({"waiting": 9})) == [1.0]
    assert score(q, []) == []


def test_queue_scorer_stale_or_never_scraped_is_worst_and_excluded_from_normalisation():
    q = plugin("queue-scorer")
    # the stale endpoint reports an empty queue: it must not win, nor stretch the others' range
    endpoints = eps({"waiting": 4}, {"waiting": 0, "age": 5.0}, {"waiting": 8}, {"waiting": 0, "fresh": False})
    assert score(q, endpoints) == [1.0, 0.0, 0.0, 0.0]
    assert score(q, eps({"waiting": 2, "fresh": False}, {"waiting": 0, "age": 3.0})) == [0.0, 0.0]


def test_staleness_threshold_parameter():
    endpoints = eps({"waiting": 4, "age": 1.0}, {"waiting": 8})
    assert score(plugin("queue-scorer", "{metricsStalenessThreshold: 500ms}"), endpoints) == [0.0, 1.0]
    assert score(plugin("queue-scorer", "{metricsStalenessThreshold: 2s}"), endpoints) == [1.0, 0.0]
    assert score(plugin("queue-scorer", "{metricsStalenessThreshold: 0}"),  # 0: trust any age
                 eps({"waiting": 4, "fresh": False}, {"waiting": 8})) == [1.0, 0.0]


def test_staleness_threshold_follows_the_flag_unless_set():
    """--metrics-staleness-threshold reaches the configuration loader: a staleness-aware plugin not given its own
    ``metricsStalenessThreshold`` trusts metrics up to the flag's age; one given its own keeps it."""
    text = HEAD + """plugins:
- type: queue-scorer
- {type: load-aware-scorer, parameters: {metricsStalenessThreshold: 2s}}
- type: predicted-latency-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}, {pluginRef: load-aware-scorer}, {pluginRef: predicted-latency-scorer}]
"""
    loaded = load_config(text, metrics_staleness_threshold=0.5)
    queue, load_aware, latency = (loaded.plugins[n] for n in ("queue-scorer", "load-aware-scorer",
                                                              "predicted-latency-scorer"))
    assert (queue.staleness, load_aware.staleness, latency.staleness) == (0.5, 2.0, 0.5)
    endpoints = eps({"waiting": 4, "age": 1.0}, {"waiting": 8})  # the first scraped 1 s ago
    assert score(queue, endpoints) == [0.0, 1.0]  # stale under the flag's 0.5 s
    assert score(load_aware, endpoints) == [0.484375, 0.46875]  # its own 2 s: fresh
    assert load_config(text).plugins["queue-scorer"].staleness == DEFAULT_SCORER_STALENESS  # the flag's default
    assert QueueScorer().staleness == DEFAULT_SCORER_STALENESS  # no handle (built outside a configuration)
    reloaded = load_config(text, previous=loaded, metrics_staleness_threshold=0.5)
    assert reloaded.plugins["queue-scorer"] is queue and queue.staleness == 0.5  # kept across a reload


def test_running_requests_scorer():
    r = plugin("running-requests-size-scorer")
    assert score(r, eps({"running": 10}, {"running": 30}, {"running": 20})) == [1.0, 0.0, 0.5]
    assert score(r, eps({"running": 5}, {"running": 5})) == [1.0, 1.0]
    assert score(r, eps({"running": 0, "fresh": False}, {"running": 7})) == [0.0, 1.0]
    assert score(r, []) == []


def test_kv_cache_scorer():
    k = plugin("kv-cache-utilization-scorer")
    assert score(k, eps({"kv": 0.25}, {"kv": 1.0}, {"kv": 0.0}, {"kv": 1.2})) == [0.75, 0.0, 1.0, 0.0]
    assert score(k, eps({"kv": 0.0, "fresh": False})) == [0.0]


def test_kv_cache_scorer_counts_what_epp_routed_since_the_scrape():
    k = plugin("kv-cache-utilization-scorer")
    a, b = eps({"kv": 0.25}, {"kv": 0.3})
    for e in (a, b):
        e.metrics.num_gpu_blocks, e.metrics.block_size = 1000, 16  # 16,000 tokens of KV
    assert score(k, [a, b]) == [0.75, 0.7]
    a.inflight_tokens += 1600  # a pick since the scrape: a is the fuller one until the next scrape says
    assert score(k, [a, b]) == [0.65, 0.7]
    a.metrics.inflight_tokens_at_scrape = 1600  # scraped again: the server's own figure includes it
    a.inflight_tokens = 800  # requests finished since: their blocks are free
    assert score(k, [a, b]) == [0.8, 0.7]
    a.inflight_tokens = 10**9
    assert score(k, [a, b]) == [0.0, 0.7]
    b.metrics.num_gpu_blocks = None  # capacity unknown: the scraped value alone (GIE)
    b.inflight_tokens = 10**9
    assert score(k, [a, b]) == [0.0, 0.7]
    assert score(k, []) == []


# -- load-aware / lora ------------------------------------------------------------------------------

def test_load_aware_scorer_formula():
    la = plugin("load-aware-scorer")
    assert score(la, eps({"waiting": 0}, {"waiting": 64}, {"waiting": 128}, {"waiting": 500})) == [0.5, 0.25, 0.0, 0.0]
    assert score(plugin("load-aware-scorer", "{threshold: 10}"), eps({"waiting": 5})) == [0.25]
    assert score(la, eps({"waiting": 0, "fresh": False})) == [0.0]
    assert score(la, []) == []


def test_lora_affinity_scorer_formula():
    lo = plugin("lora-affinity-scorer")
    endpoints = eps(
        {"active": ("sql-lora",), "max_active": 2},  # active -> 1
        {"active": ("a",), "max_active": 4},  # room -> 0.8
        {"active": ("a", "b"), "waiting_models": ("sql-lora",), "max_active": 2},  # full, waiting -> 0.6
        {"active": ("a", "b"), "max_active": 2},  # full -> 0
        {"active": ("sql-lora",), "max_active": 2, "fresh": False},  # stale -> 0
    )
    assert score(lo, endpoints, req("hi", model="sql-lora")) == [1.0, 0.8, 0.6, 0.0, 0.0]
    # a base-model request on servers without LoRA metrics: all equal
    assert score(lo, eps({}, {}), req("hi", model="base")) == [0.0, 0.0]
    assert score(lo, [], req("hi", model="sql-lora")) == []


# -- in-flight based --------------------------------------------------------------------------------

def test_active_request_scorer():
    ar = plugin("active-request-scorer")
    endpoints = eps({"inflight": 0}, {"inflight": 2}, {"inflight": 4})
    assert score(ar, endpoints) == [1.0, 0.5, 0.0]
    assert score(plugin("active-request-scorer", "{idleThreshold: 2, maxBusyScore: 0.5}"), endpoints) == [1.0, 1.0, 0.0]
    assert score(plugin("active-request-scorer", "{maxBusyScore: 0.5}"),
                 eps({"inflight": 1}, {"inflight": 4})) == [0.375, 0.0]
    assert score(ar, eps({"inflight": 3}, {"inflight": 3})) == [0.0, 0.0]  # all busy and equal
    assert score(ar, eps({}, {})) == [1.0, 1.0]
    assert score(ar, []) == []
    plugin("active-request-scorer", "{requestTimeout: 2m}")  # accepted for old configs, ignored


def test_token_load_scorer_without_prefix_plugin():
    tl = plugin("token-load-scorer", "{queueThresholdTokens: 1000}")
    assert score(tl, eps({"tokens": 0}, {"tokens": 100}, {"tokens": 900}, {"tokens": 5000})) == [1.0, 0.9, 0.1, 0.0]
    assert score(plugin("token-load-scorer"), eps({"tokens": 4194304 // 2})) == [0.5]
    assert score(tl, []) == []


def test_token_load_scorer_charges_the_uncached_part_of_the_prompt():
    cfg = config("plugins:\n- type: prefix-cache-scorer\n- type: token-load-scorer\n"
                 "  parameters: {queueThresholdTokens: 10000}\n")
    prefix, tl = cfg.plugins["prefix-cache-scorer"], cfg.plugins["token-load-scorer"]
    a, b = eps({"tokens": 1000}, {"tokens": 1000})
    text = "x" * 4000  # 62.5 blocks of 64 characters: ~1000 tokens
    first = req(text)
    prefix.score(first, [a, b])
    prefix.pre_request(first, result(a))
    again = req(text)
    s = score(tl, [a, b], again)
    assert s[1] == pytest.approx(1 - (1000 + 1000) / 10000)
    assert s[0] == pytest.approx(1 - 1000 / 10000)  # a holds the whole prompt


# -- no-hit-lru -------------------------------------------------------------------------------------

def test_no_hit_lru_cold_requests_spread_in_lru_order():
    cfg = config("plugins:\n- type: prefix-cache-scorer\n- type: no-hit-lru-scorer\n")
    nh = cfg.plugins["no-hit-lru-scorer"]
    a, b, c = eps({}, {}, {})
    cold = req("y" * 200, rid="1")
    assert score(nh, [a, b, c], cold) == [1.0, 0.5, 0.0]  # never used: candidate order
    nh.pre_request(cold, result(a))
    cold2 = req("z" * 200, rid="2")
    assert score(nh, [a, b, c], cold2) == [0.0, 1.0, 0.5]  # a used: after the never-used ones
    nh.pre_request(cold2, result(b))
    assert score(nh, [a, b, c], req("w" * 200)) == [0.5, 0.0, 1.0]  # c never used, then a (older), then b
    assert score(nh, [b], req("v" * 200)) == [1.0]
    assert score(nh, [], req("v" * 200)) == []


def test_no_hit_lru_is_neutral_for_warm_requests_and_lru_is_bounded():
    cfg = config("plugins:\n- type: prefix-cache-scorer\n- type: no-hit-lru-scorer\n  parameters: {lruSize: 1}\n")
    prefix, nh = cfg.plugins["prefix-cache-scorer"], cfg.plugins["no-hit-lru-scorer"]
    a, b = eps({}, {})
    text = "p" * 400
    first = req(text)
    score(prefix, [a, b], first)
    score(nh, [a, b], first)
    prefix.pre_request(first, result(a))
    nh.pre_request(first, result(a))
    warm = req(text)
    score(prefix, [a, b], warm)
    assert score(nh, [a, b], warm) == [0.5, 0.5]
    nh.pre_request(warm, result(a))  # warm: LRU unchanged
    other = req("q" * 400)
    score(nh, [a, b], other)
    nh.pre_request(other, result(b))
    assert list(nh._lru) == ["e1"]  # lruSize 1


def test_no_hit_lru_needs_a_prefix_plugin():
    with pytest.raises(PluginConfigError, match="no prefix-cache-scorer"):
        config("plugins:\n- type: no-hit-lru-scorer\n")
    with pytest.raises(PluginConfigError, match="is not a prefix-cache-scorer"):
        config("plugins:\n- type: queue-scorer\n- type: no-hit-lru-scorer\n"
               "  parameters: {prefixPluginName: queue-scorer}\n")


# -- session affinity -------------------------------------------------------------------------------

def token(text):
    return base64.b64encode(text.encode()).decode()


def test_session_affinity_encoded_endpoint_header():
    s = plugin("session-affinity-scorer")
    a, b, c = eps({}, {}, {})
    assert score(s, [a, b, c], req("x", headers={"x-session-token": token("e1")})) == [0, 1, 0]
    assert score(s, [a, b, c], req("x", headers={"x-session-token": token("default/e2")})) == [0, 0, 1]
    assert score(s, [a, b, c], req("x", headers={"x-session-token": token("10.0.0.1:8000")})) == [1, 0, 0]
    assert score(s, [a, b, c], req("x", headers={"x-session-token": token("gone")})) == [0, 0, 0]
    assert score(s, [a, b, c], req("x", headers={"x-session-token": "%%%not base64"})) == [0, 0, 0]
    assert score(s, [a, b, c], req("x")) == [0, 0, 0]
    assert score(s, [], req("x")) == []
    r = req("x")
    s.pre_request(r, result(b))
    assert r.response_headers == {"x-session-token": token("e1")}


def test_session_affinity_custom_header_and_urlsafe_token():
    s = plugin("session-affinity-scorer", "{encodedEndpointHeaderConfig: {header: X-Pin}}")
    a, b = eps({"name": "pod/a?"}, {})
    raw = base64.urlsafe_b64encode(b"pod/a?").decode().rstrip("=")
    assert score(s, [a, b], req("x", headers={"x-pin": raw})) == [1, 0]


def test_session_affinity_session_id_binding_ttl_and_sweep(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("epp.clock._source", lambda: now[0])
    s = plugin("session-affinity-scorer", "{strategy: session_id, sessionIdConfig: "
                                          "{evictionTtlSeconds: 60, evictionSweepSeconds: 5}}")
    a, b = eps({}, {})
    first = req("x", headers={"x-session-id": "abc"})
    assert score(s, [a, b], first) == [0, 0]  # new session
    s.pre_request(first, result(b))
    assert score(s, [a, b], req("x", headers={"x-session-id": "abc"})) == [0, 1]
    assert score(s, [a], req("x", headers={"x-session-id": "abc"})) == [0]  # bound endpoint not a candidate
    assert score(s, [a, b], req("x", headers={"x-session-id": "other"})) == [0, 0]
    now[0] += 61
    assert score(s, [a, b], req("x", headers={"x-session-id": "abc"})) == [0, 0]  # expired
    assert s.sessions() == 0  # swept


def test_session_affinity_sources_and_profile():
    s = plugin("session-affinity-scorer", "{strategy: session_id, profileName: prefill, sessionIdConfig: "
                                          "{sources: [{header: x-conv}, {attribute: agent-identity}]}}")
    a, b = eps({}, {})
    r = req("x")
    r.attributes["agent-identity"] = "agent-7"
    s.pre_request(r, result(a, prefill=b))
    r2 = req("x")
    r2.attributes["agent-identity"] = "agent-7"
    assert score(s, [a, b], r2) == [0, 1]


@pytest.mark.parametrize("params, message", [
    ("{strategy: cookie}", "strategy must be one of"),
    ("{sessionIdConfig: {sources: []}}", "sources must be a non-empty list"),
    ("{sessionIdConfig: {sources: [{header: a, attribute: b}]}}", "exactly one of header, attribute"),
    ("{sessionIdConfig: {sources: [{cookie: a}]}}", "unknown field(s) ['cookie']"),
    ("{sessionIdConfig: {evictionSweepSeconds: 0}}", "evictionSweepSeconds must be > 0"),
    ("{sessionIdConfig: {evictionTtlSeconds: -1}}", "evictionTtlSeconds must be >= 0"),
    ("{encodedEndpointHeaderConfig: {name: x}}", "unknown field(s) ['name']"),
])
def test_session_affinity_config_errors(params, message):
    with pytest.raises(PluginConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        plugin("session-affinity-scorer", params)


# -- configuration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name, params, message", [
    ("queue-scorer", "{metricsStalenessThreshold: soon}", "invalid duration"),
    ("queue-scorer", "{metricsStalenessThreshold: -1}", "must not be negative"),
    ("queue-scorer", "{threshold: 3}", "unknown parameter(s) ['threshold']"),
    ("kv-cache-utilization-scorer", "{metricsStalenessThreshold: [1]}", "must be a number"),
    ("load-aware-scorer", "{threshold: 0}", "threshold must be >= 1"),
    ("load-aware-scorer", "{threshold: many}", "threshold must be an integer"),
    ("active-request-scorer", "{idleThreshold: -1}", "idleThreshold must be >= 0"),
    ("active-request-scorer", "{maxBusyScore: 1.5}", "maxBusyScore must be <= 1"),
    ("active-request-scorer", "{requestTimeout: forever}", "invalid duration"),
    ("token-load-scorer", "{queueThresholdTokens: 0}", "queueThresholdTokens must be >= 1"),
    ("token-load-scorer", "{queueThresholdTokens: true}", "queueThresholdTokens must be an integer"),
    ("token-load-scorer", "{prefixPluginName: nope}", "'nope' is not a prefix-cache-scorer"),
    ("no-hit-lru-scorer", "{lruSize: 0}", "lruSize must be >= 1"),
    ("lora-affinity-scorer", "{weight: 1}", "unknown parameter(s) ['weight']"),
])
def test_parameter_validation(type_name, params, message):
    esc = message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(PluginConfigError, match=esc):
        plugin(type_name, params)


def test_llm_d_style_profile_loads_and_schedules():
    cfg = config("""\
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: load-aware-scorer
  parameters: {threshold: 64}
- type: active-request-scorer
  parameters: {idleThreshold: 1, maxBusyScore: 0.8}
- type: token-load-scorer
- type: lora-affinity-scorer
- type: session-affinity-scorer
- type: prefix-cache-scorer
  parameters: {scoreMode: ratio}
- type: no-hit-lru-scorer
  parameters: {lruSize: 16}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: load-aware-scorer}
  - {pluginRef: active-request-scorer}
  - {pluginRef: token-load-scorer}
  - {pluginRef: lora-affinity-scorer}
  - {pluginRef: session-affinity-scorer, weight: 10}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: no-hit-lru-scorer, weight: 2}
""")
    endpoints = eps({"waiting": 5, "kv": 0.5}, {"waiting": 0, "kv": 0.1}, {"waiting": 1, "kv": 0.9})
    pinned = req("hello world " * 50, headers={"x-session-token": token("e2")})
    assert cfg.scheduler.schedule(pinned, endpoints).endpoints[0].name == "e2"
    free = req("hello world " * 50)
    assert cfg.scheduler.schedule(free, endpoints).endpoints[0].name == "e1"


def test_endpoint_helper_defaults_are_fresh():
    e = ep("x")
    assert e.metrics.age() < 1.0
