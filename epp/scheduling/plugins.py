"""The plugin interfaces: the product's extension surface.

A plugin is a class registered under a kebab-case type name (see ``epp.scheduling.registry``). Its
``__init__`` takes the ``parameters`` of the config file as keyword arguments, with camelCase keys
turned into snake_case (``maxNumOfEndpoints`` -> ``max_num_of_endpoints``). A plugin implements one
or more of the roles below by subclassing them; the framework finds the roles with ``isinstance``.

Scheduling roles, called in this order for each request (one *cycle*):

* ``ProfileHandler`` chooses which scheduling profiles run and which result is primary.
* ``Filter`` narrows the candidate endpoints.
* ``Scorer`` scores each candidate in [0, 1] (values outside are clamped); a profile sums
  ``weight * score`` over its scorers.
* ``Picker`` chooses the endpoint(s) from the scored candidates, best first (the rest are fallbacks).

Before the cycle, a ``RequestPreparer`` may await work the cycle needs (a pod tokenizing the prompt); it bounds
its own wait and, failing, leaves the request as it was.

The methods take the request and what the role works on (``score(self, request, endpoints)``); data between
plugins goes through typed keys (``epp.scheduling.datakeys``). A plugin written against the old signatures, with
a leading ``cycle`` parameter, still loads for one release (``epp.scheduling.registry`` adapts it, warning once).

Request-lifecycle roles (``RequestObserver``): ``pre_request`` once the pick is made,
``on_response_headers``, ``on_response_body`` (only if ``needs_response_body`` or ``uses_response_body``), and
``on_response_complete`` exactly once per routed request, even when the client went away.

All methods run on the event loop of the request path: keep them fast and non-blocking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from epp.api.types import InferenceRequest, Usage
from epp.datalayer.endpoint import Endpoint

if TYPE_CHECKING:
    from epp.scheduling.registry import PluginHandle


class Plugin:
    """Base of every plugin. ``type_name`` is set by the ``@register_plugin`` decorator; ``name``
    and ``handle`` are set by the framework when the plugin is instantiated from config."""

    type_name: ClassVar[str] = ""
    name: str = ""
    handle: PluginHandle | None = None

    def start(self) -> None:
        """Called once the whole configuration is built (other plugins can be looked up). A plugin kept
        across a config reload (same name, type and parameters) is started again with the new handle."""

    def stop(self) -> None:
        """Called when a config reload drops the plugin: release what ``start`` registered."""


@dataclass(slots=True)
class CycleState:
    """Deprecated, removed in the next release: the roles' methods no longer take it. Data between plugins goes
    through typed keys (``epp.scheduling.datakeys.DataKey``), a plugin's own per-request state in
    ``request.attributes`` under a key of its own. A plugin still written ``score(self, cycle, request,
    endpoints)`` is adapted when instantiated (``epp.scheduling.registry``) and gets one of these per request."""

    data: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: Endpoint
    score: float


@dataclass(slots=True)
class ProfileResult:
    endpoints: list[Endpoint]  # best first
    scores: dict[str, dict[str, float]] | None = None  # scorer name -> endpoint name -> raw score


@dataclass(slots=True)
class SchedulingResult:
    profile_results: dict[str, ProfileResult | None]
    primary_profile: str
    # Headers the profile handler sets on the upstream request (e.g. P/D's x-prefiller-host-port); a client's
    # copy of each is removed first.
    request_headers: dict[str, str] = field(default_factory=dict)
    # Prefill/decode disaggregation (plugins/disagg.py): the decision and why ({"decision": "decode-only" |
    # "prefill-decode", "reason": ..., ...}; None when no disaggregating handler ran), and the prefill endpoint
    # the primary (decode) endpoint pulls the KV cache from.
    disagg: dict[str, Any] | None = None
    prefill: Endpoint | None = None

    @property
    def endpoints(self) -> list[Endpoint]:
        primary = self.profile_results.get(self.primary_profile)
        return primary.endpoints if primary else []


class Filter(Plugin):
    def filter(self, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        raise NotImplementedError


class Scorer(Plugin):
    category: ClassVar[str] = "distribution"  # informational: affinity | distribution | balance

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        """One score per endpoint, in the order given."""
        raise NotImplementedError


class Picker(Plugin):
    def pick(self, request: InferenceRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        raise NotImplementedError


class ProfileHandler(Plugin):
    def pick_profiles(self, request: InferenceRequest, profiles: Mapping[str, Any],
                      results: Mapping[str, ProfileResult | None]) -> dict[str, Any]:
        """Profiles to run next (empty = done). Called repeatedly with the results so far."""
        raise NotImplementedError

    def process_results(self, request: InferenceRequest,
                        results: dict[str, ProfileResult | None]) -> SchedulingResult:
        raise NotImplementedError

    def check_profiles(self, profiles: Mapping[str, Any]) -> None:
        """Called once the configuration is built: raise ``PluginConfigError`` when profiles it needs are missing."""


@dataclass(slots=True)
class ResponseInfo:
    """What EPP learns from the response; filled in as it streams past."""

    status: int = 0
    content_type: str = ""
    served_endpoint: str | None = None  # reported by the proxy in envoy.lb metadata
    usage: Usage | None = None
    bytes: int = 0
    completed: bool = False  # the response ended normally (False: reset, client gone, error)
    # The API's final event EPP saw: "completed" ([DONE], message_stop, response.completed, a whole JSON body),
    # or Responses' "failed" / "incomplete" (which also count as completed); None when it saw none.
    outcome: str | None = None
    first_byte_at: float | None = None  # time.monotonic() of the first body chunk, when seen


class RequestObserver(Plugin):
    """Hooks around a routed request. Override only what you need."""

    needs_response_body: ClassVar[bool] = False  # True: EPP warns if Envoy sends no response bodies
    uses_response_body: ClassVar[bool] = False  # True: gets on_response_body, and does without (no warning)

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        pass

    def on_response_headers(self, request: InferenceRequest, endpoint: Endpoint, response: ResponseInfo) -> None:
        pass

    def on_response_body(self, request: InferenceRequest, endpoint: Endpoint, chunk: bytes,
                         end_of_stream: bool) -> None:
        pass

    def on_response_complete(self, request: InferenceRequest, endpoint: Endpoint, response: ResponseInfo) -> None:
        pass


class RequestPreparer(Plugin):
    """Awaited by the director before admission and scheduling (after a sleeping endpoint woke), only while
    ``prepares`` is true: the one await a plugin gets on the request path, so it must be bounded."""

    prepares: bool = True

    async def prepare_request(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        pass
