"""The simulator's P/D: a prefill pod answers do_remote_decode with kv_transfer_params; a decode pod acts as
llm-d's sidecar on x-prefiller-host-port, pulls the KV and finds it cached; a dead prefill pod falls back."""

from __future__ import annotations

import json

import aiohttp
import pytest

from epp.stack.local import free_port
from epp_sim.config import SimConfig
from epp_sim.pd import PREFILLER_HEADER
from epp_sim.server import SimCluster
from epp_sim.testing import chat_body, parse_sse

LONG = "tell me about the history of the printing press in detail " * 60


async def state(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/sim/state") as r:
        return await r.json()


async def test_prefill_pod_answers_with_transfer_params():
    async with SimCluster(SimConfig(roles=["prefill"]), n=1) as c, aiohttp.ClientSession() as s:
        body = chat_body(LONG, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        async with s.post(f"{c.urls[0]}/v1/chat/completions", json=body) as r:
            doc = await r.json()
        params = doc["kv_transfer_params"]
        assert params["do_remote_prefill"] is True and params["remote_port"] == c.pods[0].port
        assert params["remote_host"] == "127.0.0.1" and params["remote_engine_id"] and params["remote_block_ids"]
        assert doc["usage"]["completion_tokens"] == 1
        assert (await state(s, c.urls[0]))["pd"]["prefills"] == 1
        async with s.post(f"{c.urls[0]}/v1/chat/completions", json=chat_body("plain")) as r:
            assert (await r.json())["kv_transfer_params"] is None  # only when asked


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["chat", "completions"])
async def test_decode_pod_prefills_remotely_then_decodes_from_pulled_kv(stream, api):
    async with SimCluster(SimConfig(roles=["prefill", "decode"]), n=2) as c, aiohttp.ClientSession() as s:
        prefill, decode = c.urls
        if api == "chat":
            path, body = "/v1/chat/completions", chat_body(LONG, max_tokens=5, stream=stream)
        else:
            path, body = "/v1/completions", {"prompt": LONG, "max_tokens": 5, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        async with s.post(f"{decode}{path}", json=body, headers={PREFILLER_HEADER: c.addresses[0]}) as r:
            assert r.status == 200
            text = await r.text()
        doc = [d for _, d in parse_sse(text) if isinstance(d, dict)][-1] if stream else json.loads(text)
        usage = doc["usage"]
        assert usage["completion_tokens"] == 5
        assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 16  # pulled = cached
        p, d = (await state(s, prefill))["pd"], (await state(s, decode))["pd"]
        assert p["prefills"] == 1 and d["remote_prefills"] == 1 and d["fallbacks"] == 0
        assert d["kv_pulled_tokens"] >= usage["prompt_tokens"] - 16
        async with s.get(f"{decode}/metrics") as r:
            assert "sim:pd_remote_prefill_requests_total" in await r.text()


async def test_dead_prefill_pod_falls_back_to_local_prefill():
    async with SimCluster(SimConfig(roles=["decode"]), n=1) as c, aiohttp.ClientSession() as s:
        headers = {PREFILLER_HEADER: f"127.0.0.1:{free_port()}"}
        async with s.post(f"{c.urls[0]}/v1/chat/completions", json=chat_body(LONG), headers=headers) as r:
            assert r.status == 200
            assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        pd = (await state(s, c.urls[0]))["pd"]
        assert pd == {"prefills": 0, "remote_prefills": 0, "kv_pulled_tokens": 0, "fallbacks": 1}


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown role"):
        SimCluster(SimConfig(roles=["prefil"]))
