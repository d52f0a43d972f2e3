"""Models at their own path prefix through a real Envoy, with the OpenAI and Anthropic SDKs at
``base_url=http://<envoy>/<model>/v1`` (Anthropic's SDK adds ``/v1`` itself: ``http://<envoy>/<model>``).

Three models, one simulator process each: ``org/llama-8b`` (deployment ``llama-3-8b``), ``phi-mini`` and
``qwen-7b`` (two pods, one of them on another accelerator). ``node-1``'s accelerator holds one model at a time.
A sleeping model serves 20 concurrent first requests after one wake; waking one model puts the least-recently-used
one to sleep; a wake that fails answers every waiting request 503 in its API's envelope; a sleep drain answers 503
only to new requests with no other endpoint, while the requests in flight finish."""

from __future__ import annotations

import asyncio
import time

import anthropic
import httpx
import openai
import pytest

from epp.stack.models import ModelServers, MultiModelStack

LLAMA, PHI, QWEN = "org/llama-8b", "phi-mini", "qwen-7b"
NODE1 = {"epp.io/accelerator": "node-1", "epp.io/accelerator-budget": "1"}
NODE2 = {"epp.io/accelerator": "node-2"}


@pytest.fixture(scope="module")
def rig():
    models = [ModelServers(LLAMA, 1, [NODE1]), ModelServers(PHI, 1, [NODE1]), ModelServers(QWEN, 2, [NODE1, NODE2])]
    sim_args = ["--profile", "fast", "--step-fixed-ms", "4", "--wake-latency-ms", "500",
                "--wake-latency-level2-ms", "8000"]
    with MultiModelStack(models, sim_args, ["--model-deployments", f"llama-3-8b={LLAMA}", "--wake-timeout", "4s"]) \
            as s:
        for pod in (s.pods[LLAMA][0], s.pods[PHI][0], s.pods[QWEN][0]):  # node-1 starts empty
            s.sleep(pod)
        yield s


def wait_state(rig: MultiModelStack, prefix: str, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while rig.status(prefix).get("state") != state:
        assert time.monotonic() < deadline, rig.status(prefix)
        time.sleep(0.02)


def test_status_and_models_answer_while_asleep(rig):
    status = rig.status("llama-3-8b")
    assert status == {"model": "llama-3-8b", "state": "sleeping", "bootReady": True,
                      "queue": {"inFlight": 0, "barriered": 0}}
    assert rig.status(QWEN)["state"] == "serving"  # the served name is its own prefix; one pod is awake
    listed = openai.OpenAI(base_url=f"{rig.url}/llama-3-8b/v1", api_key="unused", max_retries=0).models.list()
    assert [m.id for m in listed.data] == [LLAMA]  # the sleeping engine answered, and nothing woke it
    assert rig.sim_state(rig.pods[LLAMA][0])["wakes"] == 0


def test_sleeping_model_serves_20_concurrent_first_requests_after_one_wake(rig):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{rig.url}/llama-3-8b/v1", api_key="unused", max_retries=0)
        async with client:
            return await asyncio.gather(*(client.chat.completions.create(
                model=LLAMA, max_tokens=5, messages=[{"role": "user", "content": f"hello {i}"}]) for i in range(20)))

    answers = asyncio.run(run())
    assert len(answers) == 20 and all(a.choices[0].message.content and a.model == LLAMA for a in answers)
    assert rig.sim_state(rig.pods[LLAMA][0])["wakes"] == 1
    assert rig.status("llama-3-8b")["state"] == "serving"


def test_waking_another_model_puts_the_least_recently_used_one_to_sleep(rig):
    async def run():
        client = anthropic.AsyncAnthropic(base_url=f"{rig.url}/{PHI}", api_key="unused", max_retries=0)
        async with client:
            return await asyncio.gather(*(client.messages.create(
                model=PHI, max_tokens=5, messages=[{"role": "user", "content": f"hi {i}"}]) for i in range(20)))

    answers = asyncio.run(run())
    assert all(a.type == "message" and a.content[0].text and a.model == PHI for a in answers)
    assert rig.sim_state(rig.pods[PHI][0])["wakes"] == 1
    assert rig.sim_state(rig.pods[LLAMA][0])["level"] == 1  # node-1 holds one model: llama went to sleep
    assert rig.status("llama-3-8b")["state"] == "sleeping" and rig.status(PHI)["state"] == "serving"


def test_a_failing_wake_answers_every_waiting_request_503_in_its_envelope(rig):
    rig.sleep(rig.pods[LLAMA][0], level=2)  # 8 s to wake: longer than EPP's --wake-timeout of 4 s

    async def run():
        oai = openai.AsyncOpenAI(base_url=f"{rig.url}/llama-3-8b/v1", api_key="unused", max_retries=0)
        ant = anthropic.AsyncAnthropic(base_url=f"{rig.url}/llama-3-8b", api_key="unused", max_retries=0)
        async with oai, ant:
            calls = [oai.chat.completions.create(model=LLAMA, max_tokens=5, messages=[{"role": "user",
                                                                                        "content": f"x {i}"}])
                     for i in range(10)]
            calls += [ant.messages.create(model=LLAMA, max_tokens=5, messages=[{"role": "user", "content": f"y {i}"}])
                      for i in range(10)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    for i, e in enumerate(results):
        assert isinstance(e, openai.APIStatusError | anthropic.APIStatusError) and e.status_code == 503, e
        assert e.response.headers["x-epp-error-reason"] == "wake-failed"
        body = e.response.json()
        if i < 10:
            assert body["error"]["code"] == "wake-failed" and body["requestId"] == e.response.headers["x-request-id"]
        else:
            assert body["error"]["type"] == "overloaded_error" and body["request_id"] == \
                e.response.headers["x-request-id"]
    deadline = time.monotonic() + 20
    while rig.sim_state(rig.pods[LLAMA][0])["level"]:  # the pod's own wake goes on and finishes
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_sleep_drain_refuses_only_new_requests_with_no_other_endpoint(rig):
    oai = openai.OpenAI(base_url=f"{rig.url}/llama-3-8b/v1", api_key="unused", max_retries=0)
    oai.chat.completions.create(model=LLAMA, max_tokens=2, messages=[{"role": "user", "content": "wake"}])
    assert rig.status("llama-3-8b")["state"] == "serving"

    async def long_stream() -> str:
        client = openai.AsyncOpenAI(base_url=f"{rig.url}/llama-3-8b/v1", api_key="unused", max_retries=0)
        async with client:
            stream = await client.chat.completions.create(
                model=LLAMA, max_tokens=300, stream=True, messages=[{"role": "user", "content": "a long answer"}])
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run():
        streaming = asyncio.create_task(long_stream())
        while rig.status("llama-3-8b")["queue"]["inFlight"] == 0:
            await asyncio.sleep(0.02)
        # phi needs node-1's room: llama, in use, drains (its streamed answer goes on)
        phi = asyncio.create_task(asyncio.to_thread(
            openai.OpenAI(base_url=f"{rig.url}/{PHI}/v1", api_key="unused", max_retries=0).completions.create,
            model=PHI, prompt="p", max_tokens=3))
        await asyncio.to_thread(wait_state, rig, "llama-3-8b", "deactivating")
        with pytest.raises(openai.APIStatusError) as refused:  # a new llama request: no other endpoint
            await asyncio.to_thread(oai.chat.completions.create, model=LLAMA, max_tokens=2,
                                    messages=[{"role": "user", "content": "late"}])
        assert not streaming.done()
        return await streaming, await phi, refused.value

    text, phi_answer, refused = asyncio.run(run())
    assert text and phi_answer.choices[0].text  # the request in flight finished; phi then woke and served
    assert refused.status_code == 503 and refused.response.json()["error"]["code"] == "model-draining"
    assert rig.sim_state(rig.pods[LLAMA][0])["level"] == 1

    # qwen: its node-1 pod drains for llama while its node-2 pod serves every new request
    httpx.post(f"http://{rig.pods[QWEN][0]}/wake_up", timeout=10)
    rig.sleep(rig.pods[PHI][0])  # node-1 then holds only qwen's pod, awake
    deadline = time.monotonic() + 10
    while rig.status(QWEN)["state"] != "serving" or rig.sim_state(rig.pods[QWEN][0])["level"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"{rig.url}/{QWEN}/v1", api_key="unused", max_retries=0)

    async def qwen_during_drain():
        llama = asyncio.create_task(asyncio.to_thread(oai.chat.completions.create, model=LLAMA, max_tokens=2,
                                                      messages=[{"role": "user", "content": "again"}]))
        answers = []
        while not llama.done():  # while qwen's node-1 pod drains and llama wakes, qwen keeps answering
            answers.append(await asyncio.to_thread(client.completions.create, model=QWEN, prompt="q", max_tokens=2))
        return await llama, answers

    llama_answer, answers = asyncio.run(qwen_during_drain())
    assert llama_answer.choices[0].message.content and answers and all(a.choices[0].text for a in answers)
    assert rig.sim_state(rig.pods[QWEN][0])["level"] == 1 and rig.sim_state(rig.pods[QWEN][1])["level"] == 0
