"""Behind GIE's standard Envoy (both body modes FULL_DUPLEX_STREAMED, both trailer modes SEND, ORIGINAL_DST on
x-gateway-destination-endpoint), every successful request is recorded as completed, with its usage.

The OpenAI SDK stops reading a stream at ``data: [DONE]`` and drops the connection; Envoy then resets the
ext_proc stream, and when the model server's end of stream (the terminating chunk) trails the last event, as
it does from a busy server, EPP never gets the body's end-of-stream. It did see ``[DONE]``: that counts."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from epp.stack.envoy import EnvoySpec, envoy_config
from epp.stack.local import LocalStack
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS

# Long enough to fill prefix-cache blocks, so a repeated request reports cached tokens.
PROMPT = "Summarise the history of the printing press in three sentences. " * 12
ID = "x-sim-request-id"  # the x-request-id the pod received, echoed


@pytest.fixture(scope="module")
def gie_stack() -> Iterator[LocalStack]:
    with LocalStack(pods=1, sim_args=SIM_ARGS, envoy_profile="gie", epp_args=["--debug-endpoints"]) as s:
        yield s


def _control(stack: LocalStack, **faults: object) -> None:
    for endpoint in stack.endpoints:
        r = httpx.post(f"http://{endpoint}/sim/control", json=faults, timeout=5)
        r.raise_for_status()


def _decisions(stack: LocalStack) -> dict[str, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/debug/decisions?limit=256",
                                timeout=5) as r:
        return {d["id"]: d for d in json.loads(r.read())["decisions"] if d.get("id")}


def _wait_completed(stack: LocalStack, ids: list[str], timeout: float = 10.0) -> dict[str, dict]:
    """The decision records of ``ids`` once each has its end recorded (status set at completion)."""
    deadline = time.monotonic() + timeout
    while True:
        records = _decisions(stack)
        if all("status" in records.get(i, {}) for i in ids) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_the_envoy_configuration_is_gies():
    cfg = envoy_config(EnvoySpec(listen_port=1, admin_port=2, extproc_port=3, profile="gie"))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    assert ext_proc["processing_mode"] == {
        "request_header_mode": "SEND", "response_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED", "response_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"}
    assert "failure_mode_allow" not in ext_proc and "metadata_options" not in ext_proc
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert clusters["original_destination_cluster"]["original_dst_lb_config"] == {
        "use_http_header": True, "http_header_name": "x-gateway-destination-endpoint"}


@pytest.mark.parametrize("eof_delay_ms", [0, 100])
def test_sdk_requests_are_recorded_completed_with_their_usage(gie_stack, eof_delay_ms):
    stack = gie_stack
    _control(stack, eof_delay_ms=eof_delay_ms)
    try:
        oc = openai.OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0)
        ac = anthropic.Anthropic(base_url=stack.url, api_key="x", max_retries=0)
        # Request id (GIE's Envoy, an edge proxy, makes its own; the pod echoes it) -> (prompt, completion,
        # cached) tokens as the client got them.
        seen: dict[str, tuple[int, int, int]] = {}
        for _ in range(2):  # the second time the prompts are in the pod's prefix cache
            raw = oc.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=6, stream=True,
                stream_options={"include_usage": True})
            chunks = list(raw.parse())  # stops reading at [DONE] and closes the connection
            u = chunks[-1].usage
            seen[raw.headers[ID]] = (u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens)

            raw = oc.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "json " + PROMPT}], max_tokens=6)
            u = raw.parse().usage
            seen[raw.headers[ID]] = (u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens)

            with ac.messages.stream(model=MODEL, max_tokens=6,
                                    messages=[{"role": "user", "content": "messages " + PROMPT}]) as ms:
                for _ in ms:
                    pass
                m = ms.get_final_message().usage
                rid = ms.response.headers[ID]
            cached = m.cache_read_input_tokens or 0
            seen[rid] = (m.input_tokens + cached + (m.cache_creation_input_tokens or 0), m.output_tokens, cached)

        records = _wait_completed(stack, list(seen))
        for rid, (prompt, completion, cached) in seen.items():
            rec = records.get(rid)
            assert rec is not None, f"no decision recorded for {rid}"
            assert rec["status"] == 200 and not rec.get("failed"), rec  # completed normally
            assert (rec.get("tokens_in"), rec.get("tokens_out"), rec.get("tokens_cached")) == \
                (prompt, completion, cached), rec
        assert len(seen) == 6 and any(c > 0 for _, _, c in seen.values()), seen  # cached tokens exercised
        assert "ended abnormally" not in stack.epp.tail(200_000)
    finally:
        _control(stack, eof_delay_ms=0)
