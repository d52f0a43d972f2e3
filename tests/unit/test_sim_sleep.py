"""The simulator's vLLM sleep mode: /sleep, /wake_up, /is_sleeping, the sleep-state metric, wake latency."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from epp_sim.config import SimConfig
from epp_sim.server import SimCluster
from epp_sim.testing import chat_body


@pytest.fixture
async def pod():
    c = SimCluster(SimConfig(profile="instant", wake_latency_s=0.2, wake_latency_level2_s=0.4), n=1)
    await c.start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield c.urls[0], http
    await c.stop()


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as r:
        return r.status, await r.text()


async def _post(http: aiohttp.ClientSession, url: str, body: object | None = None) -> int:
    async with http.post(url, data=json.dumps(body).encode() if body is not None else b"",
                         headers={"Content-Type": "application/json"}) as r:
        await r.read()
        return r.status


def _sleep_state(metrics: str) -> dict[str, float]:
    return {line.split('sleep_state="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines() if line.startswith("vllm:engine_sleep_state{")}


async def test_sleep_refuses_inference_and_wake_up_restores_it(pod):
    url, http = pod
    assert _sleep_state((await _get(http, url + "/metrics"))[1]) == {"awake": 1, "weights_offloaded": 0,
                                                                      "discard_all": 0}
    assert await _post(http, url + "/sleep?level=1") == 200
    assert json.loads((await _get(http, url + "/is_sleeping"))[1]) == {"is_sleeping": True}
    assert _sleep_state((await _get(http, url + "/metrics"))[1])["weights_offloaded"] == 1
    assert await _post(http, url + "/v1/chat/completions", chat_body("hi")) == 503
    assert (await _get(http, url + "/v1/models"))[0] == 200  # answers while asleep
    t0 = time.monotonic()
    statuses = await asyncio.gather(*(_post(http, url + "/wake_up") for _ in range(5)))  # one shared wake
    assert statuses == [200] * 5 and 0.18 < time.monotonic() - t0 < 1.0
    assert await _post(http, url + "/v1/chat/completions", chat_body("hi")) == 200
    state = json.loads((await _get(http, url + "/sim/state"))[1])["sleep"]
    assert state == {"level": 0, "waking": False, "sleeps": 1, "wakes": 1}


async def test_level_two_wakes_slower_and_bad_levels_are_refused(pod):
    url, http = pod
    assert await _post(http, url + "/sleep?level=3") == 400
    assert await _post(http, url + "/sleep?level=2") == 200
    assert _sleep_state((await _get(http, url + "/metrics"))[1])["discard_all"] == 1
    t0 = time.monotonic()
    assert await _post(http, url + "/wake_up") == 200
    assert time.monotonic() - t0 >= 0.38
    assert await _post(http, url + "/wake_up") == 200  # awake already: at once
