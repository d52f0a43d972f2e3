"""Operability through a real Envoy: Prometheus series after real traffic, health on both ports,
explained decisions, OpenTelemetry spans exported over OTLP, live debug values, and the Grafana
dashboard checked against what EPP really exports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from epp.stack.local import HOST, LocalStack
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS

# Teardown stops EPP with SIGTERM: without a drain it exits at once instead of serving 30 s more.
NO_DRAIN = "--drain-timeout=0s"

TOKEN = "operability-test-token-0123"
DASHBOARD = Path(__file__).resolve().parents[2] / "manifests" / "grafana" / "epp-dashboard.json"
SERVING = health_pb2.HealthCheckResponse.SERVING


# -- a tiny OTLP/gRPC collector -------------------------------------------------------------------

class Collector:
    """Receives spans over OTLP/gRPC, as an OpenTelemetry collector would."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        outer = self
        self.spans: list = []
        self.lock = threading.Lock()

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                with outer.lock:
                    for rs in request.resource_spans:
                        for ss in rs.scope_spans:
                            outer.spans.extend(ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port(f"{HOST}:0")
        self.server.start()

    def find(self, predicate, timeout: float = 20.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for s in self.spans if predicate(s)]
            if found:
                return found
            time.sleep(0.1)
        return []

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector | None]:
    try:
        c = Collector()
    except ImportError:
        yield None
        return
    yield c
    c.stop()


@pytest.fixture(scope="module")
def ops(collector) -> Iterator[LocalStack]:
    """Plaintext ext_proc (so the test can speak to its health service), explain token, tracing on."""
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "epp-test"}
    args = ["--explain-token", TOKEN, "-v", "4", "--log-format", "json", NO_DRAIN]
    if collector is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{HOST}:{collector.port}"
        args.append("--tracing")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        stack = LocalStack(pods=3, sim_args=SIM_ARGS, tls=False, epp_args=args).start()
    try:
        yield stack
    finally:
        stack.cleanup()


# -- helpers --------------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset], float]


def scrape(stack: LocalStack) -> tuple[Samples, str]:
    text = httpx.get(f"http://{HOST}:{stack.metrics_port}/metrics", timeout=10).text
    out = {(s.name, frozenset(s.labels.items())): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}
    return out, text


def value(s: Samples, metric: str, /, **labels: str) -> float:
    return s.get((metric, frozenset(labels.items())), 0.0)


def total(s: Samples, metric: str, /, **labels: str) -> float:
    """Sum over every series of ``metric`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in s.items() if n == metric and want <= lbl)


def chat(client: httpx.Client, text: str = "hello", max_tokens: int = 4, stream: bool = False,
         headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def eventually(fn, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    return last


# -- metrics ----------------------------------------------------------------------------------------

def test_metrics_after_real_traffic(ops):
    m = {"model_name": MODEL, "target_model_name": MODEL}
    before, _ = scrape(ops)
    with httpx.Client(base_url=ops.url, timeout=30) as c:
        for i in range(6):
            assert chat(c, f"plain {i}").status_code == 200
        for i in range(2):
            r = chat(c, f"streamed {i}", stream=True)
            assert r.status_code == 200 and "data: [DONE]" in r.text
        for _ in range(3):
            r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
            assert r.status_code == 400
        assert c.post("/v1/completions", json={"prompt": "no model"}).status_code == 400

    def settled():
        s, _ = scrape(ops)
        return s if value(s, "inference_objective_running_requests", model_name=MODEL) == 0 else None

    after = eventually(settled)
    assert after, "running requests never went back to 0"

    def delta(metric: str, /, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert delta("inference_objective_request_total", **m, priority="0") == 8
    assert delta("inference_objective_request_duration_seconds_count", **m) == 8
    assert delta("inference_objective_output_tokens_sum", **m) == 8 * 4
    assert delta("inference_objective_output_tokens_count", **m) == 8
    assert delta("inference_objective_input_tokens_count", **m) == 8
    assert delta("inference_objective_request_error_total", model_name="", target_model_name="",
                 error_code="BadRequest") == 4
    assert delta("epp_rejections_total", reason="invalid-json", status="400") == 3
    assert delta("epp_rejections_total", reason="missing-model", status="400") == 1
    assert total(after, "epp_decisions_total") - total(before, "epp_decisions_total") == 8
    assert delta("inference_extension_scheduler_e2e_duration_seconds_count") == 8
    assert delta("inference_extension_scheduler_attempts_total", status="success") == 8
    scorer = {"extension_point": "Scorer", "plugin_type": "predicted-latency-scorer",
              "plugin_name": "predicted-latency-scorer"}  # EPP's default configuration
    assert delta("inference_extension_plugin_duration_seconds_count", **scorer) == 8
    assert value(after, "inference_pool_ready_pods", name="static") == 3
    assert value(after, "epp_extproc_streams") == 0 and value(after, "epp_draining") == 0
    assert 0 < value(after, "epp_asyncio_tasks") < 100  # the server's own loops, no per-request leftovers
    assert value(after, "epp_python_allocated_blocks") > 10_000
    for ep in ops.endpoints:
        assert value(after, "epp_endpoint_inflight_requests", endpoint=ep) == 0
        assert 0 <= value(after, "epp_endpoint_metrics_age_seconds", endpoint=ep) < 5  # scraped, fresh
        assert value(after, "epp_endpoint_metrics_stale", endpoint=ep) == 0
        assert value(after, "epp_endpoint_scrapes_total", endpoint=ep) > 0


# -- health ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("port_attr", ["health_port", "grpc_port"])
def test_health_services_on_both_ports(ops, port_attr):
    with grpc.insecure_channel(f"{HOST}:{getattr(ops, port_attr)}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("liveness", "readiness", "", "envoy.service.ext_proc.v3.ExternalProcessor"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING, service
        listed = stub.List(health_pb2.HealthListRequest(), timeout=5)
        assert set(listed.statuses) == {"liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"}
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
        assert next(watch).status == SERVING
        watch.cancel()


# -- explained decisions ------------------------------------------------------------------------------

def test_decision_explained_only_with_the_token(ops):
    with httpx.Client(base_url=ops.url, timeout=30) as c:
        r = chat(c, "explain this one", headers={"x-epp-explain": TOKEN})
        assert r.status_code == 200
        decision = json.loads(r.headers["x-epp-decision"])
        assert decision["pick"] == r.headers["x-epp-endpoint"] == r.headers["x-served-by"]
        assert set(decision["scores"]) == set(ops.endpoints) and decision["candidates"] == 3
        assert set(decision["weights"]) == {"predicted-latency-scorer"}
        for entry in decision["scores"].values():
            assert entry["total"] == pytest.approx(sum(decision["weights"][k] * entry[k] for k in decision["weights"]),
                                                   abs=1e-3)
        best_other = max(e["total"] for n, e in decision["scores"].items() if n != decision["pick"])
        assert decision["margin"] == pytest.approx(decision["scores"][decision["pick"]]["total"] - best_other, abs=1e-3)
        assert "x-epp-decision" not in chat(c, "not explained").headers
        assert "x-epp-decision" not in chat(c, "wrong token", headers={"x-epp-explain": "1"}).headers
    recent = httpx.get(f"http://{HOST}:{ops.metrics_port}/debug/decisions?limit=20", timeout=10).json()["decisions"]
    assert any(d.get("explanation", {}).get("pick") == decision["pick"] for d in recent)


# -- tracing ----------------------------------------------------------------------------------------

def test_span_per_request_exported_over_otlp_and_continuing_the_client_trace(ops, collector):
    if collector is None:
        pytest.skip("opentelemetry packages not installed (pip install 'epp[tracing]')")
    trace_id = os.urandom(16).hex()
    parent = os.urandom(8).hex()
    with httpx.Client(base_url=ops.url, timeout=30) as c:
        r = chat(c, "traced", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
        assert r.status_code == 200
    spans = collector.find(lambda s: s.trace_id.hex() == trace_id and s.name == "gateway.request")
    assert spans, "no gateway.request span for the client's trace reached the collector"
    span = spans[0]
    assert span.parent_span_id.hex() == parent
    attrs = {a.key: a.value for a in span.attributes}
    assert attrs["epp.decision.endpoint"].string_value == r.headers["x-epp-endpoint"]
    assert attrs["gen_ai.request.model"].string_value == MODEL
    assert attrs["http.response.status_code"].int_value == 200
    children = collector.find(lambda s: s.trace_id.hex() == trace_id and s.name == "gateway.request_orchestration")
    assert children and children[0].parent_span_id == span.span_id


# -- live debug values ------------------------------------------------------------------------------

def test_debug_endpoints_show_in_flight_requests_live(ops):
    """While long streams run, /debug/endpoints shows them in flight; afterwards, back to zero."""
    base = f"http://{HOST}:{ops.metrics_port}"

    async def run() -> tuple[dict, list[int]]:
        async with httpx.AsyncClient(base_url=ops.url, timeout=60) as client:
            async def one(i: int) -> int:
                body = {"model": MODEL, "max_tokens": 300, "stream": True,
                        "messages": [{"role": "user", "content": f"long {i}"}]}
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for _ in r.aiter_bytes():
                        pass
                    return r.status_code

            tasks = [asyncio.create_task(one(i)) for i in range(4)]
            seen: dict = {}
            async with httpx.AsyncClient(timeout=5) as dbg:
                for _ in range(200):
                    view = (await dbg.get(base + "/debug/endpoints")).json()
                    if sum(e["inflight"] for e in view["endpoints"]) >= 2 and view["streams"] >= 2:
                        seen = view
                        break
                    if all(t.done() for t in tasks):
                        break
                    await asyncio.sleep(0.02)
            return seen, await asyncio.gather(*tasks)

    seen, statuses = asyncio.run(run())
    assert statuses == [200] * 4
    assert seen, "never saw the streams in flight"
    view = eventually(lambda: (v := httpx.get(base + "/debug/endpoints", timeout=5).json())["streams"] == 0 and v)
    assert view and all(e["inflight"] == 0 for e in view["endpoints"])
    assert view["state"] == "serving" and view["decisions"] >= 4


def test_json_logs_have_one_debug_line_per_decision(ops):
    rid = f"log-check-{os.getpid()}-{time.monotonic_ns()}"
    with httpx.Client(base_url=ops.url, timeout=30) as c:
        assert chat(c, "logged", headers={"x-request-id": rid}).status_code == 200

    def lines():
        found = []
        for line in ops.epp.log_path.read_text(errors="replace").splitlines():
            if rid in line and line.startswith("{"):
                found.append(json.loads(line))
        return [d for d in found if d["logger"] == "epp.decisions"] or None

    docs = eventually(lines, timeout=5)
    assert docs and len(docs) == 1
    assert docs[0]["level"] == "debug" and docs[0]["fields"]["id"] == rid
    assert docs[0]["fields"]["endpoint"] in ops.endpoints


# -- the Grafana dashboard --------------------------------------------------------------------------

_FUNCS = {"sum", "rate", "irate", "increase", "histogram_quantile", "avg", "max", "min", "count", "topk", "bottomk",
          "clamp_min", "clamp_max", "sort_desc", "abs", "and", "or", "unless", "offset", "time", "vector", "scalar",
          "label_values"}


def promql_metrics(expr: str) -> set[str]:
    expr = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r"\1", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)
    names = set(re.findall(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return names - _FUNCS


def dashboard_queries(dash: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if var["type"] == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_promql_metric_extraction():
    assert promql_metrics('histogram_quantile(0.99, sum by (le, plugin_name) (rate(a_bucket{x=~"$m|"}[5m])))') == {
        "a_bucket"}
    assert promql_metrics("sum(rate(b_sum[$__rate_interval])) / sum(rate(b_count[1m])) * 1000") == {"b_sum", "b_count"}
    assert promql_metrics("label_values(c_total, model_name)") == {"c_total"}


def test_grafana_dashboard_uses_only_metrics_epp_exports(ops):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = []

    def walk(panels):
        for p in panels:
            ids.append(p["id"])
            assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            for t in p.get("targets", []):
                assert t["refId"] and t["datasource"]["uid"] == "${datasource}"
            walk(p.get("panels", []))

    walk(dash["panels"])
    assert len(ids) == len(set(ids))
    with httpx.Client(base_url=ops.url, timeout=30) as c:  # make every labelled family appear
        assert chat(c, "dashboard traffic " * 40, headers={"x-epp-explain": TOKEN}).status_code == 200
        assert chat(c, "dashboard traffic " * 40).status_code == 200
        assert c.post("/v1/chat/completions", content=b"{").status_code == 400
    _, text = scrape(ops)
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    used = set()
    for expr in dashboard_queries(dash):
        used |= promql_metrics(expr)
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries metrics EPP does not export: {missing}"
    assert len(used) >= 25, sorted(used)
