"""A small Kubernetes API server for tests: real HTTP, real list/watch wire protocol, in memory.

What it speaks (what kubernetes-asyncio and our reflector rely on):

* ``GET /api/v1/namespaces/{ns}/{plural}`` and ``/apis/{group}/{version}/namespaces/{ns}/{plural}``: a JSON
  List with ``metadata.resourceVersion``; ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``),
  ``fieldSelector`` (``metadata.name``, ``metadata.namespace``), ``limit`` / ``continue`` paging.
* ``?watch=1``: a chunked stream of newline-delimited events ``ADDED`` / ``MODIFIED`` / ``DELETED`` /
  ``BOOKMARK`` / ``ERROR`` after ``resourceVersion`` (replayed from history), ``timeoutSeconds``, bookmarks
  when ``allowWatchBookmarks``; an object that stops (starts) matching a label selector is sent as
  ``DELETED`` (``ADDED``), as the real server does. A resourceVersion older than the compacted history is
  answered with an ``ERROR`` event holding a 410 ``Status`` (or HTTP 410 when ``gone_as_http``).
* Single objects: ``GET`` / ``POST`` / ``PUT`` (optimistic concurrency on ``metadata.resourceVersion``,
  409 on conflict) / ``DELETE``, enough for Leases.
* A resource whose CRD is not installed answers 404; requests without the bearer token answer 401.

Test controls: ``apply`` / ``delete`` objects, ``drop_watches`` (connections cut mid-stream),
``end_watches`` (clean end, like the server's timeout), ``compact`` (forget history: resumes get 410),
``expire_watches`` (an ERROR 410 inside open streams), ``send_bookmarks``. ``requests`` logs every call.

``FakeKube`` runs on the caller's event loop (``await start()``); ``ThreadedFakeKube`` runs one in a thread
for tests whose other parts block (subprocesses, Envoy), with ``call(fn, ...)`` to act on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

Obj = dict[str, Any]
ResKey = tuple[str, str, str]  # (group, version, plural); group "" = core

BUILTIN = {("", "v1", "pods"): "Pod", ("coordination.k8s.io", "v1", "leases"): "Lease"}
INFERENCE_CRDS = {
    ("inference.networking.k8s.io", "v1", "inferencepools"): "InferencePool",
    ("inference.networking.x-k8s.io", "v1alpha2", "inferenceobjectives"): "InferenceObjective",
    ("inference.networking.x-k8s.io", "v1alpha2", "inferencemodelrewrites"): "InferenceModelRewrite",
    ("llm-d.ai", "v1alpha2", "inferenceobjectives"): "InferenceObjective",
    ("llm-d.ai", "v1alpha2", "inferencemodelrewrites"): "InferenceModelRewrite",
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def parse_label_selector(text: str) -> list[tuple[str, str, str | None]]:
    """-> [(op, key, value)] with op in =, !=, exists, !exists."""
    out: list[tuple[str, str, str | None]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "!=" in part:
            k, v = part.split("!=", 1)
            out.append(("!=", k.strip(), v.strip()))
        elif "=" in part:
            k, v = part.split("=", 1)
            out.append(("=", k.strip(), v.strip().lstrip("=")))
        elif part.startswith("!"):
            out.append(("!exists", part[1:].strip(), None))
        else:
            out.append(("exists", part, None))
    return out


def labels_match(obj: Obj | None, selector: list[tuple[str, str, str | None]]) -> bool:
    if obj is None:
        return False
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for op, k, v in selector:
        if (op == "=" and labels.get(k) != v) or (op == "!=" and labels.get(k) == v) \
                or (op == "exists" and k not in labels) or (op == "!exists" and k in labels):
            return False
    return True


def fields_match(obj: Obj | None, text: str) -> bool:
    if obj is None:
        return False
    meta = obj.get("metadata") or {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        neg = "!=" in part
        k, v = part.split("!=" if neg else "=", 1)
        have = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}.get(k.strip())
        if (have == v.strip().lstrip("=")) == neg:
            return False
    return True


@dataclass
class _Watch:
    res: ResKey
    namespace: str
    labels: list[tuple[str, str, str | None]]
    fields: str
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)
    request: web.Request | None = None

    def visible(self, obj: Obj | None) -> bool:
        return obj is not None and labels_match(obj, self.labels) and (
            not self.fields or fields_match(obj, self.fields))

    def translate(self, kind: str, obj: Obj, old: Obj | None) -> Obj | None:
        """The event this watcher sees, given its selectors (None = nothing)."""
        if (obj.get("metadata") or {}).get("namespace") != self.namespace:
            return None
        now, before = self.visible(obj), self.visible(old)
        if kind == "ADDED":
            return {"type": "ADDED", "object": obj} if now else None
        if kind == "DELETED":
            return {"type": "DELETED", "object": obj} if before or now else None
        if now and before:
            return {"type": "MODIFIED", "object": obj}
        if now:
            return {"type": "ADDED", "object": obj}
        if before:
            return {"type": "DELETED", "object": obj}
        return None


class FakeKube:
    def __init__(self, token: str = "fake-token", crds: dict[ResKey, str] | None = None,
                 bookmark_interval: float = 0.0, gone_as_http: bool = False) -> None:
        self.token = token
        self.kinds: dict[ResKey, str] = {**BUILTIN, **(INFERENCE_CRDS if crds is None else crds)}
        self.bookmark_interval = bookmark_interval  # 0 = only when send_bookmarks() is called
        self.gone_as_http = gone_as_http
        self.rv = 100
        self.objects: dict[ResKey, dict[tuple[str, str], Obj]] = {}
        self.history: dict[ResKey, list[tuple[int, str, Obj, Obj | None]]] = {}
        self.compacted: dict[ResKey, int] = {}
        self.watches: list[_Watch] = []
        self.requests: list[dict[str, Any]] = []
        self._pages: dict[str, list[Obj]] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeKube:
        app = web.Application()
        app.router.add_route("*", "/api/{version}/namespaces/{ns}/{plural}", self._collection)
        app.router.add_route("*", "/api/{version}/namespaces/{ns}/{plural}/{name}", self._single)
        app.router.add_route("*", "/apis/{group}/{version}/namespaces/{ns}/{plural}", self._collection)
        app.router.add_route("*", "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}", self._single)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self.end_watches()
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self) -> Obj:
        return {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "tester", "user": {"token": self.token}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester",
                                                          "namespace": "default"}}]}

    def write_kubeconfig(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.kubeconfig()))
        return path

    # -- test controls (call on the server's loop) -----------------------------------------------

    def install_crd(self, group: str, version: str, plural: str, kind: str) -> None:
        self.kinds[(group, version, plural)] = kind

    def uninstall_crd(self, group: str, version: str, plural: str) -> None:
        self.kinds.pop((group, version, plural), None)
        self.objects.pop((group, version, plural), None)
        for w in [w for w in self.watches if w.res == (group, version, plural)]:
            w.queue.put_nowait(None)

    @staticmethod
    def res_of(obj: Obj) -> ResKey:
        api_version = obj["apiVersion"]
        group, _, version = api_version.rpartition("/")
        plural = {"Pod": "pods", "Lease": "leases", "InferencePool": "inferencepools",
                  "InferenceObjective": "inferenceobjectives",
                  "InferenceModelRewrite": "inferencemodelrewrites"}[obj["kind"]]
        return group, version, plural

    def get(self, res: ResKey, namespace: str, name: str) -> Obj | None:
        found = self.objects.get(res, {}).get((namespace, name))
        return copy.deepcopy(found) if found else None

    def apply(self, obj: Obj) -> Obj:
        """Create or replace (no conflict check): what a controller's update would do."""
        obj = copy.deepcopy(obj)
        res = self.res_of(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (meta["namespace"], meta["name"])
        old = self.objects.setdefault(res, {}).get(key)
        return self._store(res, key, obj, old)

    def delete(self, res: ResKey, namespace: str, name: str) -> Obj | None:
        old = self.objects.get(res, {}).pop((namespace, name), None)
        if old is None:
            return None
        self.rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._record(res, "DELETED", gone, old)
        return gone

    def drop_watches(self) -> int:
        """Cut every open watch connection mid-stream (no terminating chunk)."""
        n = 0
        for w in list(self.watches):
            if w.request is not None and w.request.transport is not None:
                w.request.transport.abort()
                w.queue.put_nowait(None)
                n += 1
        return n

    def end_watches(self) -> None:
        """End every open watch cleanly, as the server does when timeoutSeconds is reached."""
        for w in list(self.watches):
            w.queue.put_nowait(None)

    def compact(self, res: ResKey | None = None) -> None:
        """Forget the event history: resuming a watch from any older resourceVersion gives 410 Gone."""
        for r in [res] if res else list(self.kinds):
            self.history[r] = []
            self.compacted[r] = self.rv

    def expire_watches(self, res: ResKey | None = None) -> None:
        """Send an ERROR event with a 410 Status into open watches, then end them."""
        for w in list(self.watches):
            if res is None or w.res == res:
                w.queue.put_nowait({"type": "ERROR", "object": _status(
                    410, "Expired", f"too old resource version: {self.rv - 1} ({self.rv})")})
                w.queue.put_nowait(None)

    def send_bookmarks(self) -> None:
        for w in self.watches:
            w.queue.put_nowait(self._bookmark(w.res))

    def watch_requests(self, plural: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["plural"] == plural and r["watch"]]

    def list_requests(self, plural: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["plural"] == plural and not r["watch"] and r["method"] == "GET"
                and not r["name"]]

    # -- storage ---------------------------------------------------------------------------------

    def _store(self, res: ResKey, key: tuple[str, str], obj: Obj, old: Obj | None) -> Obj:
        self.rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self.rv)
        if old is None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta.setdefault("generation", 1)
        else:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            meta["generation"] = old["metadata"].get("generation", 1) + (old.get("spec") != obj.get("spec"))
        self.objects.setdefault(res, {})[key] = obj
        self._record(res, "MODIFIED" if old else "ADDED", obj, old)
        return copy.deepcopy(obj)

    def _record(self, res: ResKey, kind: str, obj: Obj, old: Obj | None) -> None:
        obj = copy.deepcopy(obj)
        self.history.setdefault(res, []).append((self.rv, kind, obj, old))
        for w in self.watches:
            if w.res == res:
                ev = w.translate(kind, obj, old)
                if ev:
                    w.queue.put_nowait(ev)

    def _bookmark(self, res: ResKey) -> Obj:
        group, version, _ = res
        return {"type": "BOOKMARK", "object": {"kind": self.kinds.get(res, "Unknown"),
                                               "apiVersion": f"{group}/{version}" if group else version,
                                               "metadata": {"resourceVersion": str(self.rv)}}}

    # -- HTTP ------------------------------------------------------------------------------------

    def _res(self, request: web.Request) -> ResKey:
        m = request.match_info
        return m.get("group", ""), m["version"], m["plural"]

    def _log(self, request: web.Request, res: ResKey, watch: bool) -> None:
        q = request.query
        self.requests.append({"method": request.method, "group": res[0], "version": res[1], "plural": res[2],
                              "namespace": request.match_info["ns"], "name": request.match_info.get("name"),
                              "watch": watch, "resourceVersion": q.get("resourceVersion"),
                              "labelSelector": q.get("labelSelector"), "fieldSelector": q.get("fieldSelector"),
                              "allowWatchBookmarks": q.get("allowWatchBookmarks"),
                              "timeoutSeconds": q.get("timeoutSeconds")})

    def _check(self, request: web.Request, res: ResKey) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if res not in self.kinds:
            return web.json_response(_status(404, "NotFound", "the server could not find the requested resource"),
                                     status=404)
        return None

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        res = self._res(request)
        watch = request.query.get("watch") in ("1", "true", "True")
        self._log(request, res, watch)
        if (err := self._check(request, res)) is not None:
            return err
        ns = request.match_info["ns"]
        if request.method == "POST":
            obj = await request.json()
            obj.setdefault("metadata", {})["namespace"] = ns
            key = (ns, obj["metadata"]["name"])
            if key in self.objects.get(res, {}):
                return web.json_response(_status(409, "AlreadyExists", f"{key[1]} already exists"), status=409)
            return web.json_response(self._store(res, key, obj, None), status=201)
        if request.method != "GET":
            return web.json_response(_status(405, "MethodNotAllowed", request.method), status=405)
        if watch:
            return await self._watch(request, res, ns)
        return self._list(request, res, ns)

    def _list(self, request: web.Request, res: ResKey, ns: str) -> web.Response:
        q = request.query
        cont = q.get("continue")
        if cont:
            if cont not in self._pages:
                return web.json_response(_status(410, "Expired", "continue token expired"), status=410)
            items = self._pages.pop(cont)
        else:
            selector = parse_label_selector(q.get("labelSelector", ""))
            fsel = q.get("fieldSelector", "")
            items = [copy.deepcopy(o) for (ons, _), o in sorted(self.objects.get(res, {}).items())
                     if ons == ns and labels_match(o, selector) and (not fsel or fields_match(o, fsel))]
        meta: Obj = {"resourceVersion": str(self.rv)}
        limit = int(q.get("limit") or 0)
        if limit and len(items) > limit:
            token = uuid.uuid4().hex
            self._pages[token] = items[limit:]
            items = items[:limit]
            meta["continue"] = token
        group, version, _ = res
        return web.json_response({"kind": f"{self.kinds[res]}List",
                                  "apiVersion": f"{group}/{version}" if group else version,
                                  "metadata": meta, "items": items})

    async def _watch(self, request: web.Request, res: ResKey, ns: str) -> web.StreamResponse:
        q = request.query
        w = _Watch(res, ns, parse_label_selector(q.get("labelSelector", "")), q.get("fieldSelector", ""),
                   request=request)
        rv_text = q.get("resourceVersion", "")
        start_rv = int(rv_text) if rv_text.isdigit() else 0
        too_old = start_rv > 0 and start_rv < self.compacted.get(res, 0)
        if too_old and self.gone_as_http:
            return web.json_response(_status(410, "Expired", f"too old resource version: {start_rv}"), status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if too_old:
            await resp.write(json.dumps({"type": "ERROR", "object": _status(
                410, "Expired", f"too old resource version: {start_rv} ({self.compacted[res]})")}).encode() + b"\n")
            await resp.write_eof()
            return resp
        # Replay: the current state for "no RV", else the history after RV. Then live events.
        if start_rv == 0:
            for (ons, _), o in sorted(self.objects.get(res, {}).items()):
                if ons == ns and w.visible(o):
                    w.queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(o)})
        else:
            for rv, kind, obj, old in self.history.get(res, []):
                if rv > start_rv and (ev := w.translate(kind, obj, old)):
                    w.queue.put_nowait(ev)
        self.watches.append(w)
        bookmarks = q.get("allowWatchBookmarks") in ("1", "true", "True")
        timeout = float(q.get("timeoutSeconds") or 1800)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                wait = min(left, self.bookmark_interval) if bookmarks and self.bookmark_interval else left
                try:
                    ev = await asyncio.wait_for(w.queue.get(), wait)
                except TimeoutError:
                    if bookmarks and self.bookmark_interval and deadline > asyncio.get_running_loop().time():
                        ev = self._bookmark(res)
                    else:
                        break
                if ev is None:
                    break
                if ev["type"] == "BOOKMARK" and not bookmarks:
                    continue
                await resp.write(json.dumps(ev).encode() + b"\n")
            with contextlib.suppress(ConnectionError, RuntimeError):
                await resp.write_eof()
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass
        finally:
            self.watches.remove(w)
        return resp

    async def _single(self, request: web.Request) -> web.StreamResponse:
        res = self._res(request)
        self._log(request, res, False)
        if (err := self._check(request, res)) is not None:
            return err
        key = (request.match_info["ns"], request.match_info["name"])
        current = self.objects.get(res, {}).get(key)
        if request.method == "GET":
            if current is None:
                return web.json_response(_status(404, "NotFound", f"{key[1]} not found"), status=404)
            return web.json_response(current)
        if request.method == "PUT":
            obj = await request.json()
            if current is None:
                return web.json_response(_status(404, "NotFound", f"{key[1]} not found"), status=404)
            sent_rv = (obj.get("metadata") or {}).get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                return web.json_response(_status(409, "Conflict", "the object has been modified"), status=409)
            obj.setdefault("metadata", {}).update(namespace=key[0], name=key[1])
            return web.json_response(self._store(res, key, obj, current))
        if request.method == "DELETE":
            gone = self.delete(res, *key)
            if gone is None:
                return web.json_response(_status(404, "NotFound", f"{key[1]} not found"), status=404)
            return web.json_response(gone)
        return web.json_response(_status(405, "MethodNotAllowed", request.method), status=405)


class ThreadedFakeKube:
    """A ``FakeKube`` on its own event loop in a daemon thread (for tests that block their own loop)."""

    def __init__(self, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-kube", daemon=True)
        self._thread.start()
        self.kube: FakeKube = self._run(self._make(kwargs))

    async def _make(self, kwargs: dict[str, Any]) -> FakeKube:
        return await FakeKube(**kwargs).start()

    def _run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop (every FakeKube control must run there)."""
        async def _call() -> Any:
            return fn(*args, **kwargs)
        return self._run(_call())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self.kube.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


# -- object builders shared by the tests -------------------------------------------------------------

def pod(name: str, ip: str = "10.0.0.1", labels: dict[str, str] | None = None, ready: bool = True,
        annotations: dict[str, str] | None = None, terminating: bool = False, namespace: str = "default") -> Obj:
    meta: Obj = {"name": name, "namespace": namespace, "labels": {"app": "vllm"} if labels is None else labels}
    if annotations:
        meta["annotations"] = annotations
    if terminating:
        meta["deletionTimestamp"] = _now()
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def inference_pool(name: str = "pool", selector: dict[str, str] | None = None, ports: list[int] | None = None,
                   namespace: str = "default") -> Obj:
    return {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": selector or {"app": "vllm"}},
                     "targetPorts": [{"number": p} for p in ports or [8000]],
                     "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}}}}


def objective(name: str, priority: int | None, pool: str = "pool", group: str = "inference.networking.x-k8s.io",
              namespace: str = "default") -> Obj:
    spec: Obj = {"poolRef": {"name": pool}}
    if priority is not None:
        spec["priority"] = priority
    return {"apiVersion": f"{group}/v1alpha2", "kind": "InferenceObjective",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def rewrite(name: str, rules: list[Obj], pool: str = "pool", group: str = "inference.networking.x-k8s.io",
            namespace: str = "default") -> Obj:
    return {"apiVersion": f"{group}/v1alpha2", "kind": "InferenceModelRewrite",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"poolRef": {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool},
                     "rules": rules}}
