"""Prefill/decode disaggregation through the real Envoy: EPP with manifests/examples/pd-disaggregation.yaml as
it ships, over one prefill pod and two decode pods (simulator processes acting as vLLM + llm-d's sidecar).

Long prompts are prefilled on the prefill pod and decoded on a decode pod (both pods' counters show it), short
ones are served by a decode pod alone; chat and completions, streamed and not; a client's
``x-prefiller-host-port`` never reaches a pod; the prefill pod dying mid-run costs no request.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import httpx
import pytest

from epp.extproc.protocol import DECISION_HEADER, PREFILLER_HEADER
from epp.stack.local import LocalStack, free_port
from epp.stack.pd import PdPods
from epp.stack.tour import MODEL
from epp_sim.testing import parse_sse
from tests.e2e.conftest import SIM_ARGS

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu",
         "xi", "omicron", "pi", "rho", "sigma", "tau")


def long_prompt(seed: int) -> str:
    """~12k characters (~3k tokens), unique from its first words on, so no prefix is cached anywhere."""
    return f"case {seed}: " + " ".join(WORDS[(seed + i * 7) % len(WORDS)] + str(i % 97) for i in range(1500))


@pytest.fixture(scope="module")
def pd() -> Iterator[tuple[PdPods, LocalStack]]:
    with PdPods(prefill=1, decode=2, sim_args=SIM_ARGS) as pods, \
            LocalStack(sim_endpoints=pods.endpoints, epp_args=pods.epp_args()) as stack:
        yield pods, stack


def pd_state(endpoint: str) -> dict:
    return httpx.get(f"http://{endpoint}/sim/state", timeout=5).json()["pd"]


def totals(pods: PdPods) -> dict[str, dict]:
    return {role: {k: sum(pd_state(e)[k] for e in pods.role_endpoints(role))
                   for k in ("prefills", "remote_prefills", "fallbacks")} for role in ("prefill", "decode")}


def send(client: httpx.Client, api: str, text: str, stream: bool, headers: dict[str, str] | None = None
         ) -> tuple[httpx.Response, dict]:
    if api == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
    else:
        path, body = "/v1/completions", {"prompt": text}
    body.update(model=MODEL, max_tokens=6, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = client.post(path, json=body, headers=headers or {})
    assert r.status_code == 200, r.text[:300]
    usage = [d for _, d in parse_sse(r.text) if isinstance(d, dict)][-1]["usage"] if stream else r.json()["usage"]
    assert usage["completion_tokens"] == 6
    return r, usage


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["chat", "completions"])
def test_long_prompt_prefilled_on_prefill_pod_decoded_on_decode_pod(pd, api, stream):
    pods, stack = pd
    before = totals(pods)
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        r, usage = send(c, api, long_prompt(hash((api, stream)) % 1000), stream)
    after = totals(pods)
    assert r.headers[DECISION_HEADER] in pods.role_endpoints("decode")  # the pick is the decode pod
    assert after["prefill"]["prefills"] == before["prefill"]["prefills"] + 1
    assert after["decode"]["remote_prefills"] == before["decode"]["remote_prefills"] + 1
    assert after["decode"]["fallbacks"] == before["decode"]["fallbacks"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 16  # decoded from pulled KV
    record = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/debug/decisions?limit=1", timeout=5).json()
    pd_record = record["decisions"][0]["pd"]
    assert pd_record["decision"] == "prefill-decode" and pd_record["prefill_dest"] == pods.role_endpoints("prefill")[0]
    metrics = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5).text
    assert 'epp_prefill_decisions_total{endpoint="prefill-0"}' in metrics


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["chat", "completions"])
def test_short_prompt_served_by_a_decode_pod_alone(pd, api, stream):
    pods, stack = pd
    before = totals(pods)
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        r, _ = send(c, api, f"hello, how are you ({api} {stream})?", stream)
    assert r.headers[DECISION_HEADER] in pods.role_endpoints("decode")
    assert totals(pods) == before


def test_client_sent_prefiller_header_never_reaches_a_pod(pd):
    pods, stack = pd
    before = totals(pods)
    forged = {PREFILLER_HEADER: f"127.0.0.1:{free_port()}", "x-sim-echo-request": "1"}
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        r, _ = send(c, "chat", "a short question", False, forged)
        assert PREFILLER_HEADER not in r.headers["x-sim-request-headers"].split(",")
        send(c, "chat", long_prompt(4242), False, forged)  # split: EPP's own header replaces the client's
    after = totals(pods)
    assert after["decode"]["fallbacks"] == before["decode"]["fallbacks"]  # nobody dialled the forged address
    assert after["prefill"]["prefills"] == before["prefill"]["prefills"] + 1


def test_prefill_pod_dying_mid_run_falls_back_to_decode_only(pd):
    pods, stack = pd
    n = 24
    with httpx.Client(base_url=stack.url, timeout=60) as c, concurrent.futures.ThreadPoolExecutor(4) as pool:
        def one(i: int) -> int:
            r = c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 20, "messages": [
                {"role": "user", "content": long_prompt(5000 + i)}]})
            return r.status_code

        futures = [pool.submit(one, i) for i in range(n)]
        for done, f in enumerate(concurrent.futures.as_completed(futures, timeout=120), 1):
            assert f.result() == 200
            if done == n // 3:
                pods.kill("prefill")  # mid-run, requests in flight
        # after the kill: every new long prompt is served decode-only, without errors
        deadline = time.monotonic() + 30
        while True:
            r = c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4, "messages": [
                {"role": "user", "content": long_prompt(9000 + int(time.monotonic() * 1000) % 1000)}]})
            assert r.status_code == 200
            last = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/debug/decisions?limit=1", timeout=5).json()
            if last["decisions"][0]["pd"]["decision"] == "decode-only":
                break
            assert time.monotonic() < deadline, "EPP kept picking the dead prefill pod"
            time.sleep(0.1)
    assert last["decisions"][0]["pd"]["reason"] == "no-prefill-endpoint"
