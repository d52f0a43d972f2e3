"""Faults, each through a real Envoy + EPP + simulated pods: a pod killed mid-stream, a pod that hangs,
a pod whose /metrics errors, is slow or returns garbage, clients that hang up mid-request, and every pod
gone and back. EPP must answer cleanly, keep routing, and count nothing in flight afterwards.

EPP killed and restarted under load (fail-closed and fail-open) is in test_faults_restart.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.soak import inflight, read_metrics, wait_quiet
from epp.stack.local import HOST, LocalStack, ManagedProcess, free_port
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS

ROUTE_TIMEOUT = 5.0  # Envoy's route timeout in this module: bounds a request to a hung pod
CHAT = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def write_endpoints(path: Path, endpoints: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("endpoints:\n" + "".join(f"- {e}\n" for e in endpoints) if endpoints else "endpoints: []\n")
    tmp.replace(path)  # atomic: EPP never reads half a file


def wait_pool(stack: LocalStack, endpoints: list[str], timeout: float = 20.0) -> None:
    """Wait until EPP's pool is exactly ``endpoints`` (the file is polled every second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(inflight(stack.metrics_port)) == set(endpoints):
            return
        time.sleep(0.1)
    raise AssertionError(f"EPP pool never became {endpoints}: {inflight(stack.metrics_port)}")


def control(endpoint: str, **faults: object) -> None:
    r = httpx.post(f"http://{endpoint}/sim/control", json=faults, timeout=10)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def fstack(tmp_path_factory) -> Iterator[LocalStack]:
    """Two pods listed in a static endpoints file (reloaded every second), short route timeout."""
    path = tmp_path_factory.mktemp("faults") / "endpoints.yaml"
    stack = LocalStack(pods=2, sim_args=SIM_ARGS, epp_args=["--static-endpoints-file", str(path)],
                       route_timeout=ROUTE_TIMEOUT)
    write_endpoints(path, stack.endpoints)
    stack.endpoints_file = path  # type: ignore[attr-defined]
    with stack:
        yield stack


@pytest.fixture
def pods(fstack: LocalStack) -> Iterator[list[str]]:
    """The module's pods, healthy and listed before and after each test."""
    yield fstack.endpoints
    for ep in fstack.endpoints:
        control(ep, reset=True)
    write_endpoints(fstack.endpoints_file, fstack.endpoints)  # type: ignore[attr-defined]
    wait_pool(fstack, fstack.endpoints)


@pytest.fixture
def victim(fstack: LocalStack) -> Iterator[tuple[ManagedProcess, str]]:
    """A pod in its own process, so it can be killed; slow (20 ms per token) so streams last."""
    port = free_port()
    proc = ManagedProcess(f"victim-{port}", [sys.executable, "-m", "epp_sim", "--pods", "1", "--host", HOST,
                                             "--base-port", str(port), "--profile", "fast", "--model", MODEL,
                                             "--step-fixed-ms", "20"], fstack.dir)
    proc.start()
    try:
        proc.wait_for_log("sim ready", 30)
        yield proc, f"{HOST}:{port}"
    finally:
        proc.stop()


def ok_through(stack: LocalStack, n: int = 10) -> list[str]:
    """``n`` requests through Envoy, all answered 200 by a pod EPP picked; returns who served them."""
    served = []
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        for _ in range(n):
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, (r.status_code, r.text[:300])
            assert r.headers["x-served-by"] == r.headers["x-epp-endpoint"]
            served.append(r.headers["x-served-by"])
    return served


# -- a pod killed mid-stream ---------------------------------------------------------------------------


def _stream_until_cut(url: str, started: threading.Event, outcome: list) -> None:
    body = {"model": MODEL, "max_tokens": 2000, "stream": True, "messages": [{"role": "user", "content": "long"}]}
    events = 0
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(60, connect=10)) as c, \
                c.stream("POST", "/v1/chat/completions", json=body) as r:
            outcome.append(("status", r.status_code))
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events += 1
                    if events == 2:
                        started.set()
                    if line.strip() == "data: [DONE]":
                        outcome.append(("done", events))
                        return
        outcome.append(("truncated", events))
    except httpx.TimeoutException as e:
        outcome.append(("timeout", repr(e)))
    except httpx.HTTPError as e:  # connection reset / incomplete chunked read: a clean error
        outcome.append(("error", type(e).__name__))
    finally:
        started.set()


def test_pod_killed_mid_stream(fstack, pods, victim):
    proc, address = victim
    write_endpoints(fstack.endpoints_file, [address])
    wait_pool(fstack, [address])
    started = [threading.Event() for _ in range(3)]
    outcomes: list[list] = [[] for _ in range(3)]
    threads = [threading.Thread(target=_stream_until_cut, args=(fstack.url, started[i], outcomes[i]), daemon=True)
               for i in range(3)]
    for t in threads:
        t.start()
    for ev in started:
        assert ev.wait(60), "streams never started"
    assert inflight(fstack.metrics_port)[address] == 3
    proc.proc.kill()  # SIGKILL: the pod vanishes mid-stream
    for t in threads:
        t.join(90)
        assert not t.is_alive(), "a client hung after its pod died"
    for out in outcomes:
        assert ("status", 200) in out, out
        ends = [kind for kind, _ in out if kind != "status"]
        assert ends and ends[0] in ("truncated", "error"), out  # never a clean [DONE], never a hang
    wait_quiet(fstack.metrics_port, 30)  # EPP's in-flight count for the dead pod is back at 0


def test_dead_pod_leaves_the_candidate_set(fstack, pods, victim):
    proc, address = victim
    write_endpoints(fstack.endpoints_file, [*pods, address])
    wait_pool(fstack, [*pods, address])
    proc.proc.kill()
    proc.proc.wait(10)
    deadline = time.monotonic() + 20  # let the scraper notice (scrapes every 50 ms, errors are immediate)
    while time.monotonic() < deadline:
        m = read_metrics(fstack.metrics_port)
        if any(lab.get("endpoint") == address and v == 1 for lab, v in m.get("epp_endpoint_unreachable", [])):
            break
        time.sleep(0.2)
    served = ok_through(fstack, 30)
    assert address not in served
    view = httpx.get(f"http://{HOST}:{fstack.metrics_port}/debug/endpoints", timeout=10).json()
    assert {e["address"]: e["unreachable"] for e in view["endpoints"]} == {**dict.fromkeys(pods, False), address: True}


# -- a pod that hangs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_hung_pod_is_bounded_by_the_route_timeout(fstack, pods, stream):
    for ep in pods:
        control(ep, hang=True)  # accepts the request, never answers
    body = {**CHAT, "stream": stream}
    t0 = time.monotonic()
    with httpx.Client(base_url=fstack.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json=body)
    elapsed = time.monotonic() - t0
    assert r.status_code == 504, (r.status_code, r.text[:200])  # Envoy: upstream request timeout
    assert ROUTE_TIMEOUT * 0.8 <= elapsed < 90, elapsed
    wait_quiet(fstack.metrics_port)
    for ep in pods:
        control(ep, reset=True)
    ok_through(fstack, 4)


# -- EPP that hangs --------------------------------------------------------------------------------------


def test_hung_epp_is_bounded_by_the_idle_timeout(fstack, pods):
    """SIGSTOP: EPP's sockets stay open and nothing answers. The route timeout only starts once ext_proc lets
    the request through, so without the HCM's stream_idle_timeout a request sent on Envoy's open gRPC
    connection would hang until the client gave up (seen: > 120 s). New connections fail at the 1 s connect
    timeout (500); a stream on the open one ends at the idle timeout (504 "stream timeout")."""
    os.kill(fstack.epp_pid, signal.SIGSTOP)
    outcomes = []
    try:
        with httpx.Client(base_url=fstack.url, timeout=120) as c:
            for _ in range(3):
                t0 = time.monotonic()
                r = c.post("/v1/chat/completions", json=CHAT)
                outcomes.append((r.status_code, round(time.monotonic() - t0, 1)))
    finally:
        os.kill(fstack.epp_pid, signal.SIGCONT)
    assert all(status in (500, 504) and elapsed < ROUTE_TIMEOUT + 15 for status, elapsed in outcomes), outcomes
    deadline = time.monotonic() + 30  # EPP resumes; Envoy reconnects (a request or two may still fail)
    with httpx.Client(base_url=fstack.url, timeout=30) as c:
        while c.post("/v1/chat/completions", json=CHAT).status_code != 200:
            assert time.monotonic() < deadline, "EPP did not route again after SIGCONT"
            time.sleep(0.2)
    ok_through(fstack, 4)
    wait_quiet(fstack.metrics_port)


# -- /metrics that errors, is slow, or is garbage ------------------------------------------------------


@pytest.mark.parametrize("mode", ["error", "slow", "garbage", "empty"])
def test_broken_metrics_pages_do_not_stop_routing(fstack, pods, mode):
    for ep in pods:
        control(ep, metrics=mode, metrics_delay_s=3.0)
    # Give the scraper (50 ms interval, 1 s timeout) time to run into the fault on every pod.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = read_metrics(fstack.metrics_port)
        errors = {lab["endpoint"]: v for lab, v in m.get("epp_endpoint_scrape_error", [])}
        if errors and all(errors.get(ep) == 1 for ep in pods):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"scraper never reported the {mode} metrics pages: {errors}")
    served = ok_through(fstack, 20)
    assert set(served) <= set(pods)
    wait_quiet(fstack.metrics_port)


# -- clients that hang up --------------------------------------------------------------------------------


def test_client_hangs_up_mid_stream(fstack, pods):
    body = {"model": MODEL, "max_tokens": 400, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    for _ in range(3):
        with httpx.Client(base_url=fstack.url, timeout=60) as c, c.stream("POST", "/v1/chat/completions",
                                                                          json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break  # leaving both blocks closes the connection with the response half read
    wait_quiet(fstack.metrics_port)
    ok_through(fstack, 3)


def test_client_hangs_up_while_waiting_for_the_answer(fstack, pods):
    for ep in pods:
        control(ep, delay_ms=3000)  # the pod takes 3 s before it starts
    with httpx.Client(base_url=fstack.url, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json=CHAT)
    wait_quiet(fstack.metrics_port)


def test_client_hangs_up_mid_upload(fstack, pods):
    """Headers and part of the body, then the connection closes: EPP has nothing routed to release."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    for _ in range(3):
        with socket.create_connection((HOST, fstack.envoy_port), timeout=10) as s:
            s.sendall(head + b'{"model": "' + MODEL.encode() + b'", "messages": [' + b" " * 5000)
            time.sleep(0.2)
        with socket.create_connection((HOST, fstack.envoy_port), timeout=10) as s:
            s.sendall(head)  # headers only
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
            time.sleep(0.2)
    wait_quiet(fstack.metrics_port)
    ok_through(fstack, 3)


# -- every pod gone, and back ----------------------------------------------------------------------------


def test_all_endpoints_gone_then_back(fstack, pods):
    write_endpoints(fstack.endpoints_file, [])
    wait_pool(fstack, [])
    with httpx.Client(base_url=fstack.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503
        assert r.headers["x-epp-error-reason"] == "rejected-no-endpoints"
        assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
        err = r.json()["error"]
        assert err["type"] == "service_unavailable" and err["code"] == "rejected-no-endpoints" and err["message"]
        r = c.post("/v1/messages", json={"model": MODEL, "max_tokens": 4,
                                         "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503
        doc = r.json()
        assert doc["type"] == "error" and doc["error"]["type"] == "overloaded_error", doc
        r = c.get("/v1/models")  # header-only requests too
        assert r.status_code == 503 and json.loads(r.text)["error"]["code"] == "rejected-no-endpoints"
    write_endpoints(fstack.endpoints_file, pods)
    wait_pool(fstack, pods)
    assert set(ok_through(fstack, 12)) <= set(pods)
    wait_quiet(fstack.metrics_port)
