"""Client-chosen values EPP stores, labels, logs or computes with stay bounded (unit level; the end-to-end
checks through Envoy are in tests/e2e/test_hostile_clients.py)."""

from __future__ import annotations

import json
import logging

import pytest

from epp.api.errors import EppError
from epp.api.fields import MAX_COUNT, MAX_MODEL_NAME_CHARS
from epp.api.parsing import parse_request
from epp.director import MAX_OUTPUT_ESTIMATE, estimate_tokens
from epp.logs import TextFormatter
from epp.observability.decisions import record_path
from epp.observability.metrics import MAX_MODEL_LABELS, MAX_PROVISIONAL_MODEL_LABELS
from epp.scheduling.config import PluginConfigError, load_config, parse_document
from tests.extproc_helpers import make_director
from tests.unit.test_observability import full_request, observed, samples

CHAT = "/v1/chat/completions"


def chat(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_model_names_are_bounded_and_printable():
    assert parse_request(CHAT, chat(model="x" * MAX_MODEL_NAME_CHARS), "application/json").model
    with pytest.raises(EppError) as e:
        parse_request(CHAT, chat(model="x" * (MAX_MODEL_NAME_CHARS + 1)), "application/json")
    assert e.value.status == 400 and e.value.reason == "model-name-too-long" and e.value.param == "model"
    with pytest.raises(EppError) as e:
        parse_request(CHAT, chat(model="llama\nINFO forged line"), "application/json")
    assert e.value.status == 400 and e.value.param == "model"
    # a path EPP does not parse is never refused: its body's model is just not taken
    other = parse_request("/v1/rerank", json.dumps({"model": "x" * 5000}).encode(), "application/json")
    assert other.model == ""


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_absurd_counts_are_refused_and_large_ones_clamped_in_estimates(field):
    with pytest.raises(EppError) as e:
        parse_request(CHAT, chat(**{field: int("9" * 4000)}), "application/json")
    assert e.value.status == 400 and e.value.param == field
    parsed = parse_request(CHAT, chat(**{field: MAX_COUNT}), "application/json")
    from epp.api.types import InferenceRequest

    req = InferenceRequest("r", CHAT, "POST", {}, parsed, b"")
    assert estimate_tokens(req) <= len(parsed.prompt_text or "") + MAX_OUTPUT_ESTIMATE


def test_yaml_aliases_non_finite_numbers_and_huge_configs_are_refused():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
           "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    with pytest.raises(PluginConfigError, match="aliases"):
        parse_document(bomb)
    inf = """apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: .inf
"""
    with pytest.raises(PluginConfigError, match="finite"):
        load_config(inf)
    with pytest.raises(PluginConfigError, match="finite"):
        load_config(inf.replace(".inf", "1") + "featureGates: []\nparser: {x: .nan}\n")
    with pytest.raises(PluginConfigError, match="limit"):
        parse_document("# " + "x" * (2 << 20))


def test_log_lines_escape_control_characters():
    record = logging.LogRecord("epp", logging.INFO, __file__, 1, "request model=%s", ("a\nFAKE ERROR x\x1b[2J",),
                               None)
    line = TextFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line and "a\\x0aFAKE" in line


def test_recorded_paths_drop_query_strings_and_are_bounded():
    assert record_path("/v1/chat/completions?api_key=sk-secret") == "/v1/chat/completions"
    assert len(record_path("/" + "p" * 10_000)) == 256


async def test_model_names_no_server_serves_do_not_stay_labels():
    director, metrics = observed(make_director([("p1", 0, 0.1)]))
    for i in range(3 * MAX_PROVISIONAL_MODEL_LABELS):
        await full_request(director, body={"model": f"bogus-{i}", "prompt": "x"}, status=404)
    await full_request(director, body={"model": "real", "prompt": "x"})
    names = {dict(lbl).get("model_name") for _, lbl in samples(metrics)} - {None}
    assert names == {"real"}  # the 404s left nothing behind
    labels = frozenset({"model_name": "real", "target_model_name": "real", "priority": "0"}.items())
    assert samples(metrics)[("inference_objective_request_total", labels)] == 1
    # once served with success a name stays; made-up names never crowd real ones out of the label budget
    assert len(metrics._models) <= MAX_MODEL_LABELS and "real" in metrics._models


@pytest.mark.parametrize("section", ["flowControl", "saturationDetector", "parser", "requestHandler"])
def test_sections_epp_does_not_implement_are_refused_not_ignored(section):
    """Sections EPP does not implement, and ones it does with fields it does not know, are refused by name."""
    text = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n" \
           f"{section}:\n  queueDepthThreshold: 5\n"
    with pytest.raises(PluginConfigError, match=section):
        load_config(text)
