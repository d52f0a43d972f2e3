"""Idle sleep (``--sleep-idle-time``) through a real Envoy, against the simulator's sleep mode: an endpoint with no
request for the idle time is put to sleep behind the drain barrier -- never while EPP's requests are in flight; while
it drains (here held open by a request that did not come through EPP, which the engine must finish before it agrees
to sleep) a new request with no other endpoint is answered 503 ``model-draining`` -- and the next request after it
slept wakes it and is served."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from epp.stack.local import HOST
from epp.stack.models import ModelServers, MultiModelStack

MODEL = "idle-model"
IDLE = "1s"


def state(rig: MultiModelStack) -> str | None:
    return rig.status(MODEL).get("state")


def wait_for(what: str, cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def idle_sleeps(rig: MultiModelStack) -> float:
    assert rig.stack is not None
    text = httpx.get(f"http://{HOST}:{rig.stack.metrics_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('epp_sleeps_total{reason="idle",result="success"'))


def test_idle_endpoint_sleeps_behind_the_drain_barrier_and_the_next_request_wakes_it():
    sim_args = ["--profile", "fast", "--step-fixed-ms", "20", "--wake-latency-ms", "300"]
    with MultiModelStack([ModelServers(MODEL, 1)], sim_args, ["--sleep-idle-time", IDLE, "--wake-timeout", "10s"]) \
            as rig:
        pod = rig.pods[MODEL][0]
        oai = openai.OpenAI(base_url=f"{rig.url}/{MODEL}/v1", api_key="unused", max_retries=0)
        assert oai.completions.create(model=MODEL, prompt="warm", max_tokens=2).choices[0].text  # awake now

        # A request EPP did not route keeps the engine busy past the end of EPP's own (below): once EPP finds the
        # endpoint idle it starts the drain, and the engine refuses to sleep until that request is done.
        direct_done = threading.Event()

        def direct() -> None:
            with httpx.stream("POST", f"http://{pod}/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": "direct", "max_tokens": 200, "stream": True}) as r:
                assert r.status_code == 200
                for _ in r.iter_bytes():
                    pass
            direct_done.set()

        thread = threading.Thread(target=direct, daemon=True)
        thread.start()

        # EPP's request in flight for longer than the idle time: the endpoint is not put to sleep under it
        async def long_stream() -> str:
            client = openai.AsyncOpenAI(base_url=f"{rig.url}/{MODEL}/v1", api_key="unused", max_retries=0)
            async with client:
                stream = await client.completions.create(model=MODEL, prompt="long", max_tokens=100, stream=True)
                return "".join([c.choices[0].text async for c in stream if c.choices])

        async def watched() -> tuple[str, list[tuple[str, int]]]:
            streaming = asyncio.create_task(long_stream())
            samples = []  # (state, EPP's requests in flight) until the client has read the whole answer
            while not streaming.done():
                s = await asyncio.to_thread(rig.status, MODEL)
                samples.append((s["state"], s["queue"]["inFlight"]))
                await asyncio.sleep(0.02)
            return await streaming, samples

        text, samples = asyncio.run(watched())
        busy = {st for st, inflight in samples if inflight}
        assert text and busy == {"serving"}  # while it was in flight, never draining nor asleep

        # Idle now: the drain starts, held by the direct request; meanwhile the barrier answers a new request 503.
        wait_for("the idle drain", lambda: state(rig) == "deactivating")
        with pytest.raises(openai.APIStatusError) as refused:
            oai.completions.create(model=MODEL, prompt="during the drain", max_tokens=2)
        assert refused.value.status_code == 503 and refused.value.response.json()["error"]["code"] == "model-draining"
        thread.join(30)
        assert direct_done.is_set()
        wait_for("the idle sleep", lambda: state(rig) == "sleeping" and rig.sim_state(pod)["level"] == 1)
        assert idle_sleeps(rig) >= 1

        # The next request wakes it, and is served as usual
        wakes = rig.sim_state(pod)["wakes"]
        answer = oai.chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content and answer.model == MODEL
        assert rig.sim_state(pod)["wakes"] == wakes + 1 and state(rig) == "serving"
