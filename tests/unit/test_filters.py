"""Filters: label selectors, utilization, prefix-cache affinity, session affinity."""

from __future__ import annotations

import base64

import pytest

from epp.api.errors import EppError
from epp.scheduling.plugins import ProfileResult, SchedulingResult
from epp.scheduling.registry import PluginConfigError
from tests.scorers_helpers import config, eps, plugin, req


def names(endpoints):
    return [e.name for e in endpoints]


def run(f, endpoints, request=None):
    return names(f.filter(request or req("hello"), endpoints))


def esc(message):
    return message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")


# -- labels -----------------------------------------------------------------------------------------

LABELLED = [
    {"labels": {"llm-d.ai/role": "decode", "zone": "a"}},
    {"labels": {"llm-d.ai/role": "prefill", "zone": "b"}},
    {"labels": {"llm-d.ai/role": "both"}},
    {"labels": {}},
]


def test_label_selector_match_labels_and_expressions():
    f = plugin("label-selector-filter", "{matchLabels: {zone: a}}")
    assert run(f, eps(*LABELLED)) == ["e0"]
    f = plugin("label-selector-filter", "{matchExpressions: [{key: llm-d.ai/role, operator: In, "
                                        "values: [decode, both]}]}")
    assert run(f, eps(*LABELLED)) == ["e0", "e2"]
    f = plugin("label-selector-filter", "{matchExpressions: [{key: llm-d.ai/role, operator: NotIn, "
                                        "values: [prefill]}]}")
    assert run(f, eps(*LABELLED)) == ["e0", "e2", "e3"]  # NotIn keeps endpoints without the label (k8s)
    f = plugin("label-selector-filter", "{matchExpressions: [{key: zone, operator: Exists}]}")
    assert run(f, eps(*LABELLED)) == ["e0", "e1"]
    f = plugin("label-selector-filter", "{matchExpressions: [{key: zone, operator: DoesNotExist}]}")
    assert run(f, eps(*LABELLED)) == ["e2", "e3"]
    f = plugin("label-selector-filter", "{matchLabels: {zone: a}, matchExpressions: [{key: llm-d.ai/role, "
                                        "operator: In, values: [prefill]}]}")
    assert run(f, eps(*LABELLED)) == []  # AND of everything; an empty result fails the profile


def test_label_selector_empty_selects_everything_and_empty_input():
    f = plugin("label-selector-filter")
    assert run(f, eps(*LABELLED)) == ["e0", "e1", "e2", "e3"]
    assert run(f, []) == []


def test_label_selector_non_string_values_are_compared_as_yaml_writes_them():
    f = plugin("label-selector-filter", "{matchLabels: {gpu: 80, spot: true}}")
    assert run(f, eps({"labels": {"gpu": "80", "spot": "true"}}, {"labels": {"gpu": "40"}})) == ["e0"]


def test_by_label_and_by_label_selector():
    f = plugin("by-label", "{label: llm-d.ai/role, validValues: [decode, both], allowsNoLabel: true}")
    assert run(f, eps(*LABELLED)) == ["e0", "e2", "e3"]
    f = plugin("by-label", "{label: llm-d.ai/role, validValues: [prefill]}")
    assert run(f, eps(*LABELLED)) == ["e1"]
    f = plugin("by-label-selector", "{matchLabels: {llm-d.ai/role: both}}")
    assert run(f, eps(*LABELLED)) == ["e2"]


@pytest.mark.parametrize("type_name, params, message", [
    ("label-selector-filter", "{matchLabels: [a]}", "matchLabels must be a mapping"),
    ("label-selector-filter", "{matchLabels: {a: {b: c}}}", "label values must be strings"),
    ("label-selector-filter", "{matchExpressions: {key: a}}", "matchExpressions must be a list"),
    ("label-selector-filter", "{matchExpressions: [{key: a, operator: Gt, values: ['1']}]}",
     "matchExpressions[0].operator must be one of"),
    ("label-selector-filter", "{matchExpressions: [{key: a, operator: In}]}", "operator In needs values"),
    ("label-selector-filter", "{matchExpressions: [{key: a, operator: Exists, values: [x]}]}", "takes no values"),
    ("label-selector-filter", "{matchExpressions: [{operator: Exists}]}", "matchExpressions[0].key must be"),
    ("label-selector-filter", "{matchExpressions: [{key: a, operator: Exists, value: x}]}", "unknown field(s)"),
    ("by-label", "{}", "label must be a non-empty string"),
    ("by-label", "{label: a, validValues: b}", "validValues must be a list"),
    ("by-label-selector", "{matchExpressions: []}", "unknown parameter(s) ['matchExpressions']"),
])
def test_label_filter_config_errors(type_name, params, message):
    with pytest.raises(PluginConfigError, match=esc(message)):
        plugin(type_name, params)


# -- utilization ------------------------------------------------------------------------------------

def test_utilization_filter_thresholds_and_headroom():
    endpoints = eps({"waiting": 4, "kv": 0.5}, {"waiting": 5, "kv": 0.1}, {"waiting": 0, "kv": 0.8},
                    {"waiting": 0, "kv": 0.79})
    assert run(plugin("utilization-filter"), endpoints) == ["e0", "e3"]  # queue < 5 and kv < 0.8
    assert run(plugin("utilization-filter", "{headroom: 0.2}"), endpoints) == ["e0", "e1", "e2", "e3"]
    assert run(plugin("utilization-filter", "{queueDepthThreshold: 5, kvCacheUtilThreshold: 0.79}"),
               endpoints) == ["e0"]


def test_utilization_filter_drops_stale_metrics():
    endpoints = eps({"waiting": 0, "age": 0.5}, {"waiting": 1}, {"fresh": False})
    assert run(plugin("utilization-filter"), endpoints) == ["e1"]  # 200ms default
    assert run(plugin("utilization-filter", "{metricsStalenessThreshold: 1s}"), endpoints) == ["e0", "e1"]
    assert run(plugin("utilization-filter", "{metricsStalenessThreshold: 0}"), endpoints) == ["e0", "e1", "e2"]


def test_utilization_filter_returns_everything_rather_than_nothing():
    endpoints = eps({"waiting": 50}, {"kv": 0.99}, {"fresh": False})
    assert run(plugin("utilization-filter"), endpoints) == ["e0", "e1", "e2"]
    assert run(plugin("utilization-filter"), []) == []


@pytest.mark.parametrize("params, message", [
    ("{queueDepthThreshold: 0}", "queueDepthThreshold must be >= 1"),
    ("{kvCacheUtilThreshold: 0}", "kvCacheUtilThreshold must be > 0"),
    ("{kvCacheUtilThreshold: 1.5}", "kvCacheUtilThreshold must be <= 1"),
    ("{headroom: -0.1}", "headroom must be >= 0"),
    ("{metricsStalenessThreshold: later}", "invalid duration"),
])
def test_utilization_filter_config_errors(params, message):
    with pytest.raises(PluginConfigError, match=esc(message)):
        plugin("utilization-filter", params)


# -- prefix-cache affinity --------------------------------------------------------------------------

AFF = "- type: prefix-cache-scorer\n- type: prefix-cache-affinity-filter\n"
AFFINITY = "plugins:\n" + AFF


def routed(cfg, text, target, endpoints, rid="seed"):
    """Index ``text`` on ``target`` as a routed request would."""
    prefix = cfg.plugins["prefix-cache-scorer"]
    r = req(text, rid=rid)
    prefix.score(r, endpoints)
    prefix.pre_request(r, SchedulingResult({"default": ProfileResult([target])}, "default"))


def test_affinity_filter_keeps_sticky_endpoints():
    cfg = config(AFFINITY)
    f = cfg.plugins["prefix-cache-affinity-filter"]
    endpoints = eps({}, {}, {}, {})
    text = "a" * 6400  # 100 blocks
    routed(cfg, text, endpoints[1], endpoints)
    routed(cfg, text[:5440], endpoints[2], endpoints)  # 85 blocks: >= 0.8
    routed(cfg, text[:3200], endpoints[3], endpoints)  # 50 blocks: not sticky
    assert run(f, endpoints, req(text)) == ["e1", "e2"]


def test_affinity_filter_passes_everything_when_nothing_or_everything_is_sticky():
    cfg = config(AFFINITY)
    f = cfg.plugins["prefix-cache-affinity-filter"]
    endpoints = eps({}, {})
    assert run(f, endpoints, req("b" * 6400)) == ["e0", "e1"]  # no sticky endpoint
    assert run(f, endpoints, req("tiny")) == ["e0", "e1"]  # no block at all
    routed(cfg, "c" * 640, endpoints[0], endpoints)
    routed(cfg, "c" * 640, endpoints[1], endpoints)
    assert run(f, endpoints, req("c" * 640)) == ["e0", "e1"]
    assert run(f, endpoints[:1], req("c" * 640)) == ["e0"]
    assert run(f, [], req("c" * 640)) == []


def test_affinity_filter_breaks_stickiness_when_the_sticky_endpoints_are_too_busy():
    # 100 000 in-flight tokens at 15 928 tok/s ~ 6.3 s of prefill ahead; the prompt is 1600 tokens
    cfg = config(AFFINITY.replace("affinity-filter\n", "affinity-filter\n  parameters: {maxTTFTPenaltyMs: 5000}\n"))
    f = cfg.plugins["prefix-cache-affinity-filter"]
    busy, idle = eps({"tokens": 100_000}, {"tokens": 0})
    routed(cfg, "d" * 6400, busy, [busy, idle])
    assert run(f, [busy, idle], req("d" * 6400)) == ["e0", "e1"]
    busy.inflight_tokens = 60_000  # ~3.8 s - 0.1 s for the prompt idle must prefill: stick
    assert run(f, [busy, idle], req("d" * 6400)) == ["e0"]
    zero = config(AFFINITY.replace("affinity-filter\n", "affinity-filter\n  parameters: {maxTTFTPenaltyMs: 0}\n"))
    busy.inflight_tokens = 10**9
    routed(zero, "d" * 6400, busy, [busy, idle])
    assert run(zero.plugins["prefix-cache-affinity-filter"], [busy, idle], req("d" * 6400)) == ["e0"]


def test_affinity_filter_exploration_and_min_match_tokens():
    cfg = config(AFFINITY.replace("affinity-filter\n",
                                  "affinity-filter\n  parameters: {explorationProbability: 1.0}\n"))
    endpoints = eps({}, {})
    routed(cfg, "e" * 6400, endpoints[0], endpoints)
    assert run(cfg.plugins["prefix-cache-affinity-filter"], endpoints, req("e" * 6400)) == ["e0", "e1"]
    cfg = config(AFFINITY.replace("affinity-filter\n", "affinity-filter\n  parameters: {minMatchTokens: 2000}\n"))
    routed(cfg, "e" * 6400, endpoints[0], endpoints)
    assert run(cfg.plugins["prefix-cache-affinity-filter"], endpoints, req("e" * 6400)) == ["e0", "e1"]  # 1600 < 2000
    routed(cfg, "e" * 9600, endpoints[0], endpoints)
    assert run(cfg.plugins["prefix-cache-affinity-filter"], endpoints, req("e" * 9600)) == ["e0"]


@pytest.mark.parametrize("body, message", [
    ("- type: prefix-cache-affinity-filter\n", "no prefix-cache-scorer"),
    (AFF + "  parameters: {affinityThreshold: 0}\n", "affinityThreshold must be > 0"),
    (AFF + "  parameters: {explorationProbability: 2}\n", "explorationProbability must be <= 1"),
    (AFF + "  parameters: {peakPrefillThroughput: 0}\n", "peakPrefillThroughput must be > 0"),
    (AFF + "  parameters: {maxTTFTPenaltyMs: -1}\n", "maxTTFTPenaltyMs must be >= 0"),
    (AFF + "  parameters: {ttftSource: predictor}\n", "unknown parameter(s) ['ttftSource']"),
    ("- {name: p1, type: prefix-cache-scorer}\n- {name: p2, type: prefix-cache-scorer}\n"
     "- type: prefix-cache-affinity-filter\n", "several prefix-cache-scorer"),
])
def test_affinity_filter_config_errors(body, message):
    with pytest.raises(PluginConfigError, match=esc(message)):
        config("plugins:\n" + body)


def test_token_aware_profile_end_to_end():
    """llm-d's 2026 default shape: affinity filter + token-load scorer + max-score picker."""
    cfg = config("""\
plugins:
- type: approx-prefix-cache-producer
- type: prefix-cache-affinity-filter
- type: token-load-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-affinity-filter
  - pluginRef: token-load-scorer
  - pluginRef: max-score-picker
""")
    prod = cfg.plugins["approx-prefix-cache-producer"]
    endpoints = eps({"tokens": 5000}, {"tokens": 9000}, {"tokens": 100})
    text = "f" * 8000
    first = req(text, rid="1")
    picked = cfg.scheduler.schedule(first, endpoints)
    assert names(picked.endpoints) == ["e2"]  # cold: least loaded
    prod.pre_request(first, picked)
    endpoints[2].inflight_tokens = 20_000  # now the busiest, still sticky (20k tokens ~ 1.3 s)
    assert names(cfg.scheduler.schedule(req(text, rid="2"), endpoints).endpoints) == ["e2"]


# -- session affinity filter ------------------------------------------------------------------------

def test_session_affinity_filter_pins_when_the_endpoint_is_a_candidate():
    f = plugin("session-affinity-filter")
    endpoints = eps({}, {}, {})
    pinned = req("x", headers={"x-session-token": base64.b64encode(b"ns/e1").decode()})
    assert run(f, endpoints, pinned) == ["e1"]
    assert run(f, [endpoints[0], endpoints[2]], pinned) == ["e0", "e2"]
    assert run(f, endpoints, req("x")) == ["e0", "e1", "e2"]
    assert run(f, [], pinned) == []


def test_empty_filter_result_fails_scheduling_with_429():
    cfg = config("plugins:\n- type: label-selector-filter\n  parameters: {matchLabels: {zone: nowhere}}\n"
                 "- type: queue-scorer\n")
    with pytest.raises(EppError) as err:
        cfg.scheduler.schedule(req("x"), eps(*LABELLED))
    assert err.value.status == 429
