"""The public plugin module (epp.plugin), typed data keys and the harness (epp.testing)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

import epp.plugin as api
import epp.scheduling.registry as registry
from epp.api.types import ApiKind
from epp.testing import API_PATHS, Harness, endpoint, request

HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
ROOT = Path(__file__).resolve().parents[2]


def test_every_public_name_resolves():
    for name in api.__all__:
        assert getattr(api, name) is not None, name


@pytest.mark.parametrize("kind", list(API_PATHS))
def test_requests_of_every_api_parse_as_epp_parses_them(kind):
    r = request(kind, "hello world", model="llama")
    assert r.api is ApiKind(kind)
    assert r.model == "llama"


def test_queue_scorer_prefers_the_idle_endpoint():
    h = Harness(HEAD + "plugins:\n- type: queue-scorer\n", [endpoint("busy", waiting=9), endpoint("idle")])
    assert h.pick(request()).name == "idle"
    assert h.scores(request())["queue-scorer"] == {"busy": 0.0, "idle": 1.0}


def test_serve_runs_the_lifecycle_so_the_prefix_index_learns():
    h = Harness(HEAD + "plugins:\n- type: prefix-cache-scorer\n", [endpoint("a"), endpoint("b"), endpoint("c")])
    prompt = "a long shared system prompt " * 40
    first = h.serve(request("completions", prompt))
    again = request("completions", prompt + " and more")
    assert h.pick(again) is first
    match = api.PREFIX_MATCH.get(again)
    assert match is not None and match.tokens(first) > 0 and match.ratio(first) > 0.5
    assert {e.name for e in h.endpoints if match.tokens(e) == 0} == {"a", "b", "c"} - {first.name}


@api.register_plugin("test-prefix-reader")
class PrefixReader(api.Scorer):
    consumes = (api.PREFIX_MATCH,)

    def score(self, request, endpoints):
        match = api.PREFIX_MATCH.get(request)
        return [match.ratio(e) if match else 0.0 for e in endpoints]


def test_a_consumer_without_a_producer_is_refused():
    with pytest.raises(api.PluginConfigError, match="consumes 'prefix-match'"):
        Harness(HEAD + "plugins:\n- type: test-prefix-reader\n", [endpoint("a")])


def test_a_consumer_listed_before_its_producer_is_refused():
    body = ("plugins:\n- type: test-prefix-reader\n- type: prefix-cache-scorer\nschedulingProfiles:\n"
            "- name: default\n  plugins:\n  - pluginRef: test-prefix-reader\n  - pluginRef: prefix-cache-scorer\n")
    with pytest.raises(api.PluginConfigError, match="list it after"):
        Harness(HEAD + body, [endpoint("a")])
    ok = body.replace("test-prefix-reader\n  - pluginRef: prefix-cache-scorer",
                      "prefix-cache-scorer\n  - pluginRef: test-prefix-reader")
    assert Harness(HEAD + ok, [endpoint("a")]).pick(request()).name == "a"


# Plugins written against the previous signatures, which took the scheduling cycle first: adapted for one release.
@api.register_plugin("test-legacy-filter")
class LegacyFilter(api.Filter):
    def __init__(self) -> None:
        self.cycles: list[object] = []

    def filter(self, cycle, request, endpoints):
        self.cycles.append(cycle)
        cycle.data["filtered"] = True
        return [e for e in endpoints if e.name != "drop"]


@api.register_plugin("test-legacy-scorer")
class LegacyScorer(api.Scorer):
    def score(self, cycle, request, endpoints):
        assert cycle.data["filtered"]  # the filter's cycle: shared within the request, as before
        return [1.0 if e.name == "b" else 0.0 for e in endpoints]


@api.register_plugin("test-legacy-picker")
class LegacyPicker(api.Picker):
    def pick(self, cycle, request, scored):
        return [s.endpoint for s in sorted(scored, key=lambda s: -s.score)]


@api.register_plugin("test-legacy-handler")
class LegacyHandler(api.ProfileHandler):
    def pick_profiles(self, cycle, request, profiles, results):
        cycle.data["profiles"] = cycle.data.get("profiles", 0) + 1
        return {} if results else dict(profiles)

    def process_results(self, cycle, request, results):
        assert cycle.data["profiles"] == 2
        (name,) = results
        return api.SchedulingResult(results, name)


@api.register_plugin("test-optional-arg-scorer")
class OptionalArgScorer(api.Scorer):
    def score(self, request, endpoints, scale=1.0):  # current signature, one optional parameter more
        return [scale] * len(endpoints)


LEGACY = HEAD + """\
plugins:
- type: test-legacy-filter
- type: test-legacy-scorer
- type: test-legacy-picker
- type: test-legacy-handler
- type: queue-scorer
- type: test-optional-arg-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: test-legacy-filter
  - {pluginRef: test-legacy-scorer, weight: 2}
  - pluginRef: queue-scorer
  - pluginRef: test-optional-arg-scorer
  - pluginRef: test-legacy-picker
"""


def legacy_pool():
    return [endpoint("drop"), endpoint("a", waiting=5), endpoint("b", waiting=9)]


def test_plugins_of_the_old_and_the_new_signatures_schedule_together():
    h = Harness(LEGACY, legacy_pool())
    assert h.pick(request()).name == "b"  # legacy scorer x 2 beats queue-scorer; "drop" filtered out
    scores = h.scores(request())
    assert scores["test-legacy-scorer"] == {"a": 0.0, "b": 1.0}
    assert scores["queue-scorer"] == {"a": 1.0, "b": 0.0}
    assert scores["test-optional-arg-scorer"] == {"a": 1.0, "b": 1.0}
    assert [e.name for e in h.schedule(request()).endpoints] == ["b", "a"]
    cycles = h.plugin("test-legacy-filter").cycles
    assert len(cycles) == 3 and len({id(c) for c in cycles}) == 3  # one cycle state per request


def test_only_old_signature_methods_are_adapted_on_the_instance_and_the_class_is_untouched():
    h = Harness(LEGACY, legacy_pool())
    for name, method in [("test-legacy-filter", "filter"), ("test-legacy-scorer", "score"),
                         ("test-legacy-picker", "pick"), ("test-legacy-handler", "pick_profiles"),
                         ("test-legacy-handler", "process_results")]:
        assert method in vars(h.plugin(name)), name
    for name in ("queue-scorer", "test-optional-arg-scorer"):
        assert "score" not in vars(h.plugin(name))  # called directly: no wrapper on the request path
    # an author's own test calling the class directly still gets the old method
    state = api_cycle_state()
    state.data["filtered"] = True
    assert LegacyScorer().score(state, request(), h.endpoints) == [0.0, 0.0, 1.0]


def api_cycle_state():
    from epp.scheduling.plugins import CycleState

    return CycleState()


def test_old_signatures_are_inspected_at_load_not_per_request(monkeypatch):
    h = Harness(LEGACY, legacy_pool())

    def boom(*args, **kwargs):
        raise AssertionError("inspect.signature on the request path")

    monkeypatch.setattr(registry.inspect, "signature", boom)
    assert h.pick(request()).name == "b"


def test_an_old_signature_plugin_is_named_in_one_deprecation_warning(monkeypatch, caplog):
    monkeypatch.setattr(registry, "_legacy", {})
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        Harness(LEGACY, legacy_pool())
        Harness(LEGACY, legacy_pool())  # a reload, another instance: no second warning
    warned = [r.getMessage() for r in caplog.records if "deprecated signature" in r.getMessage()]
    assert len(warned) == 4  # filter, scorer, picker, handler: one each
    assert any("'test-legacy-scorer'" in m and " score()" in m and "LegacyScorer" in m for m in warned)
    assert any("pick_profiles(), process_results()" in m for m in warned)
    assert not any("queue-scorer" in m or "optional-arg" in m for m in warned)


def test_cycle_state_stays_importable_for_one_release_deprecated():
    from epp.scheduling.plugins import CycleState as Internal

    with pytest.deprecated_call():
        from epp.plugin import CycleState
    assert CycleState is Internal
    assert "CycleState" not in api.__all__
    with pytest.raises(AttributeError):
        api.NoSuchName  # noqa: B018


def test_parameter_helpers_name_the_parameter():
    with pytest.raises(ValueError, match="maxThings must be >= 1"):
        api.check_int(0, "maxThings", 1)
    assert api.check_duration("200ms", "timeout") == pytest.approx(0.2)


SWITCHED = ["plugins/pickers.py", "plugins/profile_handlers.py", "plugins/filters/labels.py",
            "plugins/filters/utilization.py", "plugins/scorers/load.py", "plugins/scorers/session.py"]
INTERNAL = ("epp.api", "epp.datalayer.endpoint", "epp.scheduling", "epp_plugins.scorers.common")


@pytest.mark.parametrize("path", SWITCHED)
def test_builtins_import_the_plugin_api_only_from_epp_plugin(path):
    tree = ast.parse((ROOT / path).read_text())
    found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
             and n.module.startswith(INTERNAL)]
    assert found == []
