"""Admission: saturation detectors, legacy shedding, flow control (bands, flows, ordering, limits, TTLs, scale from
zero), its configuration and metrics."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest

from epp.admission.config import parse_quantity
from epp.api.errors import EppError
from epp.api.types import ApiKind, InferenceRequest, ParsedBody
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.director import Director
from epp.extproc.stream import BodyBudget
from epp.observability.metrics import EppMetrics
from epp.scheduling.config import load_config
from epp.scheduling.plugins import ResponseInfo
from epp.scheduling.registry import PluginConfigError
from tests.extproc_helpers import body_msg, drive, headers_msg, immediate, make_director, new_stream

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
BODY = json.dumps({"model": "m", "prompt": "hello"}).encode()
_ids = itertools.count()


def fc_config(max_concurrency: int = 2, flow_control: str = "", plugins: str = "") -> str:
    return (HEAD + "featureGates: [flowControl]\nplugins:\n- type: concurrency-detector\n"
            f"  parameters: {{maxConcurrency: {max_concurrency}}}\n- type: queue-scorer\n{plugins}"
            "saturationDetector: {pluginRef: concurrency-detector}\n"
            + (f"flowControl:\n{flow_control}" if flow_control else ""))


def director_for(config: str, endpoints: int = 1, metrics: bool = False) -> Director:
    pool = EndpointPool()
    pool.sync([EndpointSpec(f"e{i}", f"10.0.0.{i + 1}", 8000) for i in range(endpoints)])
    for ep in pool.endpoints:
        ep.metrics.updated_at = time.monotonic()
    return Director(pool, load_config(config, pool), metrics=EppMetrics(pool) if metrics else None)


def req(priority: int = 0, fairness: str = "default-flow", headers: dict[str, str] | None = None,
        method: str = "POST", body: bytes = BODY) -> InferenceRequest:
    return InferenceRequest(request_id=f"r{next(_ids)}", path="/v1/completions", method=method,
                            headers=headers or {}, body=ParsedBody(ApiKind.COMPLETIONS, model="m", prompt_text="hello"),
                            raw_body=body, target_model="m", priority=priority, fairness_id=fairness,
                            received_at=time.monotonic())


class Flow:
    """Drives requests through a director; records the order in which held ones are routed."""

    def __init__(self, director: Director) -> None:
        self.director = director
        self.order: list[str] = []
        self.decisions: dict[str, tuple[InferenceRequest, object]] = {}

    async def _route(self, request: InferenceRequest, tag: str):
        decision = await self.director.route(request, None)
        self.order.append(tag)
        self.decisions[tag] = (request, decision)
        return decision

    def start(self, request: InferenceRequest, tag: str) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self._route(request, tag))

    def finish(self, tag: str) -> None:
        request, decision = self.decisions.pop(tag)
        self.director.complete(request, decision, ResponseInfo(status=200, completed=True))


async def settle(seconds: float = 0.03) -> None:
    await asyncio.sleep(seconds)


# -- flow control ------------------------------------------------------------------------------

async def test_held_while_saturated_then_dispatched_as_capacity_frees():
    d = director_for(fc_config(2))
    f = Flow(d)
    for tag in "abc":
        f.start(req(), tag)
    await settle()
    assert f.order == ["a", "b"] and d.admission.queued == 1  # c waits in EPP, not on the pod
    assert d.pool.endpoints[0].inflight_requests == 2
    f.finish("a")
    await settle()
    assert f.order == ["a", "b", "c"] and d.admission.queued == 0
    assert d.pool.endpoints[0].inflight_requests == 2


async def test_strict_priority_across_bands_and_sheddable_last():
    d = director_for(fc_config(1))
    f = Flow(d)
    f.start(req(0), "first")
    await settle()
    for tag, priority in (("shed", -1), ("normal", 0), ("high", 10)):
        f.start(req(priority), tag)
        await settle(0.005)
    for tag in ("first", "high", "normal"):
        await settle()
        f.finish(tag)
    await settle()
    assert f.order == ["first", "high", "normal", "shed"]


async def test_band_limit_refuses_sheddable_with_429():
    d = director_for(fc_config(1, "  defaultNegativePriorityBand: {maxRequests: 2}\n"), metrics=True)
    f = Flow(d)
    f.start(req(0), "busy")
    await settle()
    held = [f.start(req(-1), f"s{i}") for i in range(2)]
    await settle()
    with pytest.raises(EppError) as e:
        await d.route(req(-1), None)
    assert (e.value.status, e.value.reason) == (429, "rejected-saturated")
    assert not any(t.done() for t in held)
    r = d.metrics.registry
    assert r.get_sample_value("epp_flow_control_requests_total", {"fairness_id": "default-flow", "priority": "-1",
                                                                  "outcome": "RejectedCapacity"}) == 1
    assert r.get_sample_value("inference_extension_flow_control_queue_size", {
        "fairness_id": "default-flow", "priority": "-1", "inference_pool": "static"}) == 2
    for t in held:
        t.cancel()


async def test_global_limit_displaces_the_newest_lowest_priority_request():
    d = director_for(fc_config(1, "  maxRequests: 2\n"))
    f = Flow(d)
    f.start(req(0), "busy")
    await settle()
    old, new = f.start(req(-1), "old"), f.start(req(-1), "new")
    await settle()
    important = f.start(req(5), "important")
    await settle()
    assert new.done() and isinstance(new.exception(), EppError) and new.exception().status == 429
    assert not old.done() and not important.done()
    f.finish("busy")
    await settle()
    assert f.order == ["busy", "important"]
    normal = f.start(req(0), "normal")  # the queue: old (-1), normal (0): full again
    await settle()
    with pytest.raises(EppError, match="saturated"):  # nothing of a lower priority to displace
        await asyncio.wait_for(d.route(req(-5), None), 1)
    old.cancel()
    normal.cancel()


async def test_ttl_expiry_is_503_and_frees_the_body_budget():
    d = director_for(fc_config(1, "  defaultRequestTTL: 150ms\n"))
    d.admission.budget = budget = BodyBudget(1 << 20)
    f = Flow(d)
    f.start(req(), "busy")
    await settle()
    t0 = time.monotonic()
    task = f.start(req(), "late")
    await settle()
    assert budget.used == len(BODY)  # a held body counts against the process's body budget
    with pytest.raises(EppError) as e:
        await task
    assert (e.value.status, e.value.reason) == (503, "rejected-ttl-expired")
    assert 0.14 < time.monotonic() - t0 < 0.5
    assert budget.used == 0 and d.admission.queued == 0


async def test_client_asks_for_a_shorter_ttl():
    d = director_for(fc_config(1, "  defaultRequestTTL: 60s\n"))
    f = Flow(d)
    f.start(req(), "busy")
    await settle()
    with pytest.raises(EppError, match="timed out"):
        await asyncio.wait_for(d.route(req(headers={"x-llm-d-inference-ttl": "100ms"}), None), 2)


async def test_body_budget_full_refuses():
    d = director_for(fc_config(1))
    d.admission.budget = BodyBudget(len(BODY) + 10)
    f = Flow(d)
    f.start(req(), "busy")
    await settle()
    waiting = f.start(req(), "w")
    await settle()
    with pytest.raises(EppError) as e:
        await d.route(req(), None)
    assert e.value.status == 429
    waiting.cancel()


async def test_client_gone_while_held_frees_its_place():
    d = director_for(fc_config(1), metrics=True)
    d.admission.budget = budget = BodyBudget(1 << 20)
    f = Flow(d)
    f.start(req(), "busy")
    await settle()
    task = f.start(req(), "gone")
    await settle()
    task.cancel()
    await settle()
    assert d.admission.queued == 0 and budget.used == 0 and not d.admission.bands
    assert d.metrics.registry.get_sample_value("epp_flow_control_requests_total", {
        "fairness_id": "default-flow", "priority": "0", "outcome": "EvictedContextCancelled"}) == 1
    f.finish("busy")
    await settle()
    assert d.pool.endpoints[0].inflight_requests == 0


async def test_no_endpoints_holds_until_one_appears():
    d = director_for(fc_config(4, "  noEndpointRequestTTL: 5s\n"), endpoints=0, metrics=True)
    f = Flow(d)
    task = f.start(req(), "cold")
    await settle(0.1)
    assert not task.done() and d.admission.queued == 1  # scale from zero: held, not refused
    assert d.metrics.registry.get_sample_value("inference_extension_flow_control_queue_size", {
        "fairness_id": "default-flow", "priority": "0", "inference_pool": "static"}) == 1
    d.pool.sync([EndpointSpec("new", "10.0.0.9", 8000)])
    decision = await asyncio.wait_for(task, 1)
    assert decision.primary.name == "new"


async def test_no_endpoint_ttl_is_503_no_endpoints():
    d = director_for(fc_config(4, "  defaultRequestTTL: 30s\n  noEndpointRequestTTL: 100ms\n"), endpoints=0)
    with pytest.raises(EppError) as e:
        await asyncio.wait_for(d.route(req(), None), 2)
    assert (e.value.status, e.value.reason) == (503, "rejected-no-endpoints")


async def test_without_flow_control_an_empty_pool_is_503_at_once():
    d = director_for(HEAD, endpoints=0)
    with pytest.raises(EppError, match="pool is empty"):
        await asyncio.wait_for(d.route(req(), None), 0.5)


async def _order(config: str, requests: list[tuple[str, InferenceRequest]]) -> list[str]:
    d = director_for(config)
    f = Flow(d)
    f.start(req(), "busy")
    await settle()
    for tag, r in requests:
        f.start(r, tag)
        await settle(0.002)
    f.finish("busy")
    for _ in requests:
        await settle(0.01)
        if f.decisions:
            f.finish(f.order[-1])
    await settle()
    return f.order[1:]


async def test_global_strict_fairness_is_one_order_across_flows():
    reqs = [(f"A{i}", req(fairness="A")) for i in range(3)] + [(f"B{i}", req(fairness="B")) for i in range(2)]
    assert await _order(fc_config(1), reqs) == ["A0", "A1", "A2", "B0", "B1"]


async def test_round_robin_fairness_takes_turns():
    reqs = [(f"A{i}", req(fairness="A")) for i in range(3)] + [(f"B{i}", req(fairness="B")) for i in range(2)]
    config = fc_config(1, "  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}\n")
    assert await _order(config, reqs) == ["A0", "B0", "A1", "B1", "A2"]


async def test_slo_deadline_ordering():
    reqs = [("none", req()), ("loose", req(headers={"x-llm-d-slo-ttft-ms": "5000"})),
            ("tight", req(headers={"x-llm-d-slo-ttft-ms": "100"}))]
    config = fc_config(1, "  defaultPriorityBand: {orderingPolicyRef: slo-deadline-ordering-policy}\n")
    assert await _order(config, reqs) == ["tight", "loose", "none"]


async def test_edf_ordering_by_queue_deadline():
    reqs = [("long", req()), ("short", req(headers={"x-llm-d-inference-ttl": "2s"}))]
    config = fc_config(1, "  defaultRequestTTL: 10s\n  defaultPriorityBand: {orderingPolicyRef: edf-ordering-policy}\n")
    assert await _order(config, reqs) == ["short", "long"]


async def test_priority_holdback_keeps_headroom_for_higher_priorities():
    d = director_for(fc_config(4, "  usageLimitPolicyPluginRef: holdback\n",
                               "- {type: priority-holdback-policy, name: holdback, parameters: {minCeiling: 0.5}}\n"))
    f = Flow(d)
    f.start(req(10), "hi0")  # priority 10 is active
    batch = [f.start(req(-1), f"b{i}") for i in range(3)]
    await settle()
    assert f.order == ["hi0", "b0"]  # 2 of 4 slots: batch stops at half the pool
    f.start(req(10), "hi1")
    f.start(req(10), "hi2")
    await settle()
    assert f.order == ["hi0", "b0", "hi1", "hi2"]  # the higher priority goes on to the full pool
    for tag in ("hi0", "hi1", "hi2"):
        f.finish(tag)
    await settle()
    assert f.order[4:] == ["b1"] and not batch[2].done()
    batch[2].cancel()


def test_priority_holdback_ceilings():
    cfg = load_config(HEAD + "featureGates: [flowControl]\nplugins:\n- {type: priority-holdback-policy, "
                      "parameters: {minCeiling: 0.4, maxCeiling: 0.9}}\n- {type: priority-holdback-policy, name: "
                      "by-value, parameters: {minCeiling: 0.2, domain: value}}\n"
                      "flowControl: {usageLimitPolicyPluginRef: priority-holdback-policy}\n")
    rank = cfg.admission.flow_control.usage_limit
    assert [rank.ceiling(p, [10, 0, -1]) for p in (10, 0, -1)] == pytest.approx([0.9, 0.65, 0.4])
    assert rank.ceiling(-1, []) == 0.9  # alone: the top ceiling
    value = cfg.plugins["by-value"]
    assert [value.ceiling(p, [10, 0, -10]) for p in (10, 0, -10)] == pytest.approx([1.0, 0.6, 0.2])
    with pytest.raises(PluginConfigError, match="minCeiling"):
        load_config(HEAD + "plugins: [{type: priority-holdback-policy}]\n")


async def test_requests_without_a_body_are_never_held():
    d = director_for(fc_config(1))
    f = Flow(d)
    f.start(req(), "busy")
    await settle()
    await asyncio.wait_for(d.route(req(method="GET", body=b""), None), 0.5)


async def test_reload_without_flow_control_releases_what_waits():
    d = director_for(fc_config(1))
    f = Flow(d)
    f.start(req(), "busy")
    await settle()
    task = f.start(req(), "held")
    await settle()
    d.set_config(load_config(HEAD, d.pool))
    await asyncio.wait_for(task, 1)
    assert d.admission.queued == 0


async def test_held_request_refused_in_the_api_envelope_with_drop_reason():
    d = make_director(config=fc_config(1, "  defaultRequestTTL: 100ms\n"))
    busy = new_stream(d)
    await drive(busy, [headers_msg(), body_msg(BODY)])
    out = await drive(new_stream(d), [headers_msg("/v1/messages", {"x-request-id": "abc"}),
                                      body_msg(json.dumps({"model": "m", "max_tokens": 5, "messages": [
                                          {"role": "user", "content": "hi"}]}).encode())])
    status, headers, body = immediate(out[0])
    assert status == 503 and headers["x-llm-d-request-dropped-reason"] == "rejected-ttl-expired"
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error" and body["request_id"] == "abc"


# -- legacy admission ---------------------------------------------------------------------------

async def test_legacy_admission_sheds_only_sheddable_when_saturated():
    d = make_director([("a", 10, 0.1), ("b", 10, 0.9)])  # default config: utilization detector
    with pytest.raises(EppError) as e:
        await d.route(req(-1), None)
    assert (e.value.status, e.value.reason) == (429, "rejected-saturated")
    await d.route(req(0), None)  # priority >= 0 is never shed, never held
    calm = make_director([("a", 1, 0.1), ("b", 2, 0.2)])
    await calm.route(req(-1), None)
    for ep in calm.pool.endpoints:
        ep.metrics.updated_at = time.monotonic() - 1  # stale metrics count as saturated
    with pytest.raises(EppError):
        await calm.route(req(-1), None)


# -- detectors ---------------------------------------------------------------------------------

def _detector(config: str):
    return load_config(config).admission.detector


def test_utilization_detector():
    det = _detector(HEAD + "plugins:\n- type: utilization-detector\n  parameters: {queueDepthThreshold: 4, "
                           "kvCacheUtilThreshold: 0.5, metricsStalenessThreshold: 1s}\n"
                           "saturationDetector: {pluginRef: utilization-detector}\n")
    pool = EndpointPool()
    pool.sync([EndpointSpec("a", "10.0.0.1", 1), EndpointSpec("b", "10.0.0.2", 1)])
    a, b = pool.endpoints
    now = time.monotonic()
    for e in (a, b):
        e.metrics.updated_at = now
    a.metrics.waiting_requests = 2  # 2/4 = 0.5
    b.metrics.kv_cache_usage = 0.25  # 0.25/0.5 = 0.5
    assert det.saturation([a, b]) == pytest.approx(0.5)
    a.inflight_requests = 2  # routed by EPP since the scrape: counted as waiting until the next one
    assert det.saturation([a]) == pytest.approx(1.0)
    b.metrics.updated_at = now - 5
    assert det.saturation([b]) == 1.0 and det.saturation([]) == 1.0


def test_concurrency_detector_requests_and_tokens():
    pool = EndpointPool()
    pool.sync([EndpointSpec("a", "10.0.0.1", 1), EndpointSpec("b", "10.0.0.2", 1)])
    a, b = pool.endpoints
    a.inflight_requests, b.inflight_requests = 3, 1
    a.inflight_tokens = 500
    det = _detector(HEAD + "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurrency: 4}\n"
                           "saturationDetector: {pluginRef: concurrency-detector}\n")
    assert det.saturation([a, b]) == pytest.approx(0.5)
    tokens = _detector(HEAD + "plugins:\n- {type: concurrency-detector, parameters: {concurrencyMode: tokens, "
                              "maxTokenConcurrency: 1000}}\nsaturationDetector: {pluginRef: concurrency-detector}\n")
    assert tokens.saturation([a, b]) == pytest.approx(0.25)


# -- configuration ------------------------------------------------------------------------------

def test_config_defaults_and_llmd_names():
    cfg = load_config(HEAD + "featureGates: [flowControl]\nflowControl:\n  maxBytes: 10Gi\n"
                      "  defaultRequestTTL: 30s\n  priorityBands:\n"
                      "  - {priority: 10, maxRequests: 500, orderingPolicyRef: edf-ordering-policy}\n")
    fc = cfg.admission.flow_control
    assert fc.max_bytes == 10 << 30 and fc.default_ttl == 30 and fc.no_endpoint_ttl == 30
    assert fc.band(10).max_requests == 500 and fc.band(10).ordering.type_name == "edf-ordering-policy"
    assert fc.band(3).max_requests == 5000 and fc.band(3).max_bytes == 1_000_000_000
    assert fc.band(-1) is fc.default_band and fc.band(3).fairness.type_name == "global-strict-fairness-policy"
    assert cfg.admission.detector.type_name == "utilization-detector"
    assert load_config(None).admission.flow_control is None  # off unless configured


@pytest.mark.parametrize("text,match", [
    ("flowControl: {maxRequests: 10}\n", "featureGates"),  # never accepted and ignored
    ("featureGates: [flowControl]\nflowControl: {enableEviction: true}\n", "enableEviction"),
    ("featureGates: [flowControl]\nflowControl: {maxBytes: lots}\n", "maxBytes"),
    ("featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1}, {priority: 1}]}\n", "duplicate"),
    ("featureGates: [flowControl]\nflowControl: {priorityBands: [{maxRequests: 1}]}\n", "priority"),
    ("featureGates: [flowControl]\nflowControl: {defaultPriorityBand: {fairnessPolicyRef: queue-scorer}}\n"
     "plugins: [{type: queue-scorer}]\n", "not a fairness policy"),
    ("featureGates: [flowControl]\nflowControl: {defaultPriorityBand: {orderingPolicyRef: nope}}\n", "nope"),
    ("saturationDetector: {pluginRef: missing}\n", "missing"),
    ("saturationDetector: {pluginRef: utilization-detector}\nflowControl: {saturationDetector: "
     "{pluginRef: utilization-detector}}\n", "not both"),
    ("featureGates: [flowControl]\nflowControl: {defaultRequestTTL: soon}\n", "defaultRequestTTL"),
])
def test_config_mistakes_are_refused(text, match):
    with pytest.raises(PluginConfigError, match=match):
        load_config(HEAD + text)


def test_saturation_detector_alone_needs_no_gate():
    for text in ("flowControl:\n  saturationDetector: {pluginRef: concurrency-detector}\n",
                 "saturationDetector: {pluginRef: concurrency-detector}\n"):
        cfg = load_config(HEAD + "plugins: [{type: concurrency-detector}]\n" + text)
        assert cfg.admission.detector.type_name == "concurrency-detector" and cfg.admission.flow_control is None


def test_quantities():
    assert parse_quantity("1G", "x") == 10**9 and parse_quantity("5Gi", "x") == 5 << 30
    assert parse_quantity(500, "x") == 500 and parse_quantity("1.5k", "x") == 1500
    for bad in ("-1", "1 GB", True, "1Gb"):
        with pytest.raises(PluginConfigError):
            parse_quantity(bad, "x")


def test_static_objectives_flag():
    from epp.cli import parse_args

    cfg = parse_args(["--static-endpoints", "10.0.0.1:8000", "--static-objectives", "interactive=10, batch=-1"])
    assert cfg.static_objectives == {"interactive": 10, "batch": -1}
    for argv in (["--static-endpoints", "10.0.0.1:8000", "--static-objectives", "a=x"],
                 ["--pool-name", "p", "--static-objectives", "a=1"]):  # Kubernetes has InferenceObjectives
        with pytest.raises(SystemExit):
            parse_args(argv)
