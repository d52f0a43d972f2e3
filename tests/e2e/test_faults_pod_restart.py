"""A model server restarting at the same address, through a real Envoy + EPP: the simulated pod's process is stopped
and started again on the same port, with an empty KV cache and its counters back at 0. EPP sees it in the first
scrape of the new process (epp/datalayer/restarts.py) and forgets what it believed that pod cached before any
request is sent there, where misses (``MISSES_TO_FORGET``) took two cold prefills."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import httpx
import pytest

from epp.stack.local import HOST, LocalStack, ManagedProcess, free_port_range
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS
from tests.e2e.test_operability import eventually, scrape, total, value

SYSTEM = "You answer questions about the quarterly ledger, line by line. " * 40  # ~2.5k characters, one group


def _sim(stack_dir, port: int, name: str) -> ManagedProcess:
    proc = ManagedProcess(name, [sys.executable, "-m", "epp_sim", "--pods", "1", "--host", HOST, "--base-port",
                                 str(port), *SIM_ARGS], stack_dir)
    proc.start()
    proc.wait_for_log("sim ready", 30)  # a new name per start: the log file is new, not the last run's "ready"
    return proc


@pytest.fixture(scope="module")
def rig() -> Iterator[tuple[LocalStack, dict[str, ManagedProcess]]]:
    """Two pods, each its own process (so one can restart alone), behind EPP's default configuration."""
    base = free_port_range(2)
    endpoints = [f"{HOST}:{base + i}" for i in range(2)]
    stack = LocalStack(sim_endpoints=endpoints)
    sims: dict[str, ManagedProcess] = {}
    try:
        for i, ep in enumerate(endpoints):
            sims[ep] = _sim(stack.dir, base + i, f"sim{i}")
        with stack:
            yield stack, sims
    finally:
        for proc in sims.values():
            proc.stop()


def _ask(client: httpx.Client, question: str) -> httpx.Response:
    r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    return r


def _cached(r: httpx.Response) -> int:
    return (r.json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def _false_hits(stack: LocalStack) -> float:
    return total(scrape(stack)[0], "epp_prefix_prediction_total", outcome="false_hit")


def test_a_restarted_pod_is_forgotten_at_its_first_scrape(rig):
    stack, sims = rig
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        served = [_ask(c, f"Question {i}?") for i in range(3)]
        pod = served[0].headers["x-epp-endpoint"]
        assert [r.headers["x-epp-endpoint"] for r in served] == [pod] * 3  # the group's prefix is there
        assert _cached(served[-1]) > 0
        s = scrape(stack)[0]
        assert total(s, "inference_extension_prefix_indexer_size") > 0
        assert value(s, "epp_endpoint_restarts_total", endpoint=pod) == 0
        false_hits = _false_hits(stack)

        old = sims[pod]
        old.stop()  # by its pid's process group (SIGTERM)
        sims[pod] = _sim(stack.dir, int(pod.rsplit(":", 1)[1]), f"{old.name}-again")

        # No request has gone to the pod since: only the scrape can have told EPP.
        assert eventually(lambda: value(scrape(stack)[0], "epp_endpoint_restarts_total", endpoint=pod) == 1, 15), \
            stack.epp.tail() if stack.epp else ""
        s = scrape(stack)[0]
        assert total(s, "inference_extension_prefix_indexer_size") == 0  # the other pod held nothing
        other = next(ep for ep in sims if ep != pod)
        assert value(s, "epp_endpoint_restarts_total", endpoint=other) == 0
        assert stack.epp is not None and f"{pod} restarted (" in stack.epp.tail(20000)

        # The group's next request is not predicted to hit on the cold pod (before: a false hit, and a cold
        # prefill there, twice, until misses lowered its horizon).
        audited = total(scrape(stack)[0], "epp_prefix_prediction_total")
        _ask(c, "Question 3?")
        assert eventually(lambda: total(scrape(stack)[0], "epp_prefix_prediction_total") > audited, 5)
        assert _false_hits(stack) == false_hits
