"""The public plugin module (epp.plugin), typed data keys and the harness (epp.testing)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import epp.plugin as api
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

    def score(self, cycle, request, endpoints):
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


def test_parameter_helpers_name_the_parameter():
    with pytest.raises(ValueError, match="maxThings must be >= 1"):
        api.check_int(0, "maxThings", 1)
    assert api.check_duration("200ms", "timeout") == pytest.approx(0.2)


SWITCHED = ["plugins/pickers.py", "plugins/profile_handlers.py", "plugins/filters/labels.py",
            "plugins/filters/utilization.py", "plugins/scorers/load.py", "plugins/scorers/session.py"]
INTERNAL = ("epp.api", "epp.datalayer.endpoint", "epp.scheduling", "plugins.scorers.common")


@pytest.mark.parametrize("path", SWITCHED)
def test_builtins_import_the_plugin_api_only_from_epp_plugin(path):
    tree = ast.parse((ROOT / path).read_text())
    found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
             and n.module.startswith(INTERNAL)]
    assert found == []
