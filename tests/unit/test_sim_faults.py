"""Fault injection through /sim/control, and the state endpoint."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from epp_sim.config import SimConfig
from epp_sim.server import SimCluster
from epp_sim.testing import chat_body

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def pod():
    c = SimCluster(SimConfig(profile="instant"), n=1)
    await c.start()
    yield c.urls[0]
    await c.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


async def control(http: aiohttp.ClientSession, url: str, doc: dict) -> dict:
    async with http.post(url + "/sim/control", json=doc) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def chat(http: aiohttp.ClientSession, url: str, path: str = "/v1/chat/completions", **kw) -> tuple[int, str]:
    async with http.post(url + path, json=chat_body("hello", **kw), **{}) as r:
        return r.status, await r.text()


async def test_fail_status_in_api_envelopes(pod, http) -> None:
    await control(http, pod, {"fail_status": 503})
    status, text = await chat(http, pod)
    assert status == 503 and json.loads(text)["error"]["code"] == 503
    async with http.post(pod + "/v1/messages", json={"model": "x", "max_tokens": 2, "messages": []}) as r:
        doc = await r.json()
        assert r.status == 503 and doc["type"] == "error" and doc["error"]["type"] == "overloaded_error"
    async with http.get(pod + "/health") as r:
        assert r.status == 200  # only inference endpoints fail
    await control(http, pod, {"reset": True})
    assert (await chat(http, pod))[0] == 200


async def test_fail_rate_is_partial(pod, http) -> None:
    await control(http, pod, {"fail_status": 500, "fail_rate": 0.5})
    statuses = [(await chat(http, pod, max_tokens=1))[0] for _ in range(40)]
    assert 0 < statuses.count(500) < 40 and statuses.count(200) + statuses.count(500) == 40


async def test_hang_accepts_but_never_answers(pod, http) -> None:
    await control(http, pod, {"hang": True})
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(pod + "/v1/chat/completions", json=chat_body("x"),
                             timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    async with http.get(pod + "/metrics") as r:
        assert r.status == 200  # a black hole: health and metrics still look fine
    await control(http, pod, {"hang": "all"})
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(pod + "/health", timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    await control(http, pod, {"hang": False})
    assert (await chat(http, pod))[0] == 200
    async with http.get(pod + "/sim/state") as r:
        state = await r.json()
    assert state["running"] == 0 and state["waiting"] == 0 and state["kv_blocks_used"] == 0


@pytest.mark.parametrize("mode", ["error", "garbage", "slow", "empty"])
async def test_metrics_faults(pod, http, mode: str) -> None:
    await control(http, pod, {"metrics": mode, "metrics_delay_s": 0.3})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with http.get(pod + "/metrics") as r:
        text = await r.text()
        status = r.status
    took = loop.time() - t0
    if mode == "error":
        assert status == 500
    elif mode == "garbage":
        assert status == 200 and "vllm:num_requests_waiting" not in text
    elif mode == "slow":
        assert status == 200 and took >= 0.3 and "vllm:num_requests_waiting" in text
    else:
        assert status == 200 and text == ""


async def test_health_error_and_delay(pod, http) -> None:
    await control(http, pod, {"health": "error", "delay_ms": 150})
    async with http.get(pod + "/health") as r:
        assert r.status == 503
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert (await chat(http, pod))[0] == 200
    assert loop.time() - t0 >= 0.15


async def test_abort_after_tokens_cuts_the_stream(pod, http) -> None:
    await control(http, pod, {"abort_after_tokens": 2})
    got = b""
    with pytest.raises(aiohttp.ClientError):
        async with http.post(pod + "/v1/chat/completions", json=chat_body("x", max_tokens=10, stream=True)) as r:
            async for chunk in r.content.iter_any():
                got += chunk
    assert got.count(b'"content":" ') == 2 and b"[DONE]" not in got
    await asyncio.sleep(0.05)
    async with http.get(pod + "/sim/state") as r:
        state = await r.json()
    assert state["running"] == 0 and state["finished"].get("abort") == 1


async def test_client_disconnect_aborts_engine_request(http) -> None:
    async with SimCluster(SimConfig(profile="instant", step_fixed_s=0.01)) as c:
        url = c.urls[0]
        with pytest.raises(asyncio.TimeoutError):
            async with http.post(url + "/v1/chat/completions", json=chat_body("x", max_tokens=500),
                                 timeout=aiohttp.ClientTimeout(total=0.1)) as r:
                await r.read()
        for _ in range(50):
            async with http.get(url + "/sim/state") as r:
                state = await r.json()
            if state["running"] == 0:
                break
            await asyncio.sleep(0.02)
        assert state["running"] == 0 and state["kv_blocks_used"] == 0


async def test_control_validation_and_step_scale(pod, http) -> None:
    for bad in ({"nope": 1}, {"fail_status": 200}, {"metrics": "weird"}, {"step_time_scale": -1}, [1]):
        async with http.post(pod + "/sim/control", json=bad) as r:
            assert r.status == 400 and "error" in await r.json()
    doc = await control(http, pod, {"step_time_scale": 3})
    assert doc["step_time_scale"] == 3.0
    doc = await control(http, pod, {"reset": True})
    assert doc["step_time_scale"] == 1.0 and doc["faults"]["fail_status"] is None


async def test_reset_prefix_cache(pod, http) -> None:
    body = chat_body("a fairly long prompt " * 30)
    await http.post(pod + "/v1/chat/completions", json=body)
    doc = await control(http, pod, {"reset_prefix_cache": True})
    assert doc["prefix_blocks_dropped"] > 0
    async with http.post(pod + "/v1/chat/completions", json=body) as r:
        assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_kv_events_buffer(http) -> None:
    async with SimCluster(SimConfig(profile="instant", kv_events_buffer=16, num_gpu_blocks=8)) as c:
        url = c.urls[0]
        for i in range(3):
            await http.post(url + "/v1/chat/completions", json=chat_body(f"{i} words " * 20, max_tokens=1))
        async with http.get(url + "/sim/kv_events?after=-1") as r:
            doc = await r.json()
    events = [e for b in doc["batches"] for e in b["events"]]
    stored = [e for e in events if e["type"] == "BlockStored"]
    assert stored and stored[0]["parent_block_hash"] is None and stored[0]["block_size"] == 16
    assert len(stored[0]["token_ids"]) == 16 * len(stored[0]["block_hashes"])
    assert any(e["type"] == "BlockRemoved" for e in events)  # 8 blocks cannot hold 3 prompts


def test_msgpack_encoder_matches_format() -> None:
    from epp_sim.kv_events import msgpack_encode, to_wire

    assert msgpack_encode([1.5, [], 0]) == b"\x93\xcb" + (1.5).hex().encode() * 0 + bytes.fromhex(
        "3ff8000000000000") + b"\x90\x00"
    wire = to_wire(("BlockStored", [2**64 - 1], None, [1, 2], 2, "lora"))
    assert wire == ["BlockStored", [2**64 - 1], None, [1, 2], 2, None, "GPU", "lora"]
    assert msgpack_encode(wire).startswith(b"\x98\xabBlockStored\x91\xcf\xff")
