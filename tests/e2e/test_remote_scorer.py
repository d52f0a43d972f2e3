"""remote-scorer through the real Envoy: a scorer in another process (examples/remote-scorer/server.py) steers
routing; killed, routing goes on over the fallback and /metrics shows the failed and skipped calls."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from epp.extproc.protocol import DECISION_HEADER
from epp.stack.local import HOST, LocalStack, ManagedProcess, free_port
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS

SERVER = Path(__file__).resolve().parents[2] / "examples" / "remote-scorer" / "server.py"
CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: remote-scorer
  parameters: {{address: "{address}", timeout: 200ms, backoff: 30s}}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: remote-scorer, weight: 10}}
  - {{pluginRef: queue-scorer}}
"""


@pytest.fixture(scope="module")
def rig() -> Iterator[tuple[LocalStack, ManagedProcess]]:
    s = LocalStack(pods=3, sim_args=SIM_ARGS)
    port = free_port()
    server = ManagedProcess("remote-scorer", [sys.executable, str(SERVER), "--host", HOST, "--port", str(port),
                                              "--prefer", s.endpoints[2]], s.dir)
    server.start()
    try:
        server.wait_for_log("remote scorer ready", 30)
        s.epp_args = ["--config-text", CONFIG.format(address=f"{HOST}:{port}")]
        with s:
            yield s, server
    finally:
        server.stop()


def calls(stack: LocalStack) -> dict[str, float]:
    text = httpx.get(f"http://{HOST}:{stack.metrics_port}/metrics", timeout=5).text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^epp_remote_scorer_calls_total\{outcome="(\w+)",plugin="remote-scorer"\} (\S+)', text, re.M)} or {
        m[2]: float(m[3]) for m in re.finditer(
        r'^epp_remote_scorer_calls_total\{plugin="(remote-scorer)",outcome="(\w+)"\} (\S+)', text, re.M)}


def picks(stack: LocalStack, n: int) -> list[str]:
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 2}
    out = []
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        for _ in range(n):
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text[:300]
            out.append(r.headers[DECISION_HEADER])
    return out


def test_the_remote_scorer_steers_then_routing_falls_back_when_it_dies(rig):
    stack, server = rig
    assert set(picks(stack, 8)) == {stack.endpoints[2]}  # the remote service prefers the third pod
    assert calls(stack)["ok"] >= 8
    server.stop()
    assert len(picks(stack, 8)) == 8  # every request still routed, on the queue scorer alone
    after = calls(stack)
    assert after["error"] + after["timeout"] >= 1
    assert after["skipped"] >= 6  # backing off: the dead service costs no request its deadline
