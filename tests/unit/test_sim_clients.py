"""Real client SDKs (openai, anthropic) parse the simulator's answers, and the CLI runs as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import pytest

from epp_sim.config import SimConfig
from epp_sim.server import SimCluster

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

PROMPT = "Tell me about prefix caching. " * 20


@pytest.fixture
async def url():
    c = SimCluster(SimConfig(profile="instant", served_model_names=["m"]), n=1)
    await c.start()
    yield c.urls[0]
    await c.stop()


async def test_openai_sdk_chat_completions_and_responses(url: str) -> None:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    try:
        msgs = [{"role": "user", "content": PROMPT}]
        resp = await client.chat.completions.create(model="m", messages=msgs, max_tokens=4)
        assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 4
        stream = await client.chat.completions.create(model="m", messages=msgs, max_tokens=4, stream=True,
                                                      stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        assert text == resp.choices[0].message.content
        assert usage is not None and usage.prompt_tokens_details.cached_tokens > 0
        comp = await client.completions.create(model="m", prompt="hello", max_tokens=3)
        assert comp.usage.completion_tokens == 3
        r = await client.responses.create(model="m", input=PROMPT, max_output_tokens=3)
        assert r.usage.output_tokens == 3 and r.output_text
        events = []
        async with await client.responses.create(model="m", input=PROMPT, max_output_tokens=3,
                                                 stream=True) as rs:
            async for event in rs:
                events.append(event)
        assert events[-1].type == "response.completed"
        assert events[-1].response.usage.input_tokens_details.cached_tokens > 0
        emb = await client.embeddings.create(model="m", input=["a", "b"])
        assert len(emb.data) == 2
        models = await client.models.list()
        assert [m.id for m in models.data] == ["m"]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="other", messages=msgs)
    finally:
        await client.close()


async def test_anthropic_sdk_messages(url: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=url, api_key="none", max_retries=0)
    try:
        msgs = [{"role": "user", "content": PROMPT}]
        msg = await client.messages.create(model="m", max_tokens=4, messages=msgs)
        assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 4
        async with client.messages.stream(model="m", max_tokens=4, messages=msgs) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == msg.content[0].text
        assert final.usage.cache_read_input_tokens > 0 and final.usage.output_tokens == 4
        count = await client.messages.count_tokens(model="m", messages=msgs)
        assert count.input_tokens == msg.usage.input_tokens
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model="m", max_tokens=0, messages=msgs)
    finally:
        await client.close()


async def test_cli_serves_pods_and_exits_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp_sim", "--pods", "3", "--base-port", "0", "--profile", "fast",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=15)).decode().strip()
        assert line.startswith("sim ready "), line
        addresses = line.removeprefix("sim ready ").split(",")
        assert len(addresses) == 3
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for addr in addresses:
                async with http.get(f"http://{addr}/health") as r:
                    assert r.status == 200 and r.headers["x-served-by"] == addr
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
