"""Debug endpoints on the metrics port: what EPP sees and decides, as JSON and as a live page.

* ``GET /debug/endpoints``: the pool and each endpoint's latest signals (waiting, running, KV-cache
  use, EPP's in-flight counts, metrics age and last scrape error, picks), EPP's state (starting,
  serving, draining), open streams, the configuration in force and what flow control holds.
* ``GET /debug/decisions?limit=N``: the most recent decisions, newest first (a bounded ring buffer;
  explained decisions carry their per-scorer breakdown).
* ``GET /debug`` (and ``/``): a page that shows both, refreshed every second (plain HTML and JS).

With several pools (``--pools-file``) both cover every pool: each endpoint and decision carries its ``pool``,
``/debug/endpoints`` adds each pool's own view under ``pools``, and ``?pool=<name>`` narrows either to one pool.

No prompt text or header values are exposed; endpoint addresses and model names are. Like
``/metrics``, the port belongs on a network only operators reach; ``--debug-endpoints=false`` turns
these off.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from epp.observability.audit import plugin_audits
from epp.observability.decisions import RECENT
from epp.observability.page import PAGE
from epp.pools import UNKNOWN_POOL

if TYPE_CHECKING:
    from epp.server import EppServer, PoolRouting

MAX_LIMIT = 256


def _age(a: float) -> float | None:
    return None if math.isinf(a) else round(a, 3)


def _units(server: EppServer, pool: str | None = None) -> dict[str, PoolRouting]:
    """Pool name -> its routing (one, unless --pools-file); only ``pool``'s when given."""
    units = server.units
    if pool is None:
        return units
    if pool not in units:
        raise web.HTTPNotFound(text=f"no pool {pool!r} (pools: {', '.join(units)})")
    return {pool: units[pool]}


def endpoints_view(server: EppServer, pool: str | None = None) -> dict[str, Any]:
    units = _units(server, pool)
    if len(units) == 1:
        (unit,) = units.values()
        return _pool_view(unit, server)
    views = {name: _pool_view(unit, server) for name, unit in units.items()}
    first = next(iter(views.values()))
    return {
        "pool": ", ".join(views), "now": first["now"], "state": first["state"], "streams": first["streams"],
        "decisions": sum(v["decisions"] for v in views.values()),
        "rejected": sum(v["rejected"] for v in views.values()),
        "config": {},  # each pool's under pools
        "endpoints": [{**e, "pool": name} for name, v in views.items() for e in v["endpoints"]],
        "pools": views}


def _pool_view(unit: PoolRouting, process: EppServer) -> dict[str, Any]:
    """One pool's view; ``process`` is the server holding the listeners (state, streams)."""
    pool = unit.pool
    decisions = unit.hooks.decisions
    threshold = unit.metrics.runtime.staleness_threshold
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
            "picks": decisions.picks.get(e.name, 0)})
    director = unit.director
    profiles = director.config.scheduler.profiles
    config: dict[str, Any] = {"profiles": {name: {"filters": [f.name for f in p.filters],
                                                  "scorers": {s.name: w for s, w in p.scorers},
                                                  "picker": p.picker.name if p.picker else None}
                                           for name, p in profiles.items()}}
    if unit.reloader is not None:
        config.update(unit.reloader.describe())
    return {
        "pool": pool.name, "now": round(time.time(), 3), "state": process.health.state,
        "streams": process.active_streams(), "decisions": decisions.total, "rejected": decisions.rejected,
        "config": config, "endpoints": eps, "flow_control": director.admission.describe(),
        # predictions against outcomes (epp.observability.audit), and the learned characters per token
        "predictions": {k: a.summary() for k, a in plugin_audits(director.config).items()},
        "chars_per_token": pool.tokens.snapshot(),
        # what plugins learned (a plugin offering ``debug_state()``), e.g. predicted-latency-scorer's rates
        "plugins": {name: plugin.debug_state() for name, plugin in list(director.config.plugins.items())
                    if callable(getattr(plugin, "debug_state", None))}}


def decisions_view(server: EppServer, limit: int = RECENT, pool: str | None = None) -> dict[str, Any]:
    limit = max(1, min(limit, MAX_LIMIT))
    logs = {name: unit.hooks.decisions for name, unit in _units(server, pool).items()}
    if not logs:
        return {"total": 0, "rejected": 0, "decisions": []}
    if len(server.units) == 1:
        (log,) = logs.values()
        return {"total": log.total, "rejected": log.rejected, "size": log.records.maxlen,
                "decisions": log.recent(limit)}
    merged = [{**rec, "pool": None if rec.get("rejected") == UNKNOWN_POOL else name}
              for name, log in logs.items() for rec in log.recent(limit)]
    if pool is not None:
        merged = [rec for rec in merged if rec["pool"] == pool]
    merged.sort(key=lambda rec: rec.get("t", 0.0), reverse=True)  # newest first across pools
    return {"total": sum(log.total for log in logs.values()), "rejected": sum(log.rejected for log in logs.values()),
            "size": sum(log.records.maxlen or 0 for log in logs.values()), "decisions": merged[:limit]}


def add_debug_routes(app: web.Application, server: EppServer) -> None:
    async def endpoints(request: web.Request) -> web.Response:
        return web.json_response(endpoints_view(server, request.query.get("pool")),
                                 headers={"Cache-Control": "no-store"})

    async def decisions(request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", RECENT))
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be an integer") from None
        return web.json_response(decisions_view(server, limit, request.query.get("pool")),
                                 headers={"Cache-Control": "no-store"})

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html", headers={"Cache-Control": "no-store"})

    app.router.add_get("/debug/endpoints", endpoints)
    app.router.add_get("/debug/decisions", decisions)
    app.router.add_get("/debug", page)
    app.router.add_get("/", page)
