"""Flow control through a real Envoy: under overload the high-priority band is served while sheddable requests
are refused with 429 and a drop reason; every request has exactly one outcome, reconciled with EPP's counters;
with no endpoint at all (scale from zero) a request is held until one appears."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest

from epp.stack.local import HOST, LocalStack
from epp.stack.tour import MODEL
from tests.e2e.test_operability import scrape, total, value

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: 4}
saturationDetector: {pluginRef: concurrency-detector}
flowControl:
  defaultRequestTTL: 30s
  noEndpointRequestTTL: 30s
  defaultNegativePriorityBand: {maxRequests: 4}
"""
# One pod with four batch slots, 20 ms per decode step: about 0.3 s per request, about 13 requests/s.
SIM_ARGS = ["--profile", "fast", "--model", MODEL, "--step-fixed-ms", "20", "--max-num-seqs", "4"]
ROUTES = {"/interactive/": {"x-gateway-inference-objective": "interactive"},
          "/batch/": {"x-gateway-inference-objective": "batch"}}
EPP_ARGS = ["--trust-objective-header", "--static-objectives", "interactive=10,batch=-1", "--config-text", CONFIG]


@pytest.fixture(scope="module")
def fc_stack():
    with LocalStack(pods=1, sim_args=SIM_ARGS, route_headers=ROUTES, epp_args=EPP_ARGS) as s:
        yield s


async def _chat(client: httpx.AsyncClient, prefix: str, i: int) -> tuple[str, httpx.Response, float]:
    body = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": f"{prefix} request {i}"}]}
    r = await client.post(f"/{prefix}/v1/chat/completions" if prefix else "/v1/chat/completions", json=body)
    return prefix, r, time.monotonic()


def test_overload_sheds_sheddable_and_serves_high_priority(fc_stack):
    before, _ = scrape(fc_stack)

    async def run():
        async with httpx.AsyncClient(base_url=fc_stack.url, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as c:
            batch = [asyncio.create_task(_chat(c, "batch", i)) for i in range(30)]
            await asyncio.sleep(0.15)  # the pod is full of batch requests, four more wait in EPP
            interactive = [asyncio.create_task(_chat(c, "interactive", i)) for i in range(10)]
            return await asyncio.gather(*batch, *interactive)

    results = asyncio.run(run())
    assert len(results) == 40
    outcomes = Counter((prefix, r.status_code) for prefix, r, _ in results)
    assert outcomes[("interactive", 200)] == 10, outcomes  # every high-priority request served
    assert set(outcomes) <= {("interactive", 200), ("batch", 200), ("batch", 429)}, outcomes
    shed = [r for prefix, r, _ in results if r.status_code == 429]
    assert len(shed) >= 15, outcomes  # 4 slots + 4 queued at most; the rest refused at once
    for r in shed:
        doc = r.json()
        assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-saturated"
        assert r.headers["x-epp-error-reason"] == "rejected-saturated"
        assert doc["error"]["code"] == "rejected-saturated" and doc["error"]["type"] == "rate_limit_error"
        assert doc["requestId"] == r.headers["x-request-id"]
    # The high band went ahead of the batch requests that were already waiting.
    last_interactive = max(t for prefix, r, t in results if prefix == "interactive")
    last_batch = max(t for prefix, r, t in results if prefix == "batch" and r.status_code == 200)
    assert last_interactive < last_batch

    # Exactly one outcome each, and EPP counted the same.
    served = outcomes[("interactive", 200)] + outcomes[("batch", 200)]

    def settled():
        s, _ = scrape(fc_stack)
        return s if total(s, "inference_objective_running_requests") == 0 and \
            total(s, "inference_extension_flow_control_queue_size") == 0 else None

    deadline = time.monotonic() + 15
    after = settled()
    while after is None and time.monotonic() < deadline:
        time.sleep(0.1)
        after = settled()
    assert after is not None, "EPP still holds or runs requests"

    def delta(metric: str, /, **labels: str) -> float:
        return total(after, metric, **labels) - total(before, metric, **labels)

    assert delta("inference_objective_request_total") == served
    assert delta("inference_objective_request_total", priority="10") == 10
    assert delta("epp_rejections_total", reason="rejected-saturated", status="429") == len(shed)
    assert delta("epp_flow_control_requests_total", outcome="Dispatched") == served
    assert delta("epp_flow_control_requests_total", outcome="RejectedCapacity") == len(shed)
    assert delta("epp_flow_control_requests_total", outcome="Dispatched", priority="10") == 10
    assert delta("epp_flow_control_requests_total") == len(results)  # no other outcome
    assert delta("inference_extension_flow_control_request_queue_duration_seconds_count",
                 outcome="RejectedCapacity", priority="-1") == len(shed)
    assert value(after, "inference_extension_flow_control_pool_saturation", inference_pool="static") == 0


def test_no_endpoint_holds_the_request_until_one_appears(tmp_path):
    """Scale from zero: the pool starts empty; the request waits in EPP (a metric an autoscaler reads) and is
    served once an endpoint is discovered, instead of an immediate 503."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    args = ["--static-endpoints-file", str(endpoints), "--config-text", CONFIG]
    with LocalStack(pods=1, sim_args=SIM_ARGS, epp_args=args, tls=False) as s:
        async def run():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                task = asyncio.create_task(_chat(c, "", 0))
                for _ in range(100):  # until EPP holds it
                    await asyncio.sleep(0.05)
                    held = value(scrape(s)[0], "inference_extension_flow_control_queue_size",
                                 fairness_id="default-flow", priority="0", inference_pool="static")
                    if held == 1:
                        break
                assert held == 1 and not task.done()
                await asyncio.sleep(1.0)
                assert not task.done()  # not refused while no endpoint exists
                endpoints.write_text(f"endpoints: ['{HOST}:{s.sim_base}']\n")  # the first pod is ready
                return await task

        _, r, _ = asyncio.run(run())
        assert r.status_code == 200 and r.json()["choices"]
