"""Kubernetes discovery: one InferencePool (or a standalone pod selector), its pods, the
InferenceObjective / InferenceModelRewrite objects that refer to it, and optional leader election.

Satisfies ``epp.datalayer.discovery.Discovery``. ``pool.synced`` turns True only once the pool has
been seen and its pods fully listed; it turns False again if the InferencePool is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from pathlib import Path

from kubernetes_asyncio import client, config
from kubernetes_asyncio.config.config_exception import ConfigException

from epp.config import Config
from epp.datalayer.k8s import model
from epp.datalayer.k8s.leader import LeaderElector
from epp.datalayer.k8s.reflector import Obj, Reflector, Timings
from epp.datalayer.pool import EndpointPool
from epp.datalayer.static import DiscoveryError
from epp.objectives import Objectives

log = logging.getLogger(__name__)


async def load_api_client() -> client.ApiClient:
    """Credentials as controller-runtime finds them: $KUBECONFIG, in-cluster service account, ~/.kube/config."""
    conf = client.Configuration()
    kubeconfig = os.environ.get("KUBECONFIG")
    try:
        if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=conf)
        else:
            path = kubeconfig or str(Path.home() / ".kube" / "config")
            await config.load_kube_config(config_file=path, client_configuration=conf, persist_config=False)
    except (ConfigException, OSError) as e:
        raise DiscoveryError(f"no Kubernetes credentials (in-cluster, $KUBECONFIG or ~/.kube/config): {e}") from e
    return client.ApiClient(conf)


class KubernetesDiscovery:
    def __init__(self, cfg: Config, pool: EndpointPool, objectives: Objectives, timings: Timings | None = None) -> None:
        self.pool = pool
        self.objectives = objectives
        self.timings = timings or Timings()
        self.namespace = cfg.pool_namespace or os.environ.get("NAMESPACE") or "default"
        self.standalone = not cfg.pool_name
        if self.standalone:
            try:
                selector = model.parse_selector(cfg.endpoint_selector)
            except ValueError as e:
                raise DiscoveryError(str(e)) from None
            if not cfg.endpoint_target_ports:
                raise DiscoveryError("--endpoint-selector needs --endpoint-target-ports")
            self.spec: model.PoolSpec | None = model.PoolSpec(selector, tuple(cfg.endpoint_target_ports))
            # GIE names a standalone pool after the EPP's own Deployment.
            self.pool_name = model.deployment_name(os.environ.get("POD_NAME", "")) or "standalone"
        else:
            self.spec = None
            self.pool_name = cfg.pool_name
        self.pool_group = cfg.pool_group
        pool.name = f"{self.namespace}/{self.pool_name}"
        self.leader_election = cfg.ha_enable_leader_election
        self.api: client.ApiClient | None = None
        self.pool_reflector: Reflector | None = None
        self.pods: Reflector | None = None
        self.objective_reflectors: list[Reflector] = []
        self.rewrite_reflectors: list[Reflector] = []
        self.elector: LeaderElector | None = None
        self._retired: set[asyncio.Task[None]] = set()

    # -- Discovery protocol ----------------------------------------------------------------------

    async def start(self) -> None:
        self.api = await load_api_client()
        custom = client.CustomObjectsApi(self.api)
        if self.standalone:
            assert self.spec is not None
            log.info("discovery: pods %s in namespace %s, target ports %s (standalone pool %s)",
                     self.spec.label_selector, self.namespace, list(self.spec.target_ports), self.pool_name)
            self._start_pods(self.spec, seed={})
        else:
            version = model.pool_version(self.pool_group)
            log.info("discovery: InferencePool %s/%s (%s/%s)", self.namespace, self.pool_name, self.pool_group,
                     version)
            self.pool_reflector = Reflector(
                f"inferencepool {self.namespace}/{self.pool_name}",
                functools.partial(custom.list_namespaced_custom_object, self.pool_group, version, self.namespace,
                                  "inferencepools"),
                self._pool_changed, self.timings, field_selector=f"metadata.name={self.pool_name}")
            self.pool_reflector.start()
            for group in model.OBJECTIVE_GROUPS:
                for plural, bucket in (("inferenceobjectives", self.objective_reflectors),
                                       ("inferencemodelrewrites", self.rewrite_reflectors)):
                    r = Reflector(f"{plural}.{group}", functools.partial(
                        custom.list_namespaced_custom_object, group, model.OBJECTIVE_VERSION, self.namespace, plural),
                        self._objectives_changed, self.timings, on_absent=lambda _s: self._objectives_changed())
                    bucket.append(r)
                    r.start()
        if self.leader_election:
            identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4()}"
            lease = f"epp-{self.namespace}-{self.pool_name}.gateway-api-inference-extension.sigs.k8s.io"
            self.elector = LeaderElector(self.api, self.namespace, lease, identity, self.timings)
            self.elector.start()

    async def stop(self) -> None:
        if self.elector:
            await self.elector.stop()  # releases the lease first, so a standby takes over at once
        reflectors = [self.pool_reflector, self.pods, *self.objective_reflectors, *self.rewrite_reflectors]
        for r in reflectors:
            if r:
                await r.stop()
        for task in list(self._retired):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.api:
            await self.api.close()
            self.api = None

    def is_leader(self) -> bool:
        return self.elector.is_leader() if self.elector else True

    # -- pool and pods ---------------------------------------------------------------------------

    def _start_pods(self, spec: model.PoolSpec, seed: dict[str, Obj]) -> None:
        assert self.api is not None
        core = client.CoreV1Api(self.api)
        reflector = Reflector(f"pods {self.namespace} [{spec.label_selector}]",
                              functools.partial(core.list_namespaced_pod, self.namespace),
                              lambda: self._pods_changed(reflector), self.timings,
                              label_selector=spec.label_selector)
        # Until the new LIST completes, the previous pods (filtered by the new selector) stay visible.
        reflector.items = dict(seed)
        self.pods = reflector
        reflector.start()

    def _retire_pods(self) -> dict[str, Obj]:
        old, self.pods = self.pods, None
        if not old:
            return {}
        task = asyncio.create_task(old.stop())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        return old.items

    def _pool_changed(self) -> None:
        assert self.pool_reflector is not None
        obj = next(iter(self.pool_reflector.items.values()), None)
        if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
            if self.spec is not None or self.pool.synced:
                log.warning("InferencePool %s/%s is gone: no endpoints, not ready", self.namespace, self.pool_name)
            elif self.pool_reflector.synced:
                log.info("InferencePool %s/%s does not exist (yet); waiting for it", self.namespace,
                         self.pool_name)
            self.spec = None
            self._retire_pods()
            self.pool.sync([])
            self.pool.synced = False
            return
        spec = model.parse_pool(obj)
        if spec == self.spec:
            return
        old, self.spec = self.spec, spec
        log.info("InferencePool %s/%s: selector %s, target ports %s", self.namespace, self.pool_name,
                 spec.label_selector or "<empty>", list(spec.target_ports))
        if not spec.selector or not spec.target_ports:
            log.error("InferencePool %s/%s has no selector or no valid target ports: no endpoints",
                      self.namespace, self.pool_name)
            self._retire_pods()
            self.pool.sync([])
            return
        if old is None or old.selector != spec.selector or self.pods is None:
            self._start_pods(spec, seed=self._retire_pods())
        self._resync()

    def _pods_changed(self, reflector: Reflector) -> None:
        if reflector is self.pods:  # a retired reflector's late callback changes nothing
            self._resync()

    def _resync(self) -> None:
        if self.spec is None or self.pods is None:
            return
        if not self.pods.synced and not self.pool.synced:
            return  # readiness waits for the first full LIST
        self.pool.sync(model.endpoint_specs(list(self.pods.items.values()), self.spec))

    # -- objectives and rewrites -----------------------------------------------------------------

    def _mine(self, reflectors: list[Reflector]) -> list[Obj]:
        out: list[Obj] = []
        for r in reflectors:
            out.extend(o for o in r.items.values() if model.refers_to_pool(o, self.pool_name, self.pool_group))
        return sorted(out, key=lambda o: (model.created_at(o), o["metadata"]["name"]))

    def _objectives_changed(self) -> None:
        priorities = model.priorities(self._mine(self.objective_reflectors))
        if priorities != self.objectives.priorities:
            log.info("objectives for %s: %s", self.pool.name, priorities or "none")
            self.objectives.priorities = priorities
        rules = model.rewrite_rules(self._mine(self.rewrite_reflectors))
        if sorted(map(repr, rules)) != sorted(map(repr, self.objectives.rules)):
            log.info("model rewrites for %s: %d rule(s)", self.pool.name, len(rules))
        self.objectives.set_rules(rules)
