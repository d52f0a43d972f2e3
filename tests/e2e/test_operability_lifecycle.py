"""Lifecycle through a real Envoy: a live config reload under load changes routing without failing a
request (and a broken config is refused), and SIGTERM during 100 streaming requests drains them all
before EPP exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import PREFIX_ONLY_CONFIG as PREFIX_ONLY
from epp.stack.local import HOST, LocalStack
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS

# Teardown stops EPP with SIGTERM: without a drain it exits at once instead of serving 30 s more.
NO_DRAIN = "--drain-timeout=0s"

RANDOM = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
"""
BROKEN = RANDOM.replace("random-picker\nschedulingProfiles", "random-picker\n  parameters: {maxNumOfEndpoints: 0}\n"
                                                             "schedulingProfiles", 1)
PROMPT = "Tell me everything about the history of the printing press, in great detail. " * 3


def replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def metric(stack: LocalStack, line_prefix: str) -> float:
    text = httpx.get(f"http://{HOST}:{stack.metrics_port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def picks(client: httpx.Client, n: int) -> set[str]:
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": PROMPT}]}
    seen = set()
    for _ in range(n):
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["x-epp-endpoint"] == r.headers["x-served-by"]
        seen.add(r.headers["x-epp-endpoint"])
    return seen


class Load:
    """Streaming requests in a background thread, counting every outcome."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        body = {"model": MODEL, "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": "load"}]}
        with httpx.Client(base_url=self.url, timeout=30) as c:
            for _ in range(2000):  # bounded
                if self.stop.is_set():
                    return
                try:
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        text = "".join(r.iter_text())
                    if r.status_code == 200 and "data: [DONE]" in text:
                        self.ok += 1
                    else:
                        self.failures.append(f"{r.status_code}: {text[:200]}")
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


def test_config_reload_under_load_changes_routing_and_refuses_a_broken_config(tmp_path):
    config = tmp_path / "picker.yaml"
    config.write_text(PREFIX_ONLY)
    with LocalStack(pods=3, sim_args=SIM_ARGS, epp_args=["--config-file", str(config), NO_DRAIN]) as stack, \
            httpx.Client(base_url=stack.url, timeout=30) as client:
        # Prefix affinity alone: the same prompt always lands where it went first.
        assert len(picks(client, 8)) == 1
        with Load(stack.url) as load:
            wait_for(lambda: load.ok >= 3, 30, "background load")
            replace(config, RANDOM)
            wait_for(lambda: metric(stack, 'epp_config_reloads_total{result="success"}') == 1, 20, "the reload")
            ok_at_reload = load.ok
            # A random picker spreads the same prompt over the pool.
            assert len(picks(client, 30)) >= 2
            replace(config, BROKEN)
            wait_for(lambda: metric(stack, 'epp_config_reloads_total{result="failure"}') == 1, 20, "the refusal")
            assert len(picks(client, 30)) >= 2  # the random picker is still in force
            wait_for(lambda: load.ok >= ok_at_reload + 3, 30, "load after the reloads")
        assert not load.failures, load.failures[:5]
        assert load.ok >= 6
        log = stack.epp.log_path.read_text()
        assert "reloaded (generation 2" in log
        refused = [line for line in log.splitlines() if "rejected, keeping the configuration in force" in line]
        assert len(refused) == 1 and "maxNumOfEndpoints" in refused[0], refused
        view = httpx.get(f"http://{HOST}:{stack.metrics_port}/debug/endpoints", timeout=10).json()
        assert view["config"]["generation"] == 2 and "maxNumOfEndpoints" in view["config"]["last_error"]
        assert view["config"]["profiles"]["default"]["picker"] == "random-picker"


def _status(port: int, service: str) -> int | None:
    try:
        with grpc.insecure_channel(f"{HOST}:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
    except grpc.RpcError:
        return None


def test_sigterm_drains_100_streaming_requests_then_exits_0():
    sim = ["--profile", "fast", "--model", MODEL, "--step-fixed-ms", "20"]  # 100 tokens take about 2 s
    with LocalStack(pods=3, sim_args=sim, epp_args=["--drain-timeout=60s", "--drain-quiet-period=1s"]) as stack:
        assert stack.epp is not None and stack.epp.proc is not None
        epp = stack.epp
        health: dict[str, int | None] = {}

        async def run() -> list:
            limits = httpx.Limits(max_connections=120, max_keepalive_connections=120)
            async with httpx.AsyncClient(base_url=stack.url, timeout=120, limits=limits) as client:
                started = asyncio.Event()
                first_bytes = 0

                async def one(i: int) -> tuple[int, int, str]:
                    nonlocal first_bytes
                    body = {"model": MODEL, "max_tokens": 100, "stream": True,
                            "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": f"request {i}"}]}
                    events = []
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data:"):
                                if not events:
                                    first_bytes += 1
                                    if first_bytes == 100:
                                        started.set()
                                events.append(line)
                    usage = json.loads(events[-2][5:])["usage"]["completion_tokens"] if len(events) >= 2 else 0
                    return r.status_code, usage, events[-1] if events else ""

                tasks = [asyncio.create_task(one(i)) for i in range(100)]
                await asyncio.wait_for(started.wait(), 60)  # every stream is flowing through EPP
                epp.signal(signal.SIGTERM)
                loop = asyncio.get_running_loop()
                for _ in range(100):  # health turns NOT_SERVING while the streams still run; liveness stays
                    health["readiness"] = await loop.run_in_executor(None, _status, stack.health_port, "readiness")
                    if health["readiness"] == health_pb2.HealthCheckResponse.NOT_SERVING:
                        health["liveness"] = await loop.run_in_executor(None, _status, stack.health_port, "liveness")
                        break
                    await asyncio.sleep(0.02)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(run())
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert all(status == 200 and usage == 100 and last.strip() == "data: [DONE]" for status, usage, last in results)
        assert health["readiness"] == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health["liveness"] == health_pb2.HealthCheckResponse.SERVING
        assert epp.proc.wait(timeout=90) == 0
        log = epp.log_path.read_text()
        assert "epp draining" in log and "drain over (no stream for 1s): 0 stream(s) still open" in log, log[-3000:]
