"""EPP killed (SIGKILL) and restarted under load, through a real Envoy.

Fail-closed (the default: ORIGINAL_DST upstream, failure_mode_allow false): during the outage every new
request gets a clear 5xx at once, none hangs, none is routed anywhere; once EPP is back, picks resume.
Fail-open (override_host upstream, failure_mode_allow true, active health checks on the ext_proc
cluster): once Envoy's health check has marked EPP down, requests keep flowing to the pool round robin;
once EPP is back, picks resume. Every request carries a forged destination header pointing at Envoy's
admin port: no answer may ever come from anything but a pool pod.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from bench.soak import wait_quiet
from epp.stack.local import LocalStack
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS

CLIENT_TIMEOUT = 30.0  # far above anything expected: a request that needs it counts as a hang


@dataclass
class Result:
    started: float
    ended: float
    status: int | None  # None: transport error (e.g. a stream cut when EPP died under it)
    served_by: str
    picked: str
    error: str = ""


class Load:
    """Threads sending requests in a loop until stopped; every request's outcome is kept."""

    def __init__(self, stack: LocalStack, workers: int = 4) -> None:
        self.stack = stack
        self.results: list[Result] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(CLIENT_TIMEOUT + 30)
        assert not any(t.is_alive() for t in self.threads), "a load thread hung"

    def _run(self, i: int) -> None:
        forged = {"x-gateway-destination-endpoint": f"127.0.0.1:{self.stack.admin_port}",
                  "x-gateway-destination-endpoint-subset": "10.9.9.9:80"}
        stream = i == 0  # one worker streams, so some responses are mid-flight through EPP when it dies
        n = 0
        with httpx.Client(base_url=self.stack.url, timeout=CLIENT_TIMEOUT, headers=forged) as c:
            while not self.stop_event.is_set() and n < 100_000:
                n += 1
                body = {"model": MODEL, "max_tokens": 40 if stream else 4, "stream": stream,
                        "messages": [{"role": "user", "content": f"load {i} {n}"}]}
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/chat/completions", json=body)
                    if stream and r.status_code == 200:
                        assert "data: [DONE]" in r.text, "stream cut"
                    self.results.append(Result(t0, time.monotonic(), r.status_code, r.headers.get("x-served-by", ""),
                                               r.headers.get("x-epp-endpoint", ""), r.text[:120]))
                except (httpx.TransportError, AssertionError) as e:
                    self.results.append(Result(t0, time.monotonic(), None, "", "", type(e).__name__))
                    if isinstance(e, httpx.TimeoutException):
                        return

    def between(self, start: float, end: float = float("inf")) -> list[Result]:
        return [r for r in self.results if r.started >= start and r.ended <= end]

    def wait_for(self, n: int, since: float, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.between(since)) < n:
            time.sleep(0.1)


def _common_checks(stack: LocalStack, load: Load) -> None:
    hangs = [r for r in load.results if r.ended - r.started >= CLIENT_TIMEOUT * 0.9]
    assert not hangs, hangs[:3]
    for r in load.results:
        if r.status == 200:
            assert r.served_by in stack.endpoints, r  # never Envoy's admin port, never a forged address


@pytest.fixture(scope="module")
def closed_stack() -> Iterator[LocalStack]:
    with LocalStack(pods=3, sim_args=SIM_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def open_stack() -> Iterator[LocalStack]:
    with LocalStack(pods=3, sim_args=SIM_ARGS, upstream="override_host", failure_mode_allow=True) as s:
        yield s


def test_epp_killed_and_restarted_fail_closed(closed_stack):
    stack = closed_stack
    with Load(stack) as load:
        load.wait_for(20, 0)
        t_kill = time.monotonic()
        stack.kill_epp()
        load.wait_for(20, t_kill + 1.0)
        time.sleep(3)  # Envoy's health check marks EPP down meanwhile; answers must stay clear 5xx
        t_restart = time.monotonic()
        stack.restart_epp()
        t_back = time.monotonic()
        load.wait_for(30, t_back + 1.0)
    _common_checks(stack, load)
    before = load.between(0, t_kill)
    assert before and all(r.status == 200 and r.picked == r.served_by for r in before), before[:3]
    outage = load.between(t_kill + 1.0, t_restart)
    assert len(outage) >= 10, len(outage)
    assert all(r.status in (500, 503) for r in outage), {(r.status, r.error) for r in outage}
    after = load.between(t_back + 1.0)
    assert len(after) >= 20 and all(r.status == 200 and r.picked == r.served_by for r in after), \
        {(r.status, r.error) for r in after}
    wait_quiet(stack.metrics_port)
    _report("fail-closed", load, {"before": before, "outage": outage, "after": after})


def _report(name: str, load: Load, phases: dict[str, list[Result]]) -> None:
    print(f"\n{name}: {len(load.results)} requests;", "; ".join(
        f"{phase}: {dict(Counter(r.status or r.error for r in rs))}" for phase, rs in phases.items()))


def test_epp_killed_and_restarted_fail_open(open_stack):
    stack = open_stack
    with Load(stack) as load:
        load.wait_for(20, 0)
        t_kill = time.monotonic()
        stack.kill_epp()
        assert stack.envoy is not None
        stack.envoy.wait_extproc_unhealthy(30)  # from here, new ext_proc streams fail at once: fail-open
        t_open = time.monotonic()
        load.wait_for(30, t_open)
        t_restart = time.monotonic()
        stack.restart_epp()
        t_back = time.monotonic()
        load.wait_for(30, t_back + 1.0)
    _common_checks(stack, load)
    transition = load.between(t_kill, t_open)
    assert all(r.status in (200, 500, 503) or r.status is None for r in transition), \
        {(r.status, r.error) for r in transition}
    opened = load.between(t_open, t_restart)
    assert len(opened) >= 20, len(opened)
    assert all(r.status == 200 and not r.picked for r in opened), {(r.status, r.picked, r.error) for r in opened}
    assert len({r.served_by for r in opened}) >= 2  # round robin over the pool, not the forged header
    after = load.between(t_back + 1.0)
    assert len(after) >= 20 and all(r.status == 200 and r.picked == r.served_by for r in after), \
        {(r.status, r.error) for r in after}
    wait_quiet(stack.metrics_port)
    _report("fail-open", load, {"transition": transition, "open": opened, "after": after})
