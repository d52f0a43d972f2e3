"""Operating EPP: what it exports, how it answers health checks, drains, reloads and explains itself.

Metrics (``/metrics`` on ``--metrics-port``, ``metrics.py``)
    GIE's names, types and labels (``inference_objective_*``, ``inference_pool_*``,
    ``inference_extension_*`` including ``plugin_duration_seconds`` per plugin call and the prefix
    indexer's size and hit ratio) and EPP's own ``epp_*`` (picks and rejections by reason, in-flight
    requests, metrics age / staleness / scrape errors per endpoint, open ext_proc streams, drain state,
    config reloads, decision margins). Label values are bounded (models capped, endpoints follow the
    pool, plugins follow the configuration). ``manifests/grafana/epp-dashboard.json`` is built on them.

Health (``epp.health``)
    gRPC health on ``--grpc-health-port`` and on the ext_proc port: ``liveness`` always SERVING;
    ``readiness``, ``""``, ``envoy.service.ext_proc.v3.ExternalProcessor`` (and any name) SERVING once
    the pool is synced (and leading), NOT_SERVING while starting and draining. Check, Watch and List.

Drain (``EppServer.drain``; ``--drain-timeout``, ``--drain-quiet-period``)
    On SIGTERM health turns NOT_SERVING at once, and EPP keeps serving every stream, new ones
    included, while proxies notice and move away. By default the drain lasts the whole
    ``--drain-timeout`` (30 s), as GIE and llm-d do: EPP cannot know when every proxy has stopped
    sending. ``--drain-quiet-period=D`` ends it earlier, once no stream has been open for D seconds
    *and* at least one health probe has been answered NOT_SERVING (so an idle replica does not vanish
    before anyone was told). Then new streams are refused and streams still open get 5 s more; EPP
    exits 0. A second SIGTERM/SIGINT ends the drain at once. Give Kubernetes a
    ``terminationGracePeriodSeconds`` of at least ``--drain-timeout`` + 10 s.

Live reload (``epp.reload``)
    ``--config-file`` is watched (every second, and on SIGHUP). A valid new configuration replaces the
    old one in one step (requests in flight finish with the plugins that scheduled them); an invalid one
    is refused with one error line naming the problem, and the old one stays. Counted in
    ``epp_config_reloads_total{result}``. ``--static-endpoints-file`` reloads the same way.

Decisions you can see (``explain.py``, ``decisions.py``, ``debug.py``)
    ``--explain-decisions`` explains every decision; otherwise a request carrying
    ``x-epp-explain: <token>`` with the ``--explain-token`` (or ``EPP_EXPLAIN_TOKEN``) gets its own.
    An explained decision carries the per-endpoint totals, the per-scorer breakdown, the weights and
    the winning margin in ``envoy.lb`` dynamic metadata (``x-gateway-destination-endpoint-scores``,
    llm-d's key, and ``x-epp-decision``) and in the ``x-epp-decision`` response header (compact JSON).
    ``/debug/endpoints``, ``/debug/decisions`` (a bounded ring of recent decisions) and a live page at
    ``/debug`` are served on the metrics port (``--debug-endpoints=false`` turns them off).

Tracing (``tracing.py``)
    Off unless ``--tracing`` or an ``OTEL_EXPORTER_OTLP_ENDPOINT``: a ``gateway.request`` span per
    request continuing the client's W3C trace context and passing its own upstream in ``traceparent``.

Logs (``epp.logs``)
    ``--log-format text|json``; ``-v`` as GIE (2 info, 3 verbose, 4 debug: one line per decision).
"""
