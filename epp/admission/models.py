"""Models at their own path prefix: ``http://<gateway>/<model>/v1/chat/completions``.

``<model>`` is a deployment name mapped to a served model by ``--model-deployments`` (``llama-3-8b=meta-llama/
Meta-Llama-3-8B-Instruct``) or, with no mapping, a served model name itself (as the model servers report it in the
``model_name`` label of their metrics; it may contain ``/``). The prefix selects the model -- the endpoints serving
it are the request's only candidates -- and is stripped before forwarding: EPP rewrites ``:path``. ``GET
/<model>/status`` is answered by EPP itself (``Waker.status``). A path whose first segment names no model is left
as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from epp.datalayer.endpoint import Endpoint
from epp.datalayer.pool import EndpointPool

STATUS_PATH = "/status"


@dataclass(frozen=True, slots=True)
class ModelPath:
    name: str  # the prefix as the client wrote it: a deployment name, or the served model
    model: str  # the served model
    path: str  # what is forwarded: the path without the prefix, query string kept


class ModelPaths:
    def __init__(self, pool: EndpointPool, deployments: Mapping[str, str] | None = None) -> None:
        self.pool = pool
        self.deployments: dict[str, str] = dict(deployments or {})

    def resolve(self, path: str) -> ModelPath | None:
        """The model a path's prefix names, or None (no prefix: the path is forwarded unchanged)."""
        if path.startswith("/v1/") or not path.startswith("/") or path.find("/", 1) < 0:
            return None  # the common case, an API path without a prefix
        first = path[1:path.find("/", 1)]
        model = self.deployments.get(first)
        if model is not None:
            return ModelPath(first, model, path[len(first) + 1:])
        best = ""
        for served in {e.metrics.served_model for e in self.pool.endpoints}:
            if served and len(served) > len(best) and path.startswith(served, 1) and \
                    path[len(served) + 1:len(served) + 2] == "/":
                best = served
        return ModelPath(best, best, path[len(best) + 1:]) if best else None

    def endpoints(self, model: str) -> list[Endpoint]:
        return [e for e in self.pool.endpoints if e.metrics.served_model == model]


def is_status(route: ModelPath, method: str) -> bool:
    return method.upper() == "GET" and route.path.partition("?")[0] == STATUS_PATH
