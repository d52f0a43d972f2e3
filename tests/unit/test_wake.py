"""Wake-on-request against the simulator's sleep mode: sleeping endpoints are not candidates; a request with no
awake candidate wakes one and waits; concurrent requests share the wake; a wake that fails is 503 wake-failed."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from epp.api.errors import EppError
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.director import Director
from epp.observability.metrics import EppMetrics
from epp.scheduling.config import load_config
from epp_sim.config import SimConfig
from epp_sim.server import SimCluster
from tests.unit.test_admission import req


@pytest.fixture
async def sim():
    c = SimCluster(SimConfig(profile="instant", wake_latency_s=0.2, wake_latency_level2_s=1.5), n=2)
    await c.start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield c, http
    await c.stop()


def director_on(cluster: SimCluster) -> Director:
    pool = EndpointPool()
    hostports = [a.rsplit(":", 1) for a in cluster.addresses]
    pool.sync([EndpointSpec(f"p{i}", host, int(port)) for i, (host, port) in enumerate(hostports)])
    for ep in pool.endpoints:
        ep.metrics.updated_at = time.monotonic()
    return Director(pool, load_config(None, pool), metrics=EppMetrics(pool))


async def put_to_sleep(http: aiohttp.ClientSession, d: Director, level: int = 1) -> None:
    for ep in d.pool.endpoints:
        async with http.post(f"http://{ep.hostport}/sleep?level={level}") as r:
            assert r.status == 200
        ep.metrics.sleeping = True  # as the next scrape of vllm:engine_sleep_state would report


async def wakes(http: aiohttp.ClientSession, d: Director) -> list[int]:
    out = []
    for ep in d.pool.endpoints:
        async with http.get(f"http://{ep.hostport}/sim/state") as r:
            out.append(json.loads(await r.text())["sleep"]["wakes"])
    return out


async def test_concurrent_requests_share_one_wake(sim):
    cluster, http = sim
    d = director_on(cluster)
    await put_to_sleep(http, d)
    t0 = time.monotonic()
    decisions = await asyncio.gather(*(d.route(req(), None) for _ in range(20)))
    assert time.monotonic() - t0 >= 0.18  # they waited for the wake
    assert sorted(await wakes(http, d)) == [0, 1]  # one endpoint woken, once
    woken = {x.primary for x in decisions}
    assert len(woken) == 1 and not woken.pop().asleep
    r = d.metrics.registry
    assert r.get_sample_value("epp_wakes_total", {"result": "success"}) == 1
    assert r.get_sample_value("epp_endpoint_sleeping", {"endpoint": "p0"}) + \
        r.get_sample_value("epp_endpoint_sleeping", {"endpoint": "p1"}) == 1
    await d.waker.close()


async def test_sleeping_endpoints_are_not_candidates_and_nothing_wakes_while_one_is_awake(sim):
    cluster, http = sim
    d = director_on(cluster)
    await put_to_sleep(http, d)
    awake = d.pool.endpoints[1]
    async with http.post(f"http://{awake.hostport}/wake_up") as r:
        assert r.status == 200
    awake.metrics.sleeping = False
    decisions = [await d.route(req(), None) for _ in range(6)]
    assert {x.primary for x in decisions} == {awake}
    assert await wakes(http, d) == [0, 1]  # only the wake this test made
    await d.waker.close()


async def test_a_wake_that_times_out_answers_every_waiting_request_503(sim):
    cluster, http = sim
    d = director_on(cluster)
    d.waker.timeout = 0.3
    await put_to_sleep(http, d, level=2)  # 1.5 s to wake: longer than the timeout
    results = await asyncio.gather(*(d.route(req(), None) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(e, EppError) and (e.status, e.reason) == (503, "wake-failed") for e in results), results
    assert d.metrics.registry.get_sample_value("epp_wakes_total", {"result": "failure"}) == 1
    await d.waker.close()


async def test_requests_without_a_body_do_not_wake(sim):
    cluster, http = sim
    d = director_on(cluster)
    await put_to_sleep(http, d)
    decision = await d.route(req(method="GET", body=b""), None)  # GET /v1/models: the engine answers asleep
    assert decision.primary.asleep and await wakes(http, d) == [0, 0]
    await d.waker.close()
