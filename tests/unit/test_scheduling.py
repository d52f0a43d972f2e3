"""EndpointPickerConfig parsing, validation and defaults; pickers and the weighted sum."""

from __future__ import annotations

import pytest

from epp.api.types import ApiKind, InferenceRequest, ParsedBody
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.config import load_config
from epp.scheduling.plugins import ScoredEndpoint, Scorer
from epp.scheduling.registry import PluginConfigError, register_plugin
from epp_plugins.pickers import MaxScorePicker, RandomPicker, WeightedRandomPicker
from epp_plugins.profile_handlers import SingleProfileHandler

HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"


def request() -> InferenceRequest:
    return InferenceRequest("r1", "/v1/completions", "POST", {}, ParsedBody(ApiKind.COMPLETIONS, "m"), b"")


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"e{i}", f"10.0.0.{i}", 8000) for i in range(n)]


def test_default_config_is_the_predicted_latency_profile_and_gies_is_kept_by_name():
    from epp.scheduling.config import BUILTIN_CONFIGS

    cfg = load_config(None)
    (profile,) = cfg.scheduler.profiles.values()
    assert [(s.type_name, w) for s, w in profile.scorers] == [("predicted-latency-scorer", 1.0)]
    assert isinstance(profile.picker, MaxScorePicker) and profile.picker.k == 1
    assert set(BUILTIN_CONFIGS) == {"epp-default", "gie-default"}
    cfg = load_config(BUILTIN_CONFIGS["gie-default"])
    (profile,) = cfg.scheduler.profiles.values()
    assert [(s.type_name, w) for s, w in profile.scorers] == [
        ("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0)]
    assert isinstance(profile.picker, MaxScorePicker) and profile.picker.k == 1
    assert isinstance(cfg.scheduler.handler, SingleProfileHandler)


@pytest.mark.parametrize("api_version", ["inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1"])
def test_both_api_versions_and_implicit_profile(api_version):
    cfg = load_config(f"apiVersion: {api_version}\nkind: EndpointPickerConfig\nplugins:\n"
                      "- type: queue-scorer\n- type: random-picker\n  parameters: {maxNumOfEndpoints: 2}\n")
    (profile,) = cfg.scheduler.profiles.values()
    assert profile.name == "default" and [s.type_name for s, _ in profile.scorers] == ["queue-scorer"]
    assert isinstance(profile.picker, RandomPicker) and profile.picker.k == 2


@pytest.mark.parametrize(("text", "message"), [
    ("apiVersion: v1\nkind: EndpointPickerConfig\n", "apiVersion must be one of"),
    (HEAD + "plugins:\n- type: no-such-plugin\n", "unknown type 'no-such-plugin'"),
    (HEAD + "plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpointz: 2}\n",
     "unknown parameter(s) ['maxNumOfEndpointz']"),
    (HEAD + "plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 0}\n", "maxNumOfEndpoints must be"),
    (HEAD + "plugins:\n- type: queue-scorer\n- type: queue-scorer\n", "duplicate plugin name"),
    (HEAD + "schedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: nope\n", "pluginRef 'nope' is not defined"),
    (HEAD + "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n"
     "    weight: -1\n", "weight must be a non-negative number"),
    (HEAD + "plugins:\n- type: queue-scorer\n  paramters: {}\n", "unknown field(s) ['paramters']"),
    (HEAD + "bogus: 1\n", "unknown field(s) ['bogus']"),
    (HEAD + "plugins:\n- type: random-picker\n- type: max-score-picker\nschedulingProfiles:\n- name: a\n  plugins:\n"
     "  - pluginRef: random-picker\n  - pluginRef: max-score-picker\n", "more than one picker"),
    (HEAD + "schedulingProfiles:\n- name: a\n- name: b\n", "need a profile handler"),
    ("{{{", "not valid YAML"),
])
def test_invalid_configs_are_refused_with_a_clear_message(text, message):
    with pytest.raises(PluginConfigError) as e:
        load_config(text)
    assert message in str(e.value)


@register_plugin("test-fixed-scorer")
class FixedScorer(Scorer):
    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def score(self, request, eps):
        return self.scores[: len(eps)]


def test_weighted_sum_with_clamping():
    cfg = load_config(HEAD + """plugins:
- {name: a, type: test-fixed-scorer, parameters: {scores: [1.0, 0.0, 5.0]}}
- {name: b, type: test-fixed-scorer, parameters: {scores: [0.0, 1.0, -3.0]}}
schedulingProfiles:
- name: p
  plugins: [{pluginRef: a, weight: 1}, {pluginRef: b, weight: 3}]
""")
    result = cfg.scheduler.schedule(request(), endpoints(3), explain=True)
    assert result.endpoints[0].name == "e1"  # 0*1 + 1*3 beats 1*1 and clamp(5)*1 + clamp(-3)*3 = 1
    assert result.profile_results["p"].scores["total"] == {"e0": 1.0, "e1": 3.0, "e2": 1.0}


def test_max_score_picker_breaks_ties_at_random_and_returns_fallbacks():
    eps = endpoints(4)
    scored = [ScoredEndpoint(e, s) for e, s in zip(eps, [0.5, 0.9, 0.9, 0.1], strict=True)]
    picker = MaxScorePicker(seed=1)
    winners = {picker.pick(request(), scored)[0].name for _ in range(200)}
    assert winners == {"e1", "e2"}
    top3 = MaxScorePicker(max_num_of_endpoints=3, seed=2).pick(request(), scored)
    assert {e.name for e in top3[:2]} == {"e1", "e2"} and top3[2].name == "e0"


def test_weighted_random_picker_follows_scores():
    eps = endpoints(3)
    scored = [ScoredEndpoint(e, s) for e, s in zip(eps, [0.0, 1.0, 3.0], strict=True)]
    picker = WeightedRandomPicker(seed=3)
    counts = {"e0": 0, "e1": 0, "e2": 0}
    for _ in range(4000):
        counts[picker.pick(request(), scored)[0].name] += 1
    assert counts["e0"] == 0 and 0.65 < counts["e2"] / 4000 < 0.85
    zeros = [ScoredEndpoint(e, 0.0) for e in eps]
    assert len({picker.pick(request(), zeros)[0].name for _ in range(100)}) == 3


def test_all_endpoints_filtered_out_is_429():
    from epp.api.errors import EppError

    cfg = load_config(HEAD + "plugins:\n- {type: test-empty-filter}\n")
    with pytest.raises(EppError) as e:
        cfg.scheduler.schedule(request(), endpoints(2))
    assert e.value.status == 429


from epp.scheduling.plugins import Filter  # noqa: E402


@register_plugin("test-empty-filter")
class EmptyFilter(Filter):
    def filter(self, request, eps):
        return []


def test_reload_keeps_unchanged_plugins_and_their_state():
    from epp.datalayer.pool import EndpointPool, EndpointSpec

    pool = EndpointPool()
    pool.sync([EndpointSpec("a", "10.0.0.1", 8000)])
    text = HEAD + "plugins:\n- type: queue-scorer\n- type: prefix-cache-scorer\n"
    old = load_config(text, pool)
    prefix = old.plugins["prefix-cache-scorer"]
    new = load_config(text.replace("- type: queue-scorer\n", "- type: queue-scorer\n  name: q2\n"), pool, previous=old)
    assert new.plugins["prefix-cache-scorer"] is prefix  # same spec: kept, index and all
    assert new.plugins["q2"] is not old.plugins["queue-scorer"]
    changed = load_config(text.replace("- type: prefix-cache-scorer\n",
                                       "- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 32}\n"),
                          pool, previous=new)
    assert changed.plugins["prefix-cache-scorer"] is not prefix
    owners = [getattr(f, "__self__", None) for f in pool._listeners]
    assert prefix.producer not in owners  # the dropped plugin let go of the pool
    assert owners.count(changed.plugins["prefix-cache-scorer"].producer) == 1
