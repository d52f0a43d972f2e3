"""InferenceObjective / InferenceModelRewrite watchers, and their effect on live routing through the real
request path (ExtProcStream -> Director) while pods change underneath."""

from __future__ import annotations

import json
import time

from prometheus_client import CollectorRegistry

from epp.director import Director
from epp.objectives import Objectives
from epp.observability.metrics import EppMetrics
from epp.scheduling.config import load_config
from tests.extproc_helpers import body_msg, body_of, drive, headers_msg, new_stream, set_headers
from tests.k8s.conftest import eventually
from tests.k8s.fakeapi import inference_pool, objective, pod, rewrite

POOL_ARGS = ("--pool-name", "pool", "--pool-namespace", "default")
OBJ_X = ("inference.networking.x-k8s.io", "v1alpha2", "inferenceobjectives")
RW_LLMD = ("llm-d.ai", "v1alpha2", "inferencemodelrewrites")

# Round robin would hide the effect of a pod leaving; pick by queue so the choice is deterministic.
QUEUE_ONLY = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"""


async def test_objectives_from_both_groups(kube, start_discovery):
    kube.apply(inference_pool())
    kube.apply(objective("critical", 10))
    kube.apply(objective("batch", -5, group="llm-d.ai"))
    kube.apply(objective("default-prio", None))
    kube.apply(objective("elsewhere", 99, pool="another-pool"))
    objectives = Objectives()
    await start_discovery(*POOL_ARGS, objectives=objectives)
    await eventually(lambda: objectives.priorities == {"critical": 10, "batch": -5, "default-prio": 0},
                     what="priorities")
    kube.apply(objective("critical", 20))
    kube.delete(OBJ_X, "default", "default-prio")
    moved = objective("batch", -5, group="llm-d.ai", pool="another-pool")  # re-pointed at another pool
    kube.apply(moved)
    await eventually(lambda: objectives.priorities == {"critical": 20}, what="updates and deletes")
    assert objectives.priority("critical") == 20 and objectives.priority("unknown") == 0


async def test_rewrites_follow_the_objects(kube, start_discovery):
    kube.apply(inference_pool())
    kube.apply(rewrite("canary", [{"matches": [{"model": {"type": "Exact", "value": "chat"}}],
                                   "targets": [{"modelRewrite": "chat-v2", "weight": 1}]}], group="llm-d.ai"))
    objectives = Objectives()
    await start_discovery(*POOL_ARGS, objectives=objectives)
    await eventually(lambda: objectives.rewrite("chat") == ("chat-v2", "canary"), what="rewrite")
    assert objectives.rewrite("other") is None
    kube.delete(RW_LLMD, "default", "canary")
    await eventually(lambda: objectives.rewrite("chat") is None, what="rewrite removed")


async def test_live_routing_follows_pods_objectives_and_rewrites(kube, start_discovery):
    """The real request path: pick, rewrite and priority change as the cluster changes, no restart."""
    kube.apply(inference_pool(ports=[8000]))
    kube.apply(pod("busy", "10.0.0.1"))
    kube.apply(pod("idle", "10.0.0.2"))
    disc = await start_discovery(*POOL_ARGS)
    await eventually(lambda: disc.pool.synced and len(disc.pool.endpoints) == 2)
    registry = CollectorRegistry()
    director = Director(disc.pool, load_config(QUEUE_ONLY, disc.pool), objectives=disc.objectives,
                        metrics=EppMetrics(disc.pool, registry))

    def set_queues() -> None:  # what the scraper would report, freshly
        for ep in disc.pool.endpoints:
            ep.metrics.waiting_requests = 9 if ep.name.startswith("busy") else 0
            ep.metrics.updated_at = time.monotonic()

    async def send(model: str = "chat", objective_name: str | None = None) -> tuple[str, dict]:
        headers = {"content-type": "application/json"}
        if objective_name:
            headers["x-gateway-inference-objective"] = objective_name
        body = json.dumps({"model": model, "prompt": "hello", "max_tokens": 4}).encode()
        out = await drive(new_stream(director, trust_objective_header=True),  # the gateway sets it
                          [headers_msg("/v1/completions", headers), body_msg(body)])
        return set_headers(out[0]).get("x-gateway-destination-endpoint", ""), json.loads(body_of(out))

    set_queues()
    dest, sent = await send()
    assert dest == "10.0.0.2:8000" and sent["model"] == "chat"

    kube.apply(pod("idle", "10.0.0.2", ready=False))  # the best pod turns unready: traffic moves at once
    await eventually(lambda: len(disc.pool.endpoints) == 1, what="idle pod leaves")
    set_queues()
    dest, _ = await send()
    assert dest == "10.0.0.1:8000"

    kube.apply(pod("fresh", "10.0.0.3"))
    kube.apply(rewrite("to-v2", [{"matches": [{"model": {"value": "chat"}}],
                                  "targets": [{"modelRewrite": "chat-v2"}]}]))
    kube.apply(objective("gold", 7))
    await eventually(lambda: len(disc.pool.endpoints) == 2 and disc.objectives.priorities.get("gold") == 7
                     and disc.objectives.rules, what="new pod, rewrite and objective")
    set_queues()
    dest, sent = await send(objective_name="gold")
    assert dest == "10.0.0.3:8000" and sent["model"] == "chat-v2"
    assert registry.get_sample_value("inference_objective_request_total",
                                     {"model_name": "chat", "target_model_name": "chat-v2", "priority": "7"}) == 1
