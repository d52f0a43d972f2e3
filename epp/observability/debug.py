"""Debug endpoints on the metrics port: what EPP sees and decides, as JSON and as a live page.

* ``GET /debug/endpoints``: the pool and each endpoint's latest signals (waiting, running, KV-cache
  use, EPP's in-flight counts, metrics age and last scrape error, picks), EPP's state (starting,
  serving, draining), open streams, the configuration in force and what flow control holds.
* ``GET /debug/decisions?limit=N``: the most recent decisions, newest first (a bounded ring buffer;
  explained decisions carry their per-scorer breakdown).
* ``GET /debug`` (and ``/``): a page that shows both, refreshed every second (plain HTML and JS).

No prompt text or header values are exposed; endpoint addresses and model names are. Like
``/metrics``, the port belongs on a network only operators reach; ``--debug-endpoints=false`` turns
these off.
"""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web

from epp.observability.audit import plugin_audits
from epp.observability.page import PAGE

MAX_LIMIT = 256


def _age(a: float) -> float | None:
    return None if math.isinf(a) else round(a, 3)


def endpoints_view(server: Any) -> dict[str, Any]:
    pool = server.pool
    hooks = getattr(server, "hooks", None)
    picks = hooks.decisions.picks if hooks is not None else {}
    metrics = getattr(server, "metrics", None)
    threshold = metrics.runtime.staleness_threshold if metrics is not None else 2.0
    now = time.monotonic()
    eps = []
    for e in pool.endpoints:
        m = e.metrics
        age = m.age(now)
        eps.append({
            "name": e.name, "address": e.hostport, "labels": e.labels,
            "waiting": m.waiting_requests, "running": m.running_requests, "kv_cache": round(m.kv_cache_usage, 4),
            "inflight": e.inflight_requests, "inflight_tokens": e.inflight_tokens,
            "metrics_age_s": _age(age), "stale": age > threshold, "last_error": m.last_error,
            "unreachable": m.unreachable, "sleeping": e.asleep,
            "picks": picks.get(e.name, 0)})
    servicer = getattr(server, "servicer", None)
    reloader = getattr(server, "reloader", None)
    director = getattr(server, "director", None)
    config: dict[str, Any] = {}
    if director is not None:
        profiles = director.config.scheduler.profiles
        config = {"profiles": {name: {"filters": [f.name for f in p.filters],
                                      "scorers": {s.name: w for s, w in p.scorers},
                                      "picker": p.picker.name if p.picker else None}
                               for name, p in profiles.items()}}
    if reloader is not None:
        config.update(reloader.describe())
    health = getattr(server, "health", None)
    return {
        "pool": pool.name, "now": round(time.time(), 3),
        "state": health.state if health is not None else "unknown",
        "streams": servicer.active_streams if servicer is not None else 0,
        "decisions": hooks.decisions.total if hooks is not None else 0,
        "rejected": hooks.decisions.rejected if hooks is not None else 0,
        "config": config, "endpoints": eps,
        "flow_control": director.admission.describe() if director is not None else None,
        # predictions against outcomes (epp.observability.audit), and the learned characters per token
        "predictions": {k: a.summary() for k, a in
                        plugin_audits(director.config if director is not None else None).items()},
        "chars_per_token": pool.tokens.snapshot(),
        # what plugins learned (a plugin offering ``debug_state()``), e.g. predicted-latency-scorer's rates
        "plugins": {name: plugin.debug_state() for name, plugin in
                    list(getattr(director.config if director is not None else None, "plugins", {}).items())
                    if callable(getattr(plugin, "debug_state", None))}}


def decisions_view(server: Any, limit: int = 50) -> dict[str, Any]:
    hooks = getattr(server, "hooks", None)
    if hooks is None:
        return {"total": 0, "rejected": 0, "decisions": []}
    log = hooks.decisions
    return {"total": log.total, "rejected": log.rejected, "size": log.records.maxlen,
            "decisions": log.recent(max(1, min(limit, MAX_LIMIT)))}


def add_debug_routes(app: web.Application, server: Any) -> None:
    async def endpoints(_: web.Request) -> web.Response:
        return web.json_response(endpoints_view(server), headers={"Cache-Control": "no-store"})

    async def decisions(request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be an integer") from None
        return web.json_response(decisions_view(server, limit), headers={"Cache-Control": "no-store"})

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html", headers={"Cache-Control": "no-store"})

    app.router.add_get("/debug/endpoints", endpoints)
    app.router.add_get("/debug/decisions", decisions)
    app.router.add_get("/debug", page)
    app.router.add_get("/", page)
