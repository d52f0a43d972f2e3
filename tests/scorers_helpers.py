"""Builders shared by the scorer, filter and prefix tests (no tests here)."""

from __future__ import annotations

import time
from typing import Any

from epp.api.types import ApiKind, InferenceRequest, ParsedBody
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.config import load_config

HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"


def ep(name: str, waiting: int = 0, running: int = 0, kv: float = 0.0, fresh: bool = True, inflight: int = 0,
       tokens: int = 0, labels: dict[str, str] | None = None, active: tuple[str, ...] = (),
       waiting_models: tuple[str, ...] = (), max_active: int = 0, age: float = 0.0, index: int = 0) -> Endpoint:
    e = Endpoint(name, f"10.0.0.{index + 1}", 8000, dict(labels or {}))
    m = e.metrics
    m.waiting_requests, m.running_requests, m.kv_cache_usage = waiting, running, kv
    m.active_models, m.waiting_models, m.max_active_models = frozenset(active), frozenset(waiting_models), max_active
    if fresh:
        m.updated_at = time.monotonic() - age
    e.inflight_requests, e.inflight_tokens = inflight, tokens
    return e


def eps(*specs: dict[str, Any]) -> list[Endpoint]:
    return [ep(s.pop("name", f"e{i}"), index=i, **s) for i, s in enumerate(specs)]


def req(text: str | None = None, ids: list[int] | None = None, model: str = "m", headers: dict[str, str] | None = None,
        salt: str | None = None, rid: str = "r") -> InferenceRequest:
    body = ParsedBody(ApiKind.COMPLETIONS, model=model, prompt_text=text, prompt_token_ids=ids, cache_salt=salt)
    return InferenceRequest(rid, "/v1/completions", "POST", dict(headers or {}), body, b"", target_model=model)


def plugin(type_name: str, params: str = "{}", extra: str = "", name: str | None = None) -> Any:
    """One plugin of ``type_name`` instantiated through the real config loader (YAML, camelCase)."""
    text = HEAD + f"plugins:\n- type: {type_name}\n" + (f"  name: {name}\n" if name else "") + \
        f"  parameters: {params}\n" + extra
    cfg = load_config(text)
    return cfg.plugins[name or type_name]


def config(body: str) -> Any:
    return load_config(HEAD + body)


def score(p: Any, endpoints: list[Endpoint], request: InferenceRequest | None = None) -> list[float]:
    return [round(s, 6) for s in p.score(request or req("hello"), endpoints)]
