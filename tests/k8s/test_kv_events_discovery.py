"""Each Kubernetes endpoint's KV-event publisher: the ``epp.io/kv-events-*`` pod annotations, else the container
port named ``kv-events`` (``kv-replay``), else the producer's ``socketPort`` on the pod's IP; data-parallel ranks
offset by their index, as vLLM binds them. Through the fake API server, the precise producer's subscribers connect
to the discovered addresses and follow annotation and label changes."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from epp.datalayer.k8s import model
from epp.datalayer.k8s.model import PoolSpec, pod_endpoints
from epp.scheduling.config import load_config
from epp.stack.local import free_port_range
from epp_plugins.scorers.precise.producer import PrecisePrefixCacheProducer
from tests.k8s.conftest import eventually
from tests.k8s.fakeapi import inference_pool, pod

POOL_ARGS = ("--pool-name", "pool", "--pool-namespace", "default")
TOKENS = list(range(100, 164))


def with_ports(obj: dict[str, Any], **named: int) -> dict[str, Any]:
    obj["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8000}] + [
        {"name": name.replace("_", "-"), "containerPort": port} for name, port in named.items()]
    return obj


def test_publisher_from_annotation_named_port_or_default() -> None:
    spec = PoolSpec({"app": "vllm"}, (8000, 8001))

    def publishers(p: dict[str, Any]) -> list[tuple[str | None, str | None, int, str]]:
        return [(e.kv_events, e.kv_events_replay, e.rank, e.namespace) for e in pod_endpoints(p, spec)]

    annotated = pod("a", annotations={model.KV_EVENTS_PORT_ANNOTATION: "6000",
                                      model.KV_EVENTS_REPLAY_PORT_ANNOTATION: "6100"}, namespace="llm")
    assert publishers(annotated) == [("tcp://10.0.0.1:6000", "tcp://10.0.0.1:6100", 0, "llm"),
                                     ("tcp://10.0.0.1:6001", "tcp://10.0.0.1:6101", 1, "llm")]
    named = with_ports(pod("b", "fd00::2"), kv_events=7000, kv_replay=7100)
    assert publishers(named)[1] == ("tcp://[fd00::2]:7001", "tcp://[fd00::2]:7101", 1, "default")
    # the annotation wins over the named port; a full address is used as given, its port offset per rank
    both = with_ports(pod("c", annotations={model.KV_EVENTS_ENDPOINT_ANNOTATION: "tcp://relay.llm:5600"}),
                      kv_events=7000)
    assert [e.kv_events for e in pod_endpoints(both, spec)] == ["tcp://relay.llm:5600", "tcp://relay.llm:5601"]
    assert publishers(pod("d"))[0] == (None, None, 0, "default")  # the producer's socketPort applies
    bad = with_ports(pod("e", annotations={model.KV_EVENTS_PORT_ANNOTATION: "http"}), kv_events=7000)
    assert pod_endpoints(bad, spec)[0].kv_events == "tcp://10.0.0.1:7000"  # unusable annotation: logged, skipped


async def test_subscribers_connect_to_the_discovered_publishers(kube, start_discovery) -> None:
    base = free_port_range(8, start=30000)
    kube.apply(inference_pool(ports=[8000, 8001]))
    kube.apply(pod("a", "127.0.0.1", annotations={model.KV_EVENTS_PORT_ANNOTATION: str(base)}))
    kube.apply(with_ports(pod("b", "127.0.0.1"), kv_events=base + 2))
    kube.apply(pod("c", "127.0.0.1"))
    disc = await start_discovery(*POOL_ARGS)
    await eventually(lambda: disc.pool.synced, what="first sync")
    want = {"a-rank-0": base, "a-rank-1": base + 1, "b-rank-0": base + 2, "b-rank-1": base + 3,
            "c-rank-0": base + 4, "c-rank-1": base + 5}

    ctx = zmq.Context()
    pubs: dict[int, Any] = {}
    for port in range(base, base + 8):
        pubs[port] = ctx.socket(zmq.PUB)
        pubs[port].setsockopt(zmq.LINGER, 0)
        pubs[port].bind(f"tcp://127.0.0.1:{port}")
    cfg = None
    try:
        cfg = load_config("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
                          "- type: precise-prefix-cache-producer\n  name: p\n  parameters:\n    kvEventsConfig:\n"
                          "      podDiscoveryConfig:\n"
                          f"        socketPort: {base + 4}\n"
                          "        podLabelSelector: llm-d.ai/role!=prefill\n"
                          "        podNamespace: default\n", disc.pool)
        p = cfg.plugins["p"]
        assert isinstance(p, PrecisePrefixCacheProducer)
        ing = p.ingestor
        await wait(lambda: all(ing.stats.connects[name] for name in want), "every subscriber connected")
        assert {name: st.address for name, st in ing._streams.items()} == {
            name: f"tcp://127.0.0.1:{port}" for name, port in want.items()}
        for name, port in want.items():  # what each publisher sends lands on its own endpoint
            assert await publish_until(pubs[port], lambda n=name: ing.stats.frames[n]), name
        assert sum(ing.stats.frames.values()) >= len(want) and p.index.size() == 4

        # a new annotation: a's subscribers move to the new port (rank 1 at +1)
        kube.apply(pod("a", "127.0.0.1", annotations={model.KV_EVENTS_PORT_ANNOTATION: str(base + 6)}))
        await wait(lambda: ing._streams.get("a-rank-1") is not None
                   and ing._streams["a-rank-1"].address == f"tcp://127.0.0.1:{base + 7}", "re-subscribed")
        before = ing.stats.frames["a-rank-1"]
        assert await publish_until(pubs[base + 7], lambda: ing.stats.frames["a-rank-1"] > before)

        # relabelled out of podLabelSelector: b's subscribers go, its endpoints stay (approximate fallback)
        kube.apply(with_ports(pod("b", "127.0.0.1", labels={"app": "vllm", "llm-d.ai/role": "prefill"}),
                              kv_events=base + 2))
        await wait(lambda: "b-rank-0" not in ing._streams and "b-rank-0" not in p._subscribed, "b unsubscribed")
        assert {"b-rank-0", "b-rank-1"} <= {e.name for e in disc.pool.endpoints}
        assert not p.live(disc.pool.get("b-rank-0"))
    finally:
        if cfg is not None:
            for plugin in cfg.plugins.values():
                plugin.stop()
        for s in pubs.values():
            s.close(linger=0)
        ctx.term()


async def wait(pred: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    await eventually(pred, timeout, what)


async def publish_until(pub: Any, done: Callable[[], object], timeout: float = 10.0) -> bool:
    """Publish a batch until ``done`` (a SUB misses what is published before its subscription reaches the PUB)."""
    batch = msgpack.packb([time.time(), [["BlockStored", [1, 2, 3, 4], None, TOKENS, 16, None, "GPU"]], 0])
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        pub.send_multipart([b"", struct.pack(">Q", seq), batch])
        seq += 1
        for _ in range(10):
            if done():
                return True
            await asyncio.sleep(0.01)
    return False
