"""Leader election over a coordination.k8s.io/v1 Lease: one leader, handover on stop, failover on expiry."""

from __future__ import annotations

import asyncio
import time

from epp.datalayer.k8s import load_api_client
from epp.datalayer.k8s.leader import LeaderElector
from tests.k8s.conftest import FAST, eventually
from tests.k8s.fakeapi import inference_pool, pod

LEASES = ("coordination.k8s.io", "v1", "leases")
LEASE = "epp-default-pool.gateway-api-inference-extension.sigs.k8s.io"
HA_ARGS = ("--pool-name", "pool", "--pool-namespace", "default", "--ha-enable-leader-election")


async def test_one_leader_and_handover_on_stop(kube, start_discovery):
    kube.apply(inference_pool())
    kube.apply(pod("a"))
    first = await start_discovery(*HA_ARGS)
    await eventually(first.is_leader, what="first leads")
    second = await start_discovery(*HA_ARGS)
    await eventually(lambda: second.pool.synced, what="standby synced")  # the standby keeps a warm view ...
    for _ in range(10):  # ... but never leads while the lease is renewed
        assert first.is_leader() and not second.is_leader()
        await asyncio.sleep(FAST.retry_period)
    lease = kube.get(LEASES, "default", LEASE)
    assert lease["spec"]["holderIdentity"] == first.elector.identity
    assert lease["spec"]["leaseDurationSeconds"] == 1

    t0 = time.monotonic()
    await first.stop()  # releases the lease: the standby takes over well before it would expire
    await eventually(second.is_leader, what="handover")
    assert time.monotonic() - t0 < FAST.lease_duration + 0.5
    assert kube.get(LEASES, "default", LEASE)["spec"]["leaseTransitions"] >= 1


async def test_failover_when_the_leader_dies(kube):
    """A leader that vanishes without releasing: the standby waits for the lease to expire, then leads."""
    api_a, api_b = await load_api_client(), await load_api_client()
    a = LeaderElector(api_a, "default", "lease", "a", FAST)
    b = LeaderElector(api_b, "default", "lease", "b", FAST)
    try:
        a.start()
        await eventually(a.is_leader, what="a leads")
        b.start()
        await asyncio.sleep(FAST.lease_duration / 2)
        assert not b.is_leader()
        a._task.cancel()  # crash: no release, no more renewals
        a._leading = False
        died = time.monotonic()
        await eventually(b.is_leader, timeout=FAST.lease_duration * 4, what="b takes over")
        waited = time.monotonic() - died
        assert waited >= FAST.lease_duration * 0.5  # it did wait for the lease to run out
        assert kube.get(LEASES, "default", "lease")["spec"]["holderIdentity"] == "b"
    finally:
        await b.stop()
        await a.stop()
        await api_a.close()
        await api_b.close()


async def test_leader_steps_down_when_the_api_is_gone(kube, start_discovery):
    kube.apply(inference_pool())
    disc = await start_discovery(*HA_ARGS)
    await eventually(disc.is_leader)
    kube.uninstall_crd(*LEASES)  # every lease call now fails
    await eventually(lambda: not disc.is_leader(), timeout=FAST.renew_deadline * 4, what="step down")

