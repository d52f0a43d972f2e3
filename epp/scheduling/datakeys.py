"""Typed per-request data that one plugin produces and others consume.

A producer declares the keys it publishes (class attribute ``produces``, a tuple of keys) and a consumer the keys
it reads (``consumes``); EPP
refuses a configuration where a consumer's key has no producer, or where a scorer would read a key that a
scorer listed after it in the same profile publishes. Values live on the request for its lifetime.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from epp.scheduling.registry import PluginConfigError

if TYPE_CHECKING:
    from epp.api.types import InferenceRequest
    from epp.datalayer.endpoint import Endpoint
    from epp.scheduling.plugins import Plugin
    from epp.scheduling.scheduler import SchedulerProfile

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DataKey(Generic[T]):
    """A name and the type of its value. The key object itself indexes ``request.attributes``: two packages
    choosing the same name cannot read each other's values by accident."""

    name: str
    type: type
    description: str = ""

    def get(self, request: InferenceRequest) -> T | None:
        return request.attributes.get(self)

    def put(self, request: InferenceRequest, value: T) -> None:
        request.attributes[self] = value


@dataclass(slots=True)
class PrefixMatch:
    """How much of the request's prompt each endpoint already holds in its KV cache, as the prefix producer
    estimates it (approximate or precise)."""

    prompt_tokens: int  # the prompt's tokens (estimated for character blocks)
    matched_tokens: dict[str, int] = field(default_factory=dict)  # endpoint name -> prefix tokens it holds

    def tokens(self, endpoint: Endpoint) -> int:
        return self.matched_tokens.get(endpoint.name, 0)

    def ratio(self, endpoint: Endpoint) -> float:
        return self.tokens(endpoint) / self.prompt_tokens if self.prompt_tokens else 0.0


PREFIX_MATCH: DataKey[PrefixMatch] = DataKey(
    "prefix-match", PrefixMatch, "per endpoint, the prompt prefix tokens it holds (prefix-cache-scorer)")


def check_data_keys(plugins: Mapping[str, Plugin], profiles: Mapping[str, SchedulerProfile]) -> None:
    """Every consumed key has a producer; within a profile a scorer's producer scores before it."""
    produced: dict[DataKey[Any], list[str]] = {}
    for name, plugin in plugins.items():
        for key in produces(plugin):
            produced.setdefault(key, []).append(name)
    for name, plugin in plugins.items():
        for key in consumes(plugin):
            if key not in produced:
                raise PluginConfigError(f"plugin {name!r} consumes {key.name!r}, which no configured plugin "
                                        "produces")
    for pname, profile in profiles.items():
        seen: set[DataKey[Any]] = set()
        for scorer, _ in profile.scorers:
            late = [k for k in consumes(scorer) if k not in seen and _later(k, scorer, profile.scorers)]
            if late:
                raise PluginConfigError(f"schedulingProfiles {pname!r}: {scorer.name!r} reads {late[0].name!r}; "
                                        f"list it after the scorer that produces it")
            seen.update(produces(scorer))


def _later(key: DataKey[Any], scorer: Plugin, scorers: Iterable[tuple[Plugin, float]]) -> bool:
    names = [s for s, _ in scorers]
    return any(key in produces(s) for s in names[names.index(scorer) + 1:])


def produces(plugin: Plugin) -> tuple[DataKey[Any], ...]:
    return getattr(plugin, "produces", ())


def consumes(plugin: Plugin) -> tuple[DataKey[Any], ...]:
    return getattr(plugin, "consumes", ())
