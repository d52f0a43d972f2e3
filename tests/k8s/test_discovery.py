"""InferencePool + pod discovery through the real kubernetes-asyncio client against the fake API server."""

from __future__ import annotations

import logging

import pytest

from epp.admission.accelerator import BUDGET_LABEL, GROUP_LABEL, MEMORY_LABEL, budget, group, memory
from epp.cli import parse_args
from epp.datalayer.k8s import KubernetesDiscovery
from epp.datalayer.pool import EndpointPool
from epp.datalayer.static import DiscoveryError
from epp.objectives import Objectives
from tests.k8s.conftest import FAST, eventually
from tests.k8s.fakeapi import FakeKube, inference_pool, pod

POOL_ARGS = ("--pool-name", "pool", "--pool-namespace", "default")
PODS = ("", "v1", "pods")
POOLS = ("inference.networking.k8s.io", "v1", "inferencepools")


def view(disc: KubernetesDiscovery) -> dict[str, str]:
    return {e.name: e.hostport for e in disc.pool.endpoints}


async def test_pods_come_and_go(kube, start_discovery):
    kube.apply(inference_pool(ports=[8000, 8001]))
    kube.apply(pod("a", "10.0.0.1"))
    kube.apply(pod("b", "10.0.0.2", ready=False))
    kube.apply(pod("stranger", "10.0.0.9", labels={"app": "other"}))
    disc = await start_discovery(*POOL_ARGS)
    await eventually(lambda: disc.pool.synced, what="first sync")
    assert view(disc) == {"a-rank-0": "10.0.0.1:8000", "a-rank-1": "10.0.0.1:8001"}
    assert disc.pool.name == "default/pool" and disc.is_leader()
    assert disc.pool.get("a-rank-0").labels == {"app": "vllm"}
    # The pods watch asks the server to filter, resumes from the LIST's version and wants bookmarks.
    await eventually(lambda: kube.watch_requests("pods"), what="pods watch")
    watch = kube.watch_requests("pods")[0]
    assert watch["labelSelector"] == "app=vllm" and watch["allowWatchBookmarks"].lower() == "true"
    assert int(watch["resourceVersion"]) >= 104 and int(watch["timeoutSeconds"]) >= FAST.watch_timeout

    a0 = disc.pool.get("a-rank-0")
    a0.inflight_requests = 2
    kube.apply(pod("b", "10.0.0.2"))  # becomes ready
    await eventually(lambda: "b-rank-1" in view(disc), what="b ready")
    assert disc.pool.get("a-rank-0") is a0 and a0.inflight_requests == 2  # untouched endpoints keep their state

    kube.apply(pod("a", "10.0.0.1", ready=False))  # becomes unready: out at once
    await eventually(lambda: "a-rank-0" not in view(disc), what="a unready")
    assert set(view(disc)) == {"b-rank-0", "b-rank-1"}

    kube.apply(pod("b", "10.0.0.2", terminating=True))  # terminating: out, although still Ready
    await eventually(lambda: not view(disc), what="b terminating")
    kube.delete(PODS, "default", "b")
    kube.apply(pod("a", "10.0.0.7"))  # back, with a new IP: a new endpoint object
    await eventually(lambda: view(disc) == {"a-rank-0": "10.0.0.7:8000", "a-rank-1": "10.0.0.7:8001"})
    assert disc.pool.get("a-rank-0") is not a0
    kube.apply(pod("c", "10.0.0.3"))
    kube.delete(PODS, "default", "c")
    kube.send_bookmarks()
    await eventually(lambda: disc.pods.resource_version == str(kube.rv), what="bookmark")
    assert set(view(disc)) == {"a-rank-0", "a-rank-1"}
    assert len(kube.list_requests("pods")) == 1  # all of it over one watch


async def test_active_ports_annotation(kube, start_discovery):
    kube.apply(inference_pool(ports=[8000, 8001, 8002]))
    kube.apply(pod("a", annotations={"inference.networking.k8s.io/active-ports": "8001"}))
    disc = await start_discovery(*POOL_ARGS)
    await eventually(lambda: disc.pool.synced)
    assert view(disc) == {"a-rank-1": "10.0.0.1:8001"}
    kube.apply(pod("a", annotations={"inference.networking.k8s.io/active-ports": "8000,8002"}))
    await eventually(lambda: set(view(disc)) == {"a-rank-0", "a-rank-2"})
    kube.apply(pod("a", annotations={"inference.networking.k8s.io/active-ports": ""}))
    await eventually(lambda: not view(disc))
    kube.apply(pod("a"))  # annotation removed: every target port
    await eventually(lambda: set(view(disc)) == {"a-rank-0", "a-rank-1", "a-rank-2"})


async def test_pod_annotations_reach_the_endpoints_accelerator_budget(kube, start_discovery):
    budget_of = {MEMORY_LABEL: "40", BUDGET_LABEL: "80", GROUP_LABEL: "node-1"}
    kube.apply(inference_pool())
    kube.apply(pod("a", annotations=budget_of))
    disc = await start_discovery(*POOL_ARGS)
    await eventually(lambda: disc.pool.synced)
    a0 = disc.pool.get("a-rank-0")
    assert a0.annotations == budget_of and a0.labels == {"app": "vllm"}
    assert (group(a0), memory(a0), budget([a0], 0.0)) == ("node-1", 40.0, 80.0)
    kube.apply(pod("a", annotations={MEMORY_LABEL: "20"}))  # edited in place: the same endpoint, new values
    await eventually(lambda: a0.annotations == {MEMORY_LABEL: "20"}, what="annotation update")
    assert disc.pool.get("a-rank-0") is a0 and (group(a0), memory(a0)) == ("10.0.0.1", 20.0)


async def test_pool_selector_and_target_ports_changes(kube, start_discovery):
    kube.apply(inference_pool(ports=[8000, 8001]))
    kube.apply(pod("old", "10.0.0.1"))
    kube.apply(pod("both", "10.0.0.2", labels={"app": "vllm", "pool": "blue"}))
    kube.apply(pod("new", "10.0.0.3", labels={"pool": "blue"}))
    disc = await start_discovery(*POOL_ARGS)
    await eventually(lambda: disc.pool.synced)
    assert set(view(disc)) == {"old-rank-0", "old-rank-1", "both-rank-0", "both-rank-1"}
    both = disc.pool.get("both-rank-0")

    kube.apply(inference_pool(selector={"pool": "blue"}, ports=[8000, 8001]))
    await eventually(lambda: set(view(disc)) == {"both-rank-0", "both-rank-1", "new-rank-0", "new-rank-1"},
                     what="selector resync")
    assert disc.pool.get("both-rank-0") is both
    await eventually(lambda: [w["labelSelector"] for w in kube.watch_requests("pods")][-1:] == ["pool=blue"],
                     what="new watch")
    assert kube.list_requests("pods")[-1]["labelSelector"] == "pool=blue"
    kube.apply(pod("old", "10.0.0.1", labels={"app": "vllm", "pool": "blue"}))  # relabelled into the pool
    await eventually(lambda: "old-rank-0" in view(disc), what="relabelled pod joins")

    kube.apply(inference_pool(selector={"pool": "blue"}, ports=[8000]))  # orphan ranks go
    await eventually(lambda: set(view(disc)) == {"both-rank-0", "new-rank-0", "old-rank-0"}, what="ports shrink")
    assert disc.pool.get("both-rank-0") is both
    kube.apply(inference_pool(selector={"pool": "blue"}, ports=[9000, 8000]))  # rank 0 now means 9000
    await eventually(lambda: view(disc).get("both-rank-0") == "10.0.0.2:9000", what="ports reordered")
    assert disc.pool.get("both-rank-1").port == 8000


async def test_watch_drops_and_resumes_without_relist(kube, start_discovery):
    kube.apply(inference_pool())
    kube.apply(pod("a"))
    disc = await start_discovery(*POOL_ARGS)
    await eventually(lambda: disc.pool.synced)
    await eventually(lambda: any(w.res == PODS for w in kube.watches), what="pods watch open")
    rv_before = disc.pods.resource_version
    assert kube.drop_watches() >= 2
    kube.apply(pod("b", "10.0.0.2"))  # happens while nobody watches
    await eventually(lambda: "b-rank-0" in view(disc), what="event missed during the drop")
    resumed = kube.watch_requests("pods")[-1]
    assert resumed["resourceVersion"] == rv_before  # resumed where it stopped: history replayed
    assert len(kube.list_requests("pods")) == 1

    await eventually(lambda: any(w.res == PODS for w in kube.watches), what="pods watch reopened")
    kube.end_watches()  # a clean end, as at the server's timeoutSeconds: resume at once
    await eventually(lambda: len(kube.watch_requests("pods")) >= 3, what="watch resumed after its end")
    kube.delete(PODS, "default", "a")
    await eventually(lambda: set(view(disc)) == {"b-rank-0"})
    assert len(kube.list_requests("pods")) == 1


@pytest.mark.parametrize("gone_as_http", [False, True])
async def test_410_gone_relists(kube, start_discovery, gone_as_http):
    kube.gone_as_http = gone_as_http
    kube.apply(inference_pool())
    kube.apply(pod("a"))
    disc = await start_discovery(*POOL_ARGS)
    await eventually(lambda: disc.pool.synced)
    await eventually(lambda: kube.watch_requests("pods"))
    kube.compact()  # history forgotten ...
    kube.drop_watches()  # ... so the resume from our old resourceVersion gets 410
    kube.apply(pod("b", "10.0.0.2"))
    kube.compact()
    await eventually(lambda: len(kube.list_requests("pods")) == 2, what="relist after 410")
    await eventually(lambda: set(view(disc)) == {"a-rank-0", "b-rank-0"})

    await eventually(lambda: any(w.res == PODS for w in kube.watches), what="watch reopened")
    kube.expire_watches(PODS)  # an ERROR 410 event inside an open stream: relist as well
    kube.apply(pod("a", ready=False))
    await eventually(lambda: len(kube.list_requests("pods")) == 3, what="relist after ERROR event")
    await eventually(lambda: set(view(disc)) == {"b-rank-0"})


async def test_pool_created_late_and_deleted(kube, start_discovery):
    kube.apply(pod("a"))
    disc = await start_discovery(*POOL_ARGS)
    await eventually(lambda: kube.watch_requests("inferencepools"))
    assert not disc.pool.synced  # no InferencePool yet: not ready
    assert kube.list_requests("inferencepools")[0]["fieldSelector"] == "metadata.name=pool"
    kube.apply(inference_pool())
    await eventually(lambda: disc.pool.synced and set(view(disc)) == {"a-rank-0"})
    kube.delete(POOLS, "default", "pool")
    await eventually(lambda: not disc.pool.synced and not view(disc), what="pool deleted")
    kube.apply(inference_pool(ports=[8100]))
    await eventually(lambda: disc.pool.synced and view(disc) == {"a-rank-0": "10.0.0.1:8100"})


async def test_v1alpha2_pool_group(kube, start_discovery):
    kube.install_crd("inference.networking.x-k8s.io", "v1alpha2", "inferencepools", "InferencePool")
    kube.apply({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferencePool",
                "metadata": {"name": "pool"}, "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000}})
    kube.apply(pod("a"))
    # x-k8s.io pools are served from the same plural; register the kind mapping for the fake's builder.
    disc = await start_discovery(*POOL_ARGS, "--pool-group", "inference.networking.x-k8s.io")
    await eventually(lambda: disc.pool.synced and set(view(disc)) == {"a-rank-0"})


async def test_standalone_selector_mode(kube, start_discovery, env):
    env.setenv("POD_NAME", "my-epp-7c9d8f6b5-q2w3e")
    env.setenv("NAMESPACE", "default")
    kube.apply(pod("a", labels={"app": "vllm", "role": "decode"}))
    kube.apply(pod("b", labels={"app": "vllm", "role": "prefill"}))
    disc = await start_discovery("--endpoint-selector", "app=vllm,role=decode", "--endpoint-target-ports", "8000")
    await eventually(lambda: disc.pool.synced)
    assert set(view(disc)) == {"a-rank-0"} and disc.pool.name == "default/my-epp"
    assert not any(r["plural"] != "pods" for r in kube.requests)  # no CRDs in standalone mode
    kube.apply(pod("b", labels={"app": "vllm", "role": "decode"}))
    await eventually(lambda: set(view(disc)) == {"a-rank-0", "b-rank-0"})


async def test_missing_crds_are_not_errors(tmp_path, env, caplog):
    kube = await FakeKube(crds={POOLS: "InferencePool"}).start()  # objectives/rewrites CRDs not installed
    env.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kc")))
    disc = KubernetesDiscovery(parse_args(list(POOL_ARGS)), EndpointPool(), Objectives(), FAST)
    caplog.set_level(logging.INFO, "epp.datalayer.k8s")
    try:
        kube.apply(inference_pool())
        kube.apply(pod("a"))
        await disc.start()
        await eventually(lambda: disc.pool.synced)
        await eventually(lambda: len(kube.list_requests("inferenceobjectives")) >= 6, what="CRD retries")
        missing = [r for r in caplog.records if "not installed" in r.getMessage()]
        assert len(missing) == 4  # once per (kind, group), not once per retry
        assert all(r.levelno == logging.INFO for r in missing)
    finally:
        await disc.stop()
        await kube.stop()


async def test_credentials_required(env):
    disc = KubernetesDiscovery(parse_args(list(POOL_ARGS)), EndpointPool(), Objectives(), FAST)
    with pytest.raises(DiscoveryError, match="credentials"):
        await disc.start()
    with pytest.raises(SystemExit):
        parse_args(["--endpoint-selector", "app=x"])  # target ports are required in standalone mode


async def test_wrong_token_never_syncs(kube, start_discovery):
    kube.token = "rotated"
    disc = await start_discovery(*POOL_ARGS)
    await eventually(lambda: len(kube.list_requests("inferencepools")) >= 3, what="retries")
    assert not disc.pool.synced


def test_make_discovery_picks_kubernetes(env):
    from epp.datalayer.discovery import make_discovery

    for argv in (list(POOL_ARGS), ["--endpoint-selector", "app=x", "--endpoint-target-ports", "8000"]):
        disc = make_discovery(parse_args(argv), EndpointPool(), Objectives())
        assert isinstance(disc, KubernetesDiscovery) and disc.is_leader()


async def test_list_pages_through_continue_tokens(kube):
    import functools

    from kubernetes_asyncio import client

    from epp.datalayer.k8s import load_api_client
    from epp.datalayer.k8s.reflector import Reflector

    for i in range(5):
        kube.apply(pod(f"p{i}", f"10.0.0.{i + 1}"))
    api = await load_api_client()
    changes = []
    r = Reflector("pods", functools.partial(client.CoreV1Api(api).list_namespaced_pod, "default"),
                  lambda: changes.append(len(r.items)), FAST, label_selector="app=vllm", page_size=2)
    try:
        r.start()
        await eventually(lambda: r.synced)
        assert len(r.items) == 5 and changes[0] == 5  # one change for the whole (three-page) LIST
        assert len(kube.list_requests("pods")) == 3
    finally:
        await r.stop()
        await api.close()
