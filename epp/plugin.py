"""EPP's public plugin API: everything a plugin imports, from this one module.

A plugin is a class registered under a kebab-case type name with ``@register_plugin``, made known to EPP
through the ``epp.plugins`` entry-point group of its package; the configuration names it by that type and
passes its ``parameters`` as keyword arguments (camelCase keys become snake_case). It takes one or more roles
by subclassing them:

* ``ProfileHandler``: which scheduling profiles run, and which result is primary;
* ``Filter``: narrows the candidate endpoints;
* ``Scorer``: one score in [0, 1] per candidate; a profile sums ``weight * score``;
* ``Picker``: chooses the endpoint(s) from the scored candidates, best first;
* ``RequestObserver``: hooks when the pick is made and as the response streams past.

Data between plugins goes through typed keys (``DataKey``): a producer lists the keys it publishes in
``produces`` and puts values with ``KEY.put(request, value)``; a consumer lists what it reads in ``consumes`` and
reads with ``KEY.get(request)``. EPP refuses a configuration whose consumer has no producer. Built-in keys:
``PREFIX_MATCH`` (per endpoint, the prompt prefix tokens it caches; produced by ``prefix-cache-scorer``).

Parameter helpers (``check_int``, ``check_float``, ...) raise ``ValueError`` naming the parameter as the user
wrote it; EPP reports it as a ``PluginConfigError`` naming the plugin. ``epp.testing`` runs plugins without a
server. Read time with ``monotonic()`` (``time.monotonic`` live, virtual time under ``epp replay``). See
docs/plugins.md.

The roles' methods take no scheduling cycle any more: ``score(self, request, endpoints)``. ``CycleState`` stays
importable from here for one release, deprecated (importing it warns); a plugin still written ``score(self, cycle,
request, endpoints)`` loads, adapted, with one warning naming it.
"""

import warnings
from typing import Any

from epp.api.answer import AnswerCollector, answer_collector, continuation_text
from epp.api.types import ApiKind, InferenceRequest, ParsedBody, Usage
from epp.clock import monotonic
from epp.datalayer.endpoint import Endpoint, EndpointMetrics
from epp.scheduling.datakeys import PREFIX_MATCH, DataKey, PrefixMatch
from epp.scheduling.params import (
    DEFAULT_SCORER_STALENESS,
    FollowsStalenessFlag,
    check_bool,
    check_duration,
    check_float,
    check_int,
    check_mapping,
    check_str,
    fresh_mask,
    min_max_inverse,
)
from epp.scheduling.plugins import (
    Filter,
    Picker,
    Plugin,
    ProfileHandler,
    ProfileResult,
    RequestObserver,
    ResponseInfo,
    SchedulingResult,
    ScoredEndpoint,
    Scorer,
)
from epp.scheduling.registry import PluginConfigError, PluginHandle, register_plugin, registered_types

__all__ = [
    "DEFAULT_SCORER_STALENESS",
    "PREFIX_MATCH",
    "AnswerCollector",
    "ApiKind",
    "DataKey",
    "Endpoint",
    "EndpointMetrics",
    "Filter",
    "FollowsStalenessFlag",
    "InferenceRequest",
    "ParsedBody",
    "Picker",
    "Plugin",
    "PluginConfigError",
    "PluginHandle",
    "PrefixMatch",
    "ProfileHandler",
    "ProfileResult",
    "RequestObserver",
    "ResponseInfo",
    "SchedulingResult",
    "ScoredEndpoint",
    "Scorer",
    "Usage",
    "answer_collector",
    "check_bool",
    "check_duration",
    "check_float",
    "check_int",
    "check_mapping",
    "check_str",
    "continuation_text",
    "fresh_mask",
    "min_max_inverse",
    "monotonic",
    "register_plugin",
    "registered_types",
]


def __getattr__(name: str) -> Any:
    if name == "CycleState":  # deprecated: removed in the next release
        warnings.warn("epp.plugin.CycleState is deprecated and goes in the next release: plugin methods no longer "
                      "take the scheduling cycle (score(self, request, endpoints)); share data with DataKey",
                      DeprecationWarning, stacklevel=2)
        from epp.scheduling.plugins import CycleState

        return CycleState
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
