"""Per-model sleep against the simulator's sleep mode: path prefixes select a model; the accelerator budget puts
the least-recently-used model to sleep before waking another; a drain barrier refuses new requests with no other
endpoint while those in flight finish; idle endpoints sleep; the per-model state ``GET /<model>/status`` reports."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp
import pytest

from epp.admission.accelerator import BUDGET_LABEL, GROUP_LABEL, MEMORY_LABEL, budget, group, memory
from epp.admission.models import ModelPaths, is_status
from epp.api.errors import EppError
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.director import Director
from epp.scheduling.plugins import ResponseInfo
from epp_sim.config import SimConfig
from epp_sim.server import SimCluster
from tests.unit.test_admission import Flow, director_for, fc_config, req, settle
from tests.unit.test_wake import director_on, wakes

A, B = "org/model-a", "model-b"


def two_models(cluster: SimCluster) -> Director:
    """p0 serves A, p1 serves B (as their metrics' model_name label would say); both on one host."""
    d = director_on(cluster)
    for ep, model in zip(d.pool.endpoints, (A, B), strict=True):
        ep.metrics.served_model = model
    return d


def for_model(model: str, **kw):
    return dataclasses.replace(req(**kw), path_model=model)


async def sleep_levels(d: Director) -> list[int]:
    async with aiohttp.ClientSession() as http:
        out = []
        for ep in d.pool.endpoints:
            async with http.get(f"http://{ep.hostport}/sim/state") as r:
                out.append((await r.json())["sleep"]["level"])
        return out


def test_path_prefixes_select_the_model_and_are_stripped():
    pool = EndpointPool()
    pool.sync([EndpointSpec("p0", "10.0.0.1", 8000), EndpointSpec("p1", "10.0.0.2", 8000)])
    pool.endpoints[0].metrics.served_model = "meta-llama/Llama-3-8B"
    pool.endpoints[1].metrics.served_model = "qwen"
    paths = ModelPaths(pool, {"llama-3-8b": "meta-llama/Llama-3-8B"})
    found = paths.resolve("/llama-3-8b/v1/chat/completions?x=1")
    assert (found.name, found.model, found.path) == ("llama-3-8b", "meta-llama/Llama-3-8B", "/v1/chat/completions?x=1")
    found = paths.resolve("/meta-llama/Llama-3-8B/v1/models")  # no mapping needed: the served name, with its '/'
    assert (found.name, found.model, found.path) == ("meta-llama/Llama-3-8B", "meta-llama/Llama-3-8B", "/v1/models")
    assert paths.resolve("/qwen/status").path == "/status" and is_status(paths.resolve("/qwen/status"), "GET")
    for plain in ("/v1/chat/completions", "/unknown/v1/models", "/qwen", "/health"):
        assert paths.resolve(plain) is None
    assert [e.name for e in paths.endpoints("qwen")] == ["p1"]


def test_accelerator_groups_memory_and_budget_from_labels():
    pool = EndpointPool()
    pool.sync([EndpointSpec("p0", "10.0.0.1", 8000, {MEMORY_LABEL: "40", BUDGET_LABEL: "80"}),
               EndpointSpec("p1", "10.0.0.1", 8001, {GROUP_LABEL: "node-b", BUDGET_LABEL: "x"})])
    p0, p1 = pool.endpoints
    assert (group(p0), group(p1)) == ("10.0.0.1", "node-b")
    assert (memory(p0), memory(p1)) == (40.0, 1.0)
    assert budget([p0], 2.0) == 80.0 and budget([p1], 2.0) == 2.0  # an unreadable label: the configured default
    # pod annotations (Kubernetes discovery) give the same values, and win over a label of the same name
    pool.sync([EndpointSpec("p0", "10.0.0.1", 8000, {MEMORY_LABEL: "40"}, annotations={
        MEMORY_LABEL: "24", BUDGET_LABEL: "48", GROUP_LABEL: "node-a"})])
    (p0,) = pool.endpoints
    assert (group(p0), memory(p0), budget([p0], 2.0)) == ("node-a", 24.0, 48.0)


async def cluster_of(n: int):
    c = SimCluster(SimConfig(profile="instant", wake_latency_s=0.2), n=n)
    await c.start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield c, http
    await c.stop()


@pytest.fixture
async def two():
    async for found in cluster_of(2):
        yield found


@pytest.fixture
async def three():
    async for found in cluster_of(3):
        yield found


async def test_waking_a_model_puts_the_least_recently_used_one_to_sleep_when_the_budget_is_full(three):
    cluster, http = three
    d = director_on(cluster)
    for ep, model in zip(d.pool.endpoints, (A, B, "model-c"), strict=True):
        ep.metrics.served_model = model
    d.waker.configure(5.0, 0.0, 1, budget=2)
    _, b, _ = d.pool.endpoints
    async with http.post(f"http://{b.hostport}/sleep?level=1") as r:
        assert r.status == 200
    b.metrics.sleeping = True
    for model in (A, "model-c"):  # A used first, C last: A is the least recently used
        r = for_model(model)
        d.complete(r, await d.route(r, None), ResponseInfo(status=200))
        await asyncio.sleep(0.01)
    assert [d.waker.status(m, m)["state"] for m in (A, B, "model-c")] == ["serving", "sleeping", "serving"]
    decisions = await asyncio.gather(*(d.route(for_model(B), None) for _ in range(5)))
    assert {x.primary for x in decisions} == {b}
    assert await sleep_levels(d) == [1, 0, 0] and await wakes(http, d) == [0, 1, 0]
    assert [d.waker.status(m, m)["state"] for m in (A, B, "model-c")] == ["sleeping", "serving", "serving"]
    registry = d.metrics.registry
    assert registry.get_sample_value("epp_sleeps_total", {"reason": "evicted", "result": "success"}) == 1
    await d.waker.close()


async def test_drain_barrier_refuses_new_requests_with_no_other_endpoint_while_in_flight_ones_finish(two):
    cluster, _ = two
    d = two_models(cluster)
    a, _ = d.pool.endpoints
    first_request = for_model(A)
    first = await d.route(first_request, None)  # in flight on a
    drain = d.waker.put_to_sleep(a, "evicted")
    assert d.waker.status("a", A)["state"] == "deactivating"
    with pytest.raises(EppError) as refused:
        await d.route(for_model(A), None)
    assert (refused.value.status, refused.value.reason) == (503, "model-draining")
    assert (await d.route(for_model(B), None)).primary is not a  # other models are untouched
    await asyncio.sleep(0.1)
    assert not drain.done()  # the request in flight holds the drain
    d.complete(first_request, first, ResponseInfo(status=200))
    await asyncio.wait_for(drain, 5)
    assert a.asleep and (await sleep_levels(d))[0] == 1
    assert d.waker.status("a", A)["state"] == "sleeping"
    assert d.metrics.registry.get_sample_value("epp_sleeps_total", {"reason": "evicted", "result": "success"}) == 1
    await d.waker.close()


async def test_idle_endpoints_sleep_and_wake_on_the_next_request(two):
    cluster, http = two
    d = two_models(cluster)
    d.waker.configure(5.0, 0.2, 1, 0.0)
    d.waker.start()
    deadline = time.monotonic() + 10
    while await sleep_levels(d) != [1, 1]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert d.metrics.registry.get_sample_value("epp_sleeps_total", {"reason": "idle", "result": "success"}) == 2
    decision = await d.route(for_model(B), None)  # wakes B only
    assert decision.primary is d.pool.endpoints[1] and await wakes(http, d) == [0, 1]
    await d.waker.close()


async def test_status_barriered_counts_requests_flow_control_holds_for_the_model():
    d = director_for(fc_config(1))
    d.pool.endpoints[0].metrics.served_model = A
    f = Flow(d)
    for tag in "abc":
        f.start(for_model(A), tag)
    f.start(req(), "other")  # held too, but for the body's model, not A
    await settle()
    assert f.order == ["a"] and d.admission.queued == 3
    assert d.waker.status("a", A)["queue"] == {"inFlight": 1, "barriered": 2}
    assert d.waker.status("m", "m")["queue"]["barriered"] == 1
    f.finish("a")
    await settle()
    assert d.waker.status("a", A)["queue"] == {"inFlight": 1, "barriered": 1}
    for tag in ("b", "c", "other"):
        f.finish(tag)
        await settle()
    assert d.waker.status("a", A)["queue"]["barriered"] == 0
