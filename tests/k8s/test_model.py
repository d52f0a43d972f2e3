"""The pure rules: InferencePool shapes, pod readiness, ranks, active ports, poolRef matching, rewrites."""

from __future__ import annotations

import pytest

from epp.datalayer.k8s import model
from epp.objectives import Objectives
from tests.k8s.fakeapi import inference_pool, objective, pod, rewrite


def test_pool_shapes_v1_and_v1alpha2():
    spec = model.parse_pool(inference_pool(selector={"app": "x"}, ports=[8001, 8000, 8001]))
    assert spec == model.PoolSpec({"app": "x"}, (8001, 8000))  # spec order kept (it decides ranks), deduped
    old = {"spec": {"selector": {"app": "y", "tier": "gpu"}, "targetPortNumber": 8000}}
    assert model.parse_pool(old) == model.PoolSpec({"app": "y", "tier": "gpu"}, (8000,))
    assert model.parse_pool(old).label_selector == "app=y,tier=gpu"
    assert model.pool_version("inference.networking.x-k8s.io") == "v1alpha2"
    assert model.pool_version("inference.networking.k8s.io") == "v1"


def test_ranks_readiness_and_active_ports():
    spec = model.PoolSpec({"app": "vllm"}, (8000, 8001, 8002))
    eps = model.pod_endpoints(pod("p", "10.1.0.5", labels={"app": "vllm", "gpu": "h100"}), spec)
    assert [(e.name, e.address, e.port) for e in eps] == [
        ("p-rank-0", "10.1.0.5", 8000), ("p-rank-1", "10.1.0.5", 8001), ("p-rank-2", "10.1.0.5", 8002)]
    assert eps[0].labels == {"app": "vllm", "gpu": "h100"}
    assert model.pod_endpoints(pod("p", ready=False), spec) == []
    assert model.pod_endpoints(pod("p", terminating=True), spec) == []
    assert model.pod_endpoints(pod("p", labels={"app": "other"}), spec) == []
    no_ip = pod("p")
    del no_ip["status"]["podIP"]
    assert model.pod_endpoints(no_ip, spec) == []
    subset = pod("p", annotations={model.ACTIVE_PORTS_ANNOTATION: "8002, 8000,9999,x"})
    assert [e.name for e in model.pod_endpoints(subset, spec)] == ["p-rank-0", "p-rank-2"]  # ranks stay put
    assert model.pod_endpoints(pod("p", annotations={model.ACTIVE_PORTS_ANNOTATION: ""}), spec) == []


def test_standalone_helpers():
    assert model.parse_selector("app=vllm, tier==gpu") == {"app": "vllm", "tier": "gpu"}
    for bad in ("", "app", "app!=x"):
        with pytest.raises(ValueError):
            model.parse_selector(bad)
    assert model.deployment_name("epp-5d8f7c9b4-x2x9q") == "epp"
    assert model.deployment_name("my-epp-6b7c-abcde") == "my-epp"
    assert model.deployment_name("solo") is None


def test_pool_ref_matching():
    assert model.refers_to_pool(objective("o", 1), "pool", "inference.networking.k8s.io")
    assert not model.refers_to_pool(objective("o", 1, pool="other"), "pool", "inference.networking.k8s.io")
    assert not model.refers_to_pool(objective("o", 1), "pool", "inference.networking.x-k8s.io")
    wrong_kind = objective("o", 1)
    wrong_kind["spec"]["poolRef"]["kind"] = "Service"
    assert not model.refers_to_pool(wrong_kind, "pool", "inference.networking.k8s.io")


def test_priorities_and_rewrite_precedence():
    objs = [objective("a", 10), objective("b", None), objective("c", -1)]
    assert model.priorities(objs) == {"a": 10, "b": 0, "c": -1}
    older = rewrite("older", [{"matches": [{"model": {"value": "m"}}], "targets": [{"modelRewrite": "m-old"}]}])
    older["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    newer = rewrite("newer", [
        {"matches": [{"model": {"type": "Exact", "value": "m"}}], "targets": [{"modelRewrite": "m-new"}]},
        {"targets": [{"modelRewrite": "catch-all"}]},
        {"matches": [{"model": {"type": "Regex", "value": ".*"}}], "targets": [{"modelRewrite": "never"}]}])
    newer["metadata"]["creationTimestamp"] = "2026-02-01T00:00:00Z"
    rules = model.rewrite_rules([newer, older])
    assert len(rules) == 3  # the unreadable match was dropped, not widened into match-all
    store = Objectives()
    store.set_rules(rules)
    assert store.rewrite("m") == ("m-old", "older")  # exact beats match-all; the oldest object wins
    assert store.rewrite("z") == ("catch-all", "newer")
