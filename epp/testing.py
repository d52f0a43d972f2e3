"""Test harness for plugin authors: endpoints with metrics, requests of every API, a configuration run as EPP
runs it (no server, no network).

    from epp.testing import Harness, endpoint, request

    h = Harness(CONFIG_YAML, [endpoint("a", waiting=5), endpoint("b")])
    assert h.pick(request("chat-completions", "hello")).name == "b"

Requests are parsed by EPP's own parsers, so a plugin sees exactly the ``InferenceRequest`` it would see behind
Envoy. ``Harness.serve`` also runs the request-lifecycle hooks (pick, response complete), so plugins that learn
from traffic (the prefix index, session affinity) learn as they would in production.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from epp.api.parsing import parse_request
from epp.api.types import ApiKind, InferenceRequest, Usage
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.scheduling.config import PickerConfig, load_config
from epp.scheduling.plugins import RequestObserver, ResponseInfo, SchedulingResult

__all__ = ["API_PATHS", "Harness", "endpoint", "request"]

# The path EPP recognises for each API (any prefix before it works too).
API_PATHS: dict[str, str] = {
    ApiKind.COMPLETIONS: "/v1/completions",
    ApiKind.CHAT_COMPLETIONS: "/v1/chat/completions",
    ApiKind.RESPONSES: "/v1/responses",
    ApiKind.EMBEDDINGS: "/v1/embeddings",
    ApiKind.MESSAGES: "/v1/messages",
    ApiKind.COUNT_TOKENS: "/v1/messages/count_tokens",
    ApiKind.GENERATE: "/inference/v1/generate",
}
_ids = itertools.count(1)


def endpoint(name: str, waiting: int = 0, running: int = 0, kv: float = 0.0, address: str | None = None,
             port: int = 8000, labels: Mapping[str, str] | None = None, fresh: bool = True,
             models: Iterable[str] = (), inflight: int = 0) -> Endpoint:
    """An endpoint whose metrics were just scraped (``fresh=False``: never scraped, so stale)."""
    e = Endpoint(name, address or f"10.0.0.{next(_ids) % 250 + 1}", port, dict(labels or {}))
    m = e.metrics
    m.waiting_requests, m.running_requests, m.kv_cache_usage = waiting, running, kv
    m.active_models = frozenset(models)
    m.updated_at = time.monotonic() if fresh else 0.0
    e.inflight_requests = inflight
    return e


def _body(api: ApiKind, prompt: str | list[int], model: str, stream: bool, max_tokens: int) -> dict[str, Any]:
    text = prompt if isinstance(prompt, str) else None
    if api is ApiKind.COMPLETIONS:
        return {"model": model, "prompt": prompt, "stream": stream, "max_tokens": max_tokens}
    if api is ApiKind.GENERATE:
        return {"model": model, "token_ids": prompt if text is None else [ord(c) for c in text],
                "sampling_params": {"max_tokens": max_tokens}, "stream": stream}
    if api is ApiKind.RESPONSES:
        return {"model": model, "input": text, "stream": stream, "max_output_tokens": max_tokens}
    if api is ApiKind.EMBEDDINGS:
        return {"model": model, "input": text}
    messages = [{"role": "user", "content": text}]
    if api is ApiKind.COUNT_TOKENS:
        return {"model": model, "messages": messages}
    return {"model": model, "messages": messages, "stream": stream, "max_tokens": max_tokens}


def request(api: str | ApiKind = ApiKind.CHAT_COMPLETIONS, prompt: str | list[int] = "hello", model: str = "m",
            headers: Mapping[str, str] | None = None, stream: bool = False, max_tokens: int = 16,
            body: Mapping[str, Any] | None = None, path: str | None = None) -> InferenceRequest:
    """A request as EPP's parsers build it: ``api`` is an ``ApiKind`` or its value (``"completions"``,
    ``"messages"``, ...); ``body`` replaces the generated JSON body."""
    kind = ApiKind(api)
    raw = json.dumps(dict(body) if body is not None else _body(kind, prompt, model, stream, max_tokens)).encode()
    path = path or API_PATHS[kind]
    parsed = parse_request(path, raw, "application/json")
    return InferenceRequest(f"test-{next(_ids)}", path, "POST", {k.lower(): v for k, v in (headers or {}).items()},
                            parsed, raw, target_model=parsed.model, received_at=time.monotonic())


class Harness:
    """A configuration (EndpointPickerConfig YAML, as EPP loads it) over a pool of endpoints."""

    def __init__(self, config: str | None, endpoints: Iterable[Endpoint]) -> None:
        self.pool = EndpointPool("test")
        given = list(endpoints)
        self.pool.sync(EndpointSpec(e.name, e.address, e.port, dict(e.labels)) for e in given)
        for e in given:  # keep the caller's metrics and counts on the pool's objects
            p = self.pool.get(e.name)
            assert p is not None
            p.metrics, p.inflight_requests, p.inflight_tokens = e.metrics, e.inflight_requests, e.inflight_tokens
        self.config: PickerConfig = load_config(config, self.pool)

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self.pool.endpoints)

    def endpoint(self, name: str) -> Endpoint:
        found = self.pool.get(name)
        if found is None:
            raise KeyError(name)
        return found

    def plugin(self, name: str) -> Any:
        return self.config.plugins[name]

    def schedule(self, req: InferenceRequest, candidates: Iterable[Endpoint] | None = None,
                 explain: bool = False) -> SchedulingResult:
        """One scheduling cycle, without the lifecycle hooks."""
        return self.config.scheduler.schedule(req, list(candidates or self.pool.endpoints), explain=explain)

    def pick(self, req: InferenceRequest, candidates: Iterable[Endpoint] | None = None) -> Endpoint:
        return self.schedule(req, candidates).endpoints[0]

    def scores(self, req: InferenceRequest) -> dict[str, dict[str, float]]:
        """Scorer name -> endpoint name -> score (clamped), and ``total``, for the primary profile."""
        result = self.schedule(req, explain=True)
        primary = result.profile_results[result.primary_profile]
        return dict(primary.scores or {}) if primary else {}

    def serve(self, req: InferenceRequest, cached_tokens: int | None = None) -> Endpoint:
        """Schedule and run the request's whole lifecycle: ``pre_request``, then a completed 200 response (with
        ``cached_tokens`` as the server's usage when given)."""
        result = self.schedule(req)
        picked = result.endpoints[0]
        observers = self.config.plugins_of(RequestObserver)
        for o in observers:
            o.pre_request(req, result)
        usage = Usage(cached_tokens=cached_tokens) if cached_tokens is not None else None
        response = ResponseInfo(status=200, served_endpoint=picked.hostport, usage=usage, completed=True,
                                outcome="completed")
        for o in observers:
            o.on_response_headers(req, picked, response)
        for o in observers:
            o.on_response_complete(req, picked, response)
        return picked
