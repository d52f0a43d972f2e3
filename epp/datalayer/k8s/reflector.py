"""List + watch one Kubernetes collection into a local cache (client-go's Reflector, in small).

The protocol, as the API server speaks it:

* LIST returns the items and the collection's ``metadata.resourceVersion`` (RV): a consistent snapshot.
* WATCH ``?watch=1&resourceVersion=RV&allowWatchBookmarks=true`` streams newline-delimited events
  (ADDED / MODIFIED / DELETED / BOOKMARK / ERROR) that happened after RV. Each event moves our RV on,
  so a watch that ends (server timeout, dropped connection) resumes where it stopped, without a relist.
* An RV the server no longer remembers is answered ``410 Gone`` (as the HTTP status, or as an ERROR
  event carrying a Status object): the cache may have missed events, so we LIST again from scratch.
* ``404`` on the collection means its CRD is not installed; ``403`` that RBAC does not allow it. Both
  are reported through ``on_absent`` and retried slowly, since a CRD may be installed later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from epp.tasks import stop_task

log = logging.getLogger(__name__)

Obj = dict[str, Any]
# Calls one of kubernetes-asyncio's list functions with our query arguments and ``_preload_content=False``.
ListFn = Callable[..., Awaitable[Any]]  # an aiohttp.ClientResponse, given _preload_content=False


@dataclass(frozen=True)
class Timings:
    """Every delay of the Kubernetes data layer; tests shrink them."""

    watch_timeout: float = 300.0  # server-side timeoutSeconds of one watch (jittered up to 2x, as client-go)
    connect_timeout: float = 10.0
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    absent_retry: float = 60.0  # CRD missing or forbidden: look again this often
    lease_duration: float = 15.0  # controller-runtime's leader-election defaults
    renew_deadline: float = 10.0
    retry_period: float = 2.0


class ApiError(Exception):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(f"HTTP {status}: {message}" if message else f"HTTP {status}")
        self.status = status


def obj_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _status_message(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(body).get("message", ""))
    return body[:200].decode(errors="replace")


class Backoff:
    """Exponential with full jitter, so many EPP replicas do not retry in step."""

    def __init__(self, timings: Timings) -> None:
        self.t = timings
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next(self) -> float:
        cap = min(self.t.backoff_max, self.t.backoff_initial * (2 ** self.attempt))
        self.attempt += 1
        return random.uniform(cap / 2, cap)


class Reflector:
    """Keeps ``items`` (key ``namespace/name`` -> object) equal to the server's collection.

    ``on_change`` runs after the first LIST, after every relist and after every event that changed the
    cache; ``synced`` is True from the first completed LIST on (until the collection turns absent).
    """

    def __init__(self, name: str, list_fn: ListFn, on_change: Callable[[], None], timings: Timings,
                 *, label_selector: str | None = None, field_selector: str | None = None,
                 on_absent: Callable[[int], None] | None = None, page_size: int = 500) -> None:
        self.name = name
        self.list_fn = list_fn
        self.on_change = on_change
        self.on_absent = on_absent
        self.timings = timings
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.page_size = page_size
        self.items: dict[str, Obj] = {}
        self.resource_version = ""
        self.synced = False
        self.lists = 0  # counters, for logs and tests
        self.watches = 0
        self._absent_logged: int | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"reflector-{self.name}")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    # -- the loop --------------------------------------------------------------------------------

    def _selectors(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.label_selector:
            kw["label_selector"] = self.label_selector
        if self.field_selector:
            kw["field_selector"] = self.field_selector
        return kw

    async def _run(self) -> None:
        backoff = Backoff(self.timings)
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                    backoff.reset()
                    if self._absent_logged is not None:
                        log.info("%s: available again", self.name)
                        self._absent_logged = None
                started = time.monotonic()
                events = await self._watch()
                if events or time.monotonic() - started > 1.0:
                    backoff.reset()
                    continue  # the server ended the watch (its timeout): resume at once from our RV
                await asyncio.sleep(backoff.next())  # an empty, short watch: do not spin
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                if e.status == 410:
                    log.info("%s: resourceVersion %s expired (410 Gone), listing again", self.name,
                             self.resource_version)
                    need_list = True
                    continue
                if e.status in (403, 404):
                    self._absent(e)
                    need_list = True
                    await asyncio.sleep(self.timings.absent_retry)
                    continue
                log.warning("%s: %s; retrying", self.name, e)
                need_list = True  # a server error inside the stream: the cache may be behind
                await asyncio.sleep(backoff.next())
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
                # Connection refused or dropped mid-stream: resume the watch from our RV (or LIST again
                # when no LIST succeeded yet); the server answers 410 if it forgot that RV.
                log.warning("%s: connection problem (%s: %s); retrying", self.name, type(e).__name__, e)
                await asyncio.sleep(backoff.next())
            except Exception:  # a bug must not end discovery for good: start over from a LIST
                log.exception("%s: unexpected error; listing again", self.name)
                need_list = True
                await asyncio.sleep(backoff.next())

    def _absent(self, e: ApiError) -> None:
        if self._absent_logged != e.status:
            what = "not installed (404)" if e.status == 404 else "forbidden by RBAC (403)"
            log.info("%s: %s; looking again every %.0fs", self.name, what, self.timings.absent_retry)
            self._absent_logged = e.status
        had = bool(self.items) or self.synced
        self.items = {}
        self.synced = False
        self.resource_version = ""
        if self.on_absent:
            self.on_absent(e.status)
        elif had:
            self.on_change()

    async def _list(self) -> None:
        items: dict[str, Obj] = {}
        cont: str | None = None
        rv = ""
        while True:
            kw = self._selectors()
            kw["limit"] = self.page_size
            if cont:
                kw["_continue"] = cont
            resp = await self.list_fn(**kw, _preload_content=False,
                                      _request_timeout=aiohttp.ClientTimeout(total=60))
            try:
                body = await resp.read()
                if resp.status != 200:
                    raise ApiError(resp.status, _status_message(body))
            finally:
                resp.release()
            doc = json.loads(body)
            for obj in doc.get("items") or []:
                items[obj_key(obj)] = obj
            meta = doc.get("metadata") or {}
            rv = str(meta.get("resourceVersion", ""))
            cont = meta.get("continue") or None
            if not cont:
                break
        self.items = items
        self.resource_version = rv
        self.lists += 1
        self.synced = True
        log.debug("%s: listed %d objects at resourceVersion %s", self.name, len(items), rv)
        self.on_change()

    async def _watch(self) -> int:
        """One watch request; returns the number of events applied when the stream ends cleanly."""
        server_timeout = int(self.timings.watch_timeout * random.uniform(1.0, 2.0)) or 1
        timeout = aiohttp.ClientTimeout(connect=self.timings.connect_timeout,
                                        sock_connect=self.timings.connect_timeout,
                                        sock_read=server_timeout + 30)
        resp = await self.list_fn(**self._selectors(), watch=True, allow_watch_bookmarks=True,
                                  resource_version=self.resource_version, timeout_seconds=server_timeout,
                                  _preload_content=False, _request_timeout=timeout)
        self.watches += 1
        applied = 0
        try:
            if resp.status != 200:
                raise ApiError(resp.status, _status_message(await resp.read()))
            while True:
                line = await resp.content.readline()
                if not line:
                    return applied
                if not line.strip():
                    continue
                self._apply(json.loads(line))
                applied += 1
        finally:
            resp.release()

    def _apply(self, event: Obj) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            raise ApiError(int(obj.get("code") or 500), str(obj.get("message", "")))
        rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
        if kind == "BOOKMARK":
            self.resource_version = rv or self.resource_version
            return
        if kind in ("ADDED", "MODIFIED"):
            self.items[obj_key(obj)] = obj
        elif kind == "DELETED":
            self.items.pop(obj_key(obj), None)
        else:
            log.warning("%s: unknown watch event type %r ignored", self.name, kind)
            return
        if rv:
            self.resource_version = rv
        self.on_change()
