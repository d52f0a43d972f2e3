"""Fixtures: a fake API server on loopback, a kubeconfig pointing at it, and discoveries to start."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from epp.cli import parse_args
from epp.datalayer.k8s import KubernetesDiscovery, Timings
from epp.datalayer.pool import EndpointPool
from epp.objectives import Objectives
from tests.k8s.fakeapi import FakeKube

FAST = Timings(watch_timeout=30, connect_timeout=2, backoff_initial=0.02, backoff_max=0.2, absent_retry=0.2,
               lease_duration=1.0, renew_deadline=0.7, retry_period=0.1)


async def eventually(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def env(tmp_path, monkeypatch):
    for var in ("KUBERNETES_SERVICE_HOST", "NAMESPACE", "POD_NAME", "KUBECONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # never read a developer's ~/.kube/config
    return monkeypatch


@pytest.fixture
async def kube(tmp_path, env) -> AsyncIterator[FakeKube]:
    server = await FakeKube().start()
    env.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    yield server
    await server.stop()


MakeDiscovery = Callable[..., Awaitable[KubernetesDiscovery]]


@pytest.fixture
async def start_discovery(kube) -> AsyncIterator[MakeDiscovery]:
    started: list[KubernetesDiscovery] = []

    async def make(*argv: str, objectives: Objectives | None = None, pool: EndpointPool | None = None,
                   timings: Timings = FAST) -> KubernetesDiscovery:
        cfg = parse_args(list(argv))
        disc = KubernetesDiscovery(cfg, pool or EndpointPool(), objectives or Objectives(), timings)
        await disc.start()
        started.append(disc)
        return disc

    yield make
    for disc in started:
        await disc.stop()
