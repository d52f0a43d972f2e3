"""Pure functions from Kubernetes objects (JSON dicts) to what EPP needs: pool specs, endpoints,
priorities and rewrite rules. No I/O, so every rule here is unit-testable on plain dicts."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from epp.datalayer.pool import EndpointSpec
from epp.objectives import RewriteRule, RewriteTarget

log = logging.getLogger(__name__)

ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
# A pod's KV-event publisher (precise prefix routing), as kvEventsPort / kvEventsEndpoint in a static endpoints file;
# else a container port named KV_EVENTS_PORT_NAME; else the producer's socketPort. Ports are the rank-0 ones: vLLM
# offsets a data-parallel rank's publisher (and replay socket) by the rank, so endpoint <pod>-rank-<i> gets +i.
KV_EVENTS_PORT_ANNOTATION = "epp.io/kv-events-port"
KV_EVENTS_ENDPOINT_ANNOTATION = "epp.io/kv-events-endpoint"
KV_EVENTS_REPLAY_PORT_ANNOTATION = "epp.io/kv-events-replay-port"
KV_EVENTS_REPLAY_ENDPOINT_ANNOTATION = "epp.io/kv-events-replay-endpoint"
KV_EVENTS_PORT_NAME = "kv-events"
KV_REPLAY_PORT_NAME = "kv-replay"  # container port names are at most 15 characters
POOL_GROUP_V1 = "inference.networking.k8s.io"
POOL_GROUP_V1ALPHA2 = "inference.networking.x-k8s.io"
# InferenceObjective / InferenceModelRewrite: GIE's group (until mid-2026) and llm-d's (after).
OBJECTIVE_GROUPS = ("inference.networking.x-k8s.io", "llm-d.ai")
OBJECTIVE_VERSION = "v1alpha2"

Obj = dict[str, Any]


@dataclass(frozen=True)
class PoolSpec:
    """The parts of an InferencePool that decide the endpoints."""

    selector: dict[str, str] = field(default_factory=dict)
    target_ports: tuple[int, ...] = ()

    @property
    def label_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))


def pool_version(group: str) -> str:
    """``--pool-group`` picks the InferencePool API: GA v1, or the older v1alpha2 of the x-k8s.io group."""
    return "v1alpha2" if group == POOL_GROUP_V1ALPHA2 else "v1"


def parse_pool(obj: Obj) -> PoolSpec:
    """v1: ``selector.matchLabels`` + ``targetPorts[].number``; v1alpha2: ``selector`` map + ``targetPortNumber``."""
    spec = obj.get("spec") or {}
    sel = spec.get("selector") or {}
    labels = sel.get("matchLabels") if isinstance(sel.get("matchLabels"), dict) else sel
    selector = {str(k): str(v) for k, v in (labels or {}).items() if not isinstance(v, dict)}
    if "targetPorts" in spec:
        ports = [p.get("number") for p in spec.get("targetPorts") or [] if isinstance(p, dict)]
    else:
        ports = [spec.get("targetPortNumber")]
    valid = tuple(dict.fromkeys(int(p) for p in ports if isinstance(p, int) and 0 < p < 65536))
    return PoolSpec(selector, valid)


def parse_selector(text: str) -> dict[str, str]:
    """``--endpoint-selector k=v,k2=v2`` (equality only, as GIE's standalone mode)."""
    out: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip().lstrip("=")  # accept k==v too
        if not sep or not key or "!" in key:
            raise ValueError(f"--endpoint-selector: {part!r} is not key=value")
        out[key] = value
    if not out:
        raise ValueError("--endpoint-selector is empty")
    return out


def deployment_name(pod_name: str) -> str | None:
    """``<deployment>-<replicaset hash>-<pod suffix>`` -> ``<deployment>`` (GIE's standalone pool name)."""
    m = re.fullmatch(r"(.+)-[a-z0-9]+-[a-z0-9]+", pod_name)
    return m.group(1) if m else None


def labels_match(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_ready(pod: Obj) -> bool:
    """Ready condition True, not terminating, and an IP to dial."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return False
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def active_ports(pod: Obj, target_ports: tuple[int, ...]) -> set[int]:
    """All target ports, unless the annotation names a subset (present but empty = none)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    text = annotations.get(ACTIVE_PORTS_ANNOTATION)
    if text is None:
        return set(target_ports)
    wanted = set()
    for part in str(text).split(","):
        part = part.strip()
        if part.isdigit():
            wanted.add(int(part))
    return wanted & set(target_ports)


def pod_endpoints(pod: Obj, spec: PoolSpec) -> list[EndpointSpec]:
    """One endpoint per active target port of a ready pod, named ``<pod>-rank-<index in targetPorts>``."""
    meta = pod.get("metadata") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    if not pod_ready(pod) or not labels_match(labels, spec.selector):
        return []
    ip = pod["status"]["podIP"]
    active = active_ports(pod, spec.target_ports)
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    namespace = str(meta.get("namespace") or "")
    events = kv_events_publisher(pod, annotations, KV_EVENTS_PORT_ANNOTATION, KV_EVENTS_ENDPOINT_ANNOTATION,
                                 KV_EVENTS_PORT_NAME)
    replay = kv_events_publisher(pod, annotations, KV_EVENTS_REPLAY_PORT_ANNOTATION,
                                 KV_EVENTS_REPLAY_ENDPOINT_ANNOTATION, KV_REPLAY_PORT_NAME)
    return [EndpointSpec(f"{meta['name']}-rank-{i}", ip, port, labels, kv_events=_rank_address(events, ip, i),
                         kv_events_replay=_rank_address(replay, ip, i), annotations=annotations,
                         namespace=namespace, rank=i)
            for i, port in enumerate(spec.target_ports) if port in active]


_warned: set[tuple[str, str, str]] = set()  # (pod, annotation, value) already logged: resyncs repeat them


def _warn_once(pod: str, key: str, value: str, why: str) -> None:
    if (pod, key, value) not in _warned and len(_warned) < 1000:
        _warned.add((pod, key, value))
        log.warning("pod %s: annotation %s=%r ignored: %s", pod, key, value, why)


def kv_events_publisher(pod: Obj, annotations: dict[str, str], port_key: str, endpoint_key: str,
                        port_name: str) -> int | str | None:
    """A pod's rank-0 publisher: a full ZMQ address (annotation), or a port on the pod's IP (annotation, else the
    container port named ``port_name``); None when the pod names none (the producer's default applies)."""
    name = str((pod.get("metadata") or {}).get("name"))
    address = annotations.get(endpoint_key, "").strip()
    if address:
        if re.fullmatch(r"(tcp|ipc|inproc)://\S+", address):
            return address
        _warn_once(name, endpoint_key, address, "expected a ZMQ address such as tcp://10.0.0.1:5557")
    text = annotations.get(port_key, "").strip()
    if text:
        if text.isdigit() and 0 < int(text) < 65536:
            return int(text)
        _warn_once(name, port_key, text, "expected a port number")
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            number = p.get("containerPort")
            if p.get("name") == port_name and isinstance(number, int) and 0 < number < 65536:
                return number
    return None


def _rank_address(publisher: int | str | None, ip: str, rank: int) -> str | None:
    """Rank ``rank``'s address: the rank-0 port (or a tcp address's port) plus the rank, as vLLM binds them."""
    if publisher is None:
        return None
    if isinstance(publisher, int):
        host = f"[{ip}]" if ":" in ip else ip
        return f"tcp://{host}:{publisher + rank}"
    m = re.fullmatch(r"(tcp://.+):(\d+)", publisher)
    if rank and m and int(m.group(2)) + rank < 65536:
        return f"{m.group(1)}:{int(m.group(2)) + rank}"
    return publisher


def endpoint_specs(pods: list[Obj], spec: PoolSpec) -> list[EndpointSpec]:
    out: list[EndpointSpec] = []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        out.extend(pod_endpoints(pod, spec))
    return out


def refers_to_pool(obj: Obj, pool_name: str, pool_group: str) -> bool:
    """``spec.poolRef`` names our pool (group defaults to inference.networking.k8s.io, as the CRD's default)."""
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return False
    ref = (obj.get("spec") or {}).get("poolRef") or {}
    return (ref.get("name") == pool_name and (ref.get("group") or POOL_GROUP_V1) == pool_group
            and (ref.get("kind") or "InferencePool") == "InferencePool")


def created_at(obj: Obj) -> float:
    text = (obj.get("metadata") or {}).get("creationTimestamp")
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def priorities(objectives: list[Obj]) -> dict[str, int]:
    """Objective name -> ``spec.priority`` (unset = 0). Same name in two groups: the older object wins."""
    out: dict[str, int] = {}
    for obj in sorted(objectives, key=lambda o: (created_at(o), o["metadata"]["name"])):
        name = obj["metadata"]["name"]
        if name in out:
            continue
        value = (obj.get("spec") or {}).get("priority")
        out[name] = int(value) if isinstance(value, int) and not isinstance(value, bool) else 0
    return out


def rewrite_rules(rewrites: list[Obj]) -> list[RewriteRule]:
    """Every rule of every InferenceModelRewrite, in object order; ``Objectives.set_rules`` sorts them
    stably into GIE's precedence (exact before match-all, then oldest object, then rule order)."""
    rules: list[RewriteRule] = []
    for obj in rewrites:
        name = obj["metadata"]["name"]
        created = created_at(obj)
        for i, rule in enumerate((obj.get("spec") or {}).get("rules") or []):
            matches = rule.get("matches") or []
            models = frozenset(m["model"]["value"] for m in matches
                               if isinstance(m.get("model"), dict) and m["model"].get("value")
                               and (m["model"].get("type") or "Exact") == "Exact")
            if matches and not models:
                log.warning("InferenceModelRewrite %s rule %d: no usable Exact model match, rule ignored", name, i)
                continue  # never let an unreadable match widen into match-all
            targets = tuple(RewriteTarget(str(t["modelRewrite"]), int(t.get("weight") or 1))
                            for t in rule.get("targets") or [] if t.get("modelRewrite"))
            if not targets:
                continue
            rules.append(RewriteRule(name, models, targets, created))
    return rules
