"""Wake-on-request through a real Envoy with the OpenAI and Anthropic SDKs: a sleeping model server (vLLM sleep
mode, simulated) serves 20 concurrent first requests after one wake, in the normal response format; a wake that
takes longer than --wake-timeout answers all of them 503 wake-failed in the API's envelope."""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import openai
import pytest

from epp.stack.local import LocalStack
from epp.stack.tour import MODEL
from tests.e2e.test_operability import scrape, total

SIM_ARGS = ["--profile", "fast", "--model", MODEL, "--wake-latency-ms", "500", "--wake-latency-level2-ms", "4000"]


@pytest.fixture(scope="module")
def wake_stack():
    with LocalStack(pods=1, sim_args=SIM_ARGS, epp_args=["--wake-timeout", "1500ms"]) as s:
        yield s


def sleep_pod(stack: LocalStack, level: int) -> None:
    pod = f"http://{stack.endpoints[0]}"
    deadline = time.monotonic() + 10
    while httpx.post(f"{pod}/sleep?level={level}").status_code != 200:  # refused while waking or busy
        assert time.monotonic() < deadline
        time.sleep(0.2)
    while total(scrape(stack)[0], "epp_endpoint_sleeping") != 1:  # EPP's next scrape sees it
        assert time.monotonic() < deadline
        time.sleep(0.05)


def pod_state(stack: LocalStack) -> dict:
    return json.loads(httpx.get(f"http://{stack.endpoints[0]}/sim/state").text)["sleep"]


def test_sleeping_model_serves_concurrent_first_requests_after_one_wake(wake_stack):
    sleep_pod(wake_stack, 1)
    wakes = pod_state(wake_stack)["wakes"]
    before = scrape(wake_stack)[0]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{wake_stack.url}/v1", api_key="unused", max_retries=0)
        async with client:
            return await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, max_tokens=5, messages=[{"role": "user", "content": f"hello {i}"}]) for i in range(20)))

    t0 = time.monotonic()
    answers = asyncio.run(run())
    assert time.monotonic() - t0 >= 0.45  # the wake latency
    assert len(answers) == 20 and all(a.choices[0].message.content and a.model == MODEL for a in answers)
    assert pod_state(wake_stack)["wakes"] == wakes + 1  # one wake for all of them
    after = scrape(wake_stack)[0]
    assert total(after, "epp_wakes_total", result="success") - total(before, "epp_wakes_total", result="success") == 1


def test_failed_wake_answers_every_waiting_request_503(wake_stack):
    sleep_pod(wake_stack, 2)  # 4 s to wake, longer than EPP's --wake-timeout of 1.5 s

    async def run():
        client = anthropic.AsyncAnthropic(base_url=wake_stack.url, api_key="unused", max_retries=0)
        async with client:
            return await asyncio.gather(*(client.messages.create(
                model=MODEL, max_tokens=5, messages=[{"role": "user", "content": f"hi {i}"}]) for i in range(20)),
                return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(e, anthropic.APIStatusError) and e.status_code == 503 for e in results), results
    for e in results:
        assert e.response.headers["x-epp-error-reason"] == "wake-failed"
        body = e.response.json()
        assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
        assert body["request_id"] == e.response.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while pod_state(wake_stack)["level"]:  # the pod's own wake goes on and finishes
        assert time.monotonic() < deadline
        time.sleep(0.2)
