"""Observability on the request path, without processes: metrics, plugin timings, explanations,
the decision log, tracing (in-memory exporter) and log lines."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp import testing
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.logs import JsonFormatter, TextFormatter, level_for
from epp.observability.decisions import DecisionLog
from epp.observability.explain import ExplainPolicy, explain, header_value
from epp.observability.hooks import RequestHooks, Throttle
from epp.observability.instrument import (
    TimedFilter,
    TimedPicker,
    TimedProfileHandler,
    TimedScorer,
    instrument,
    timed,
)
from epp.observability.metrics import EppMetrics, FastHistogram, prefix_index_size
from epp.scheduling.config import load_config
from epp.scheduling.plugins import Filter, Picker, ProfileHandler, Scorer
from tests.extproc_helpers import (
    body_msg,
    drive,
    headers_msg,
    make_director,
    new_stream,
    response_body_msg,
    response_headers_msg,
    set_headers,
)

REQ = {"max_tokens": 10, "model": "my-model", "prompt": "a prompt long enough to fill one prefix block " * 4}
THREE_PODS = [("p1", 3, 0.2), ("p2", 0, 0.1), ("p3", 10, 0.2)]
TOKEN = "s3cret-token-0123456789"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def samples(metrics: EppMetrics) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def observed(metrics_or_director, policy: ExplainPolicy | None = None, tracing=None):
    director = metrics_or_director
    metrics = EppMetrics(director.pool)
    director.metrics = metrics
    metrics.runtime.config = lambda: director.config
    director.hooks = RequestHooks(director.pool, metrics, policy or ExplainPolicy(), tracing)
    instrument(director.config, metrics)
    return director, metrics


async def full_request(director, headers=None, body=None, status=200):
    stream = new_stream(director, decision_header=True)
    out = await drive(stream, [headers_msg(headers=headers), body_msg(json.dumps(body or REQ).encode())])
    resp = await drive(stream, [response_headers_msg(status), response_body_msg(
        b'{"usage":{"prompt_tokens":12,"completion_tokens":10}}', eos=True)])
    return out, resp, stream


# -- metrics -------------------------------------------------------------------------------------

def test_fast_histogram_buckets_are_cumulative_and_inclusive():
    h = FastHistogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.sum == pytest.approx(8.65)


async def test_plugin_timings_and_prefix_hit_ratio_per_request():
    director, metrics = observed(make_director(THREE_PODS))
    for _ in range(3):
        await full_request(director)
    s = samples(metrics)
    key = "inference_extension_plugin_duration_seconds_count"
    for point, name in [("Scorer", "queue-scorer"), ("Scorer", "kv-cache-utilization-scorer"),
                        ("Scorer", "prefix-cache-scorer"), ("Picker", "max-score-picker")]:
        labels = frozenset({"extension_point": point, "plugin_type": name, "plugin_name": name}.items())
        assert s[(key, labels)] == 3, (point, name)
    assert s[("inference_extension_prefix_indexer_hit_ratio_count", frozenset())] == 3
    # Same prompt three times: the 2nd and 3rd match every block on the endpoint that got the 1st.
    assert s[("inference_extension_prefix_indexer_hit_ratio_sum", frozenset())] == pytest.approx(2.0)
    assert s[("inference_extension_prefix_indexer_size", frozenset())] > 0
    assert prefix_index_size(director.config) == s[("inference_extension_prefix_indexer_size", frozenset())]


def test_instrument_is_idempotent_and_keeps_names():
    director = make_director(THREE_PODS)
    metrics = EppMetrics(director.pool)
    instrument(director.config, metrics)
    instrument(director.config, metrics)
    scorers = director.config.scheduler.profiles["default"].scorers
    assert all(isinstance(s, TimedScorer) and not isinstance(s.inner, TimedScorer) for s, _ in scorers)
    assert [s.name for s, _ in scorers] == ["queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"]


UTILIZATION_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: utilization-filter
- type: queue-scorer
- type: max-score-picker
"""


def test_one_timing_mechanism_for_every_role():
    """Filters, scorers, pickers and the profile handler are timed alike, each under GIE's extension point, and
    each proxy stands in for its role under the real plugin's name."""
    config = load_config(UTILIZATION_CONFIG)
    metrics = EppMetrics(EndpointPool())
    instrument(config, metrics)
    profile = config.scheduler.profiles["default"]
    proxies = [*profile.filters, *(s for s, _ in profile.scorers), profile.picker, config.scheduler.handler]
    assert [type(p) for p in proxies] == [TimedFilter, TimedScorer, TimedPicker, TimedProfileHandler]
    for proxy, role in zip(proxies, (Filter, Scorer, Picker, ProfileHandler), strict=True):
        assert isinstance(proxy, role) and proxy.name == proxy.inner.name and proxy.type_name == proxy.inner.type_name
    config.scheduler.schedule(testing.request(), [testing.endpoint("e1"), testing.endpoint("e2", waiting=3)])
    counts = {labels: v for (name, labels), v in samples(metrics).items()
              if name == "inference_extension_plugin_duration_seconds_count"}
    point = {dict(k)["extension_point"]: v for k, v in counts.items()}
    # one pass through the profile; the handler is asked for profiles twice (the second: none left), then results
    assert point == {"Filter": 1, "Scorer": 1, "Picker": 1, "ProfileHandler": 3}


def test_timed_observes_raising_calls_too():
    hist = FastHistogram((1.0,))

    def fails() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        timed(fails, hist)()
    assert timed(lambda x: x + 1, hist)(1) == 2 and hist.count == 2


async def test_request_and_error_series_and_pool_gauges():
    director, metrics = observed(make_director(THREE_PODS))
    await full_request(director)
    await drive(new_stream(director), [headers_msg(), body_msg(b"{not json")])
    s = samples(metrics)
    m = {"model_name": "my-model", "target_model_name": "my-model"}
    assert s[("inference_objective_request_total", frozenset({**m, "priority": "0"}.items()))] == 1
    assert s[("inference_objective_request_error_total", frozenset(
        {"model_name": "", "target_model_name": "", "error_code": "BadRequest"}.items()))] == 1
    assert s[("epp_rejections_total", frozenset({"reason": "invalid-json", "status": "400"}.items()))] == 1
    assert s[("inference_objective_output_tokens_sum", frozenset(m.items()))] == 10
    assert s[("inference_objective_running_requests", frozenset({"model_name": "my-model"}.items()))] == 0
    assert s[("inference_pool_ready_pods", frozenset({"name": "static"}.items()))] == 3
    director.pool.get("p1").metrics.updated_at = 0.0  # never scraped
    s = samples(metrics)
    assert s[("epp_endpoint_metrics_stale", frozenset({"endpoint": "p1"}.items()))] == 1
    assert s[("epp_endpoint_metrics_age_seconds", frozenset({"endpoint": "p1"}.items()))] == -1
    assert s[("epp_endpoint_metrics_stale", frozenset({"endpoint": "p2"}.items()))] == 0
    assert s[("epp_config_reloads_total", frozenset({"result": "failure"}.items()))] == 0
    assert s[("epp_extproc_streams", frozenset())] == 0 and s[("epp_draining", frozenset())] == 0


async def test_endpoint_series_leave_with_the_endpoint():
    director, metrics = observed(make_director(THREE_PODS))
    await full_request(director)
    picked = next(lbl for (name, lbl), v in samples(metrics).items() if name == "epp_decisions_total" and v == 1)
    gone = dict(picked)["endpoint"]
    keep = [EndpointSpec(e.name, e.address, e.port) for e in director.pool.endpoints if e.name != gone]
    director.pool.sync(keep)
    s = samples(metrics)
    assert not any(dict(lbl).get("endpoint") == gone for _, lbl in s)
    assert gone not in director.hooks.decisions.picks


def test_scrape_stats_and_staleness_from_runtime():
    director = make_director(THREE_PODS)
    metrics = EppMetrics(director.pool)
    p1 = director.pool.get("p1")
    p1.metrics.updated_at = __import__("time").monotonic()
    p1.metrics.last_error = "connect: refused"

    class Stats:
        scrapes, errors, restarts = 7, 2, 1

    metrics.runtime.scrape_stats = lambda: {p1: Stats()}
    s = samples(metrics)
    ep = frozenset({"endpoint": "p1"}.items())
    assert s[("epp_endpoint_metrics_stale", ep)] == 0
    assert s[("epp_endpoint_scrape_error", ep)] == 1
    assert s[("epp_endpoint_scrapes_total", ep)] == 7 and s[("epp_endpoint_scrape_errors_total", ep)] == 2
    assert s[("epp_endpoint_restarts_total", ep)] == 1


# -- explanations ---------------------------------------------------------------------------------

def test_policy_token_is_required_and_compared_exactly(monkeypatch):
    monkeypatch.delenv("EPP_EXPLAIN_TOKEN", raising=False)
    assert not ExplainPolicy().allows({"x-epp-explain": "1"})
    p = ExplainPolicy(token=TOKEN)
    assert p.allows({"x-epp-explain": TOKEN})
    assert not p.allows({"x-epp-explain": "1"}) and not p.allows({}) and not p.allows({"x-epp-explain": TOKEN + "x"})
    assert ExplainPolicy(always=True).allows({})
    monkeypatch.setenv("EPP_EXPLAIN_TOKEN", TOKEN)
    assert ExplainPolicy().allows({"x-epp-explain": TOKEN})


async def test_explained_request_gets_scores_in_metadata_and_header_and_token_is_not_forwarded():
    director, metrics = observed(make_director(THREE_PODS), ExplainPolicy(token=TOKEN))
    out, resp, _ = await full_request(director, headers={"x-epp-explain": TOKEN})
    first = out[0]
    assert "x-epp-explain" in first.request_headers.response.header_mutation.remove_headers
    lb = first.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    scores = {k: v.number_value for k, v in lb["x-gateway-destination-endpoint-scores"].struct_value.fields.items()}
    decision = json.loads(set_headers(resp[0])["x-epp-decision"])
    assert decision["pick"] == "p2"  # the shortest queue and the lowest KV use
    assert decision["weights"] == {"queue-scorer": 2.0, "kv-cache-utilization-scorer": 2.0, "prefix-cache-scorer": 3.0}
    hostport = {"p1": "192.168.1.1:8000", "p2": "192.168.1.2:8000", "p3": "192.168.1.3:8000"}
    for name, entry in decision["scores"].items():
        assert set(entry) == {"total", *decision["weights"]}
        assert entry["total"] == pytest.approx(sum(w * entry[s] for s, w in decision["weights"].items()), abs=1e-3)
        assert scores[hostport[name]] == pytest.approx(entry["total"])
    totals = [e["total"] for e in decision["scores"].values()]
    assert totals == sorted(totals, reverse=True) and next(iter(decision["scores"])) == "p2"  # best first
    assert decision["margin"] == pytest.approx(totals[0] - totals[1], abs=1e-3) and decision["margin"] > 0
    assert lb["x-epp-decision"].struct_value.fields["pick"].string_value == "p2"
    assert samples(metrics)[("epp_decision_margin_count", frozenset())] == 1
    rec = director.hooks.decisions.recent(1)[0]
    assert rec["explanation"]["pick"] == "p2" and rec["status"] == 200 and rec["tokens_out"] == 10


async def test_unexplained_requests_carry_nothing_extra():
    director, _ = observed(make_director(THREE_PODS), ExplainPolicy(token=TOKEN))
    out, resp, _ = await full_request(director, headers={"x-epp-explain": "guess"})
    lb = out[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert set(lb) == {"x-gateway-destination-endpoint"}
    assert "x-epp-decision" not in set_headers(resp[0])
    assert "x-epp-explain" in out[0].request_headers.response.header_mutation.remove_headers  # still stripped


def test_explanation_is_bounded():
    from epp.scheduling.plugins import ProfileResult, SchedulingResult

    totals = {f"e{i}": i / 100 for i in range(100)}
    result = SchedulingResult({"default": ProfileResult([], {"s": dict(totals), "total": totals})}, "default")
    exp = explain(result, {"s": 1.0}, "e3")
    assert len(exp["scores"]) == 16 and "e3" in exp["scores"] and "e99" in exp["scores"]
    assert exp["margin"] == pytest.approx(0.03 - 0.99)
    assert len(json.loads(header_value(exp))["scores"]) == 8
    assert "e3" in json.loads(header_value(exp))["scores"]


def test_decision_log_is_a_bounded_ring():
    log = DecisionLog(size=5)
    for i in range(12):
        log.add({"id": i, "endpoint": "a"})
    assert log.total == 12 and len(log.records) == 5 and log.picks == {"a": 12}
    assert [r["id"] for r in log.recent(3)] == [11, 10, 9]


def test_throttle_holds_back_repeats():
    t = Throttle(every=60)
    assert t("k") == 0
    assert t("k") is None and t("k") is None
    assert t("other") == 0


# -- tracing --------------------------------------------------------------------------------------

@pytest.fixture
def spans():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from epp.observability.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


async def test_span_per_request_continues_incoming_trace_and_propagates_upstream(spans):
    tracing, exporter = spans
    director, _ = observed(make_director(THREE_PODS), tracing=tracing)
    out, _, _ = await full_request(director, headers={"traceparent": TRACEPARENT})
    sent = set_headers(out[0])["traceparent"]
    _, trace_id, span_id, flags = sent.split("-")
    assert trace_id == "0af7651916cd43dd8448eb211c80319c" and span_id != "b7ad6b7169203331" and flags == "01"
    finished = {s.name: s for s in exporter.get_finished_spans()}
    req = finished["gateway.request"]
    assert req.context.trace_id == int(trace_id, 16) and req.context.span_id == int(span_id, 16)
    assert req.parent.span_id == 0xB7AD6B7169203331
    a = req.attributes
    assert a["epp.decision.endpoint"] == "192.168.1.2:8000" and a["gen_ai.request.model"] == "my-model"
    assert a["http.response.status_code"] == 200 and a["gen_ai.usage.output_tokens"] == 10
    assert a["epp.decision.candidates"] == 3
    orch = finished["gateway.request_orchestration"]
    assert orch.parent.span_id == req.context.span_id
    assert req.start_time <= orch.start_time <= orch.end_time <= req.end_time


async def test_new_trace_without_incoming_context_and_rejections_are_error_spans(spans):
    from opentelemetry.trace import StatusCode

    tracing, exporter = spans
    director, _ = observed(make_director(THREE_PODS), tracing=tracing)
    out, _, _ = await full_request(director)
    assert len(set_headers(out[0])["traceparent"].split("-")[1]) == 32
    await drive(new_stream(director), [headers_msg(), body_msg(b"{not json")])
    rejected = [s for s in exporter.get_finished_spans() if s.attributes.get("error.type") == "invalid-json"]
    assert len(rejected) == 1 and rejected[0].status.status_code is StatusCode.ERROR
    assert rejected[0].attributes["http.response.status_code"] == 400


async def test_upstream_5xx_marks_the_span_as_error(spans):
    from opentelemetry.trace import StatusCode

    tracing, exporter = spans
    director, _ = observed(make_director(THREE_PODS), tracing=tracing)
    await full_request(director, status=503)
    span = next(s for s in exporter.get_finished_spans() if s.name == "gateway.request")
    assert span.status.status_code is StatusCode.ERROR and span.attributes["http.response.status_code"] == 503


def test_tracing_switch(monkeypatch):
    from epp.observability.tracing import tracing_wanted

    assert not tracing_wanted(None, {})
    assert tracing_wanted(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert not tracing_wanted(False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert not tracing_wanted(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_SDK_DISABLED": "true"})
    assert tracing_wanted(True, {})


def test_epp_without_tracing_does_not_import_opentelemetry():
    code = ("import sys, asyncio; import epp.server, epp.cli, epp.observability.wiring; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# -- logs -----------------------------------------------------------------------------------------

def test_verbosity_levels_like_gie():
    assert level_for(2) == logging.INFO and level_for(3) == 15 and level_for(4) == logging.DEBUG
    assert level_for(5) == 5 and level_for(0) == logging.INFO


async def test_one_debug_line_per_decision_with_fields(caplog):
    director, _ = observed(make_director(THREE_PODS))
    with caplog.at_level(logging.DEBUG, logger="epp.decisions"):
        await full_request(director, headers={"x-request-id": "req-42"})
    lines = [r for r in caplog.records if r.name == "epp.decisions" and r.levelno == logging.DEBUG]
    assert len(lines) == 1
    doc = json.loads(JsonFormatter().format(lines[0]))
    assert doc["level"] == "debug" and doc["fields"]["id"] == "req-42" and doc["fields"]["endpoint"] == "p2"
    text = TextFormatter().format(lines[0])
    assert 'id="req-42"' in text and 'endpoint="p2"' in text


async def test_no_endpoint_errors_are_logged_at_warning_once_per_interval(caplog):
    director, _ = observed(make_director([]))
    with caplog.at_level(logging.INFO, logger="epp.decisions"):
        for _ in range(5):
            await drive(new_stream(director), [headers_msg(), body_msg(json.dumps(REQ).encode())])
    warnings = [r for r in caplog.records if r.name == "epp.decisions" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "503 rejected-no-endpoints" in warnings[0].getMessage()
    assert director.hooks.decisions.rejected == 5
