"""Plugin registry: kebab-case type name -> plugin class.

Built-in and outside plugins register the same way: a module that decorates its classes with
``@register_plugin("my-scorer")``, made known to EPP through the ``epp.plugins`` entry-point group
in the package's ``pyproject.toml``::

    [project.entry-points."epp.plugins"]
    my-plugins = "my_package.plugins"

``load_entry_points`` imports every such module once at start-up, after the types the core defines itself
(``CORE_TYPES``).

Until the next release, ``instantiate`` also loads a plugin written against the old role signatures, which took
the scheduling cycle's ``CycleState`` first (``score(self, cycle, request, endpoints)``): it inspects the class
once, and binds each such method on the instance to an adapter that passes a ``CycleState`` (one per request,
shared by the adapted plugins, as the scheduler's cycle was), logging one deprecation warning per class.
Plugins of the current signatures are called directly: the request path does no extra work for them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import re
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar

from epp.scheduling.params import DEFAULT_SCORER_STALENESS
from epp.scheduling.plugins import CycleState, Filter, Picker, Plugin, ProfileHandler, Scorer

if TYPE_CHECKING:
    from epp.datalayer.pool import EndpointPool

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "epp.plugins"
# Modules of the types the core defines (the data layer's, whose defaults the server uses unconfigured): registered
# here, so the core needs no built-in plugin and a configuration naming them loads wherever it is parsed.
CORE_TYPES = ("epp.datalayer.sources",)
_TYPE_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_registry: dict[str, type[Plugin]] = {}
_loaded_entry_points = False

P = TypeVar("P", bound=type[Plugin])


class PluginConfigError(ValueError):
    pass


def register_plugin(type_name: str) -> Callable[[P], P]:
    if not _TYPE_NAME.match(type_name):
        raise ValueError(f"plugin type name {type_name!r} must be kebab-case")

    def decorate(cls: P) -> P:
        existing = _registry.get(type_name)
        if existing is not None and existing is not cls:
            raise ValueError(f"plugin type {type_name!r} already registered by {existing.__module__}")
        cls.type_name = type_name
        _registry[type_name] = cls
        return cls

    return decorate


def load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for module in CORE_TYPES:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            importlib.import_module(ep.value.split(":")[0])
        except Exception:
            log.exception("could not load plugins from entry point %s = %s", ep.name, ep.value)


def registered_types() -> dict[str, type[Plugin]]:
    load_entry_points()
    return dict(_registry)


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


class PluginHandle:
    """What a plugin may reach beyond its parameters: the endpoint pool, the other plugins, and the process's
    --metrics-staleness-threshold (the default of plugins' own ``metricsStalenessThreshold``)."""

    def __init__(self, pool: EndpointPool | None = None,
                 metrics_staleness_threshold: float = DEFAULT_SCORER_STALENESS) -> None:
        self.pool = pool
        self.plugins: dict[str, Plugin] = {}
        self.metrics_staleness_threshold = metrics_staleness_threshold

    def plugin(self, name: str) -> Plugin | None:
        return self.plugins.get(name)

    def plugins_of(self, kind: type[Any]) -> list[Any]:
        return [p for p in self.plugins.values() if isinstance(p, kind)]


def instantiate(type_name: str, name: str, params: Mapping[str, Any] | None, handle: PluginHandle) -> Plugin:
    cls = registered_types().get(type_name)
    if cls is None:
        known = ", ".join(sorted(_registry))
        raise PluginConfigError(f"plugin {name!r}: unknown type {type_name!r} (known: {known})")
    if params is not None and not isinstance(params, Mapping):
        raise PluginConfigError(f"plugin {name!r}: parameters must be a mapping")
    kwargs = {_snake(k): v for k, v in (params or {}).items()}
    accepted = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = [k for k in (params or {}) if _snake(k) not in accepted]
        if unknown:
            allowed = ", ".join(_camel(p) for p in accepted) or "none"
            raise PluginConfigError(f"plugin {name!r} ({type_name}): unknown parameter(s) {unknown}; "
                                    f"accepted: {allowed}")
    try:
        plugin = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PluginConfigError(f"plugin {name!r} ({type_name}): {e}") from e
    plugin.name = name
    plugin.handle = handle
    for method in _legacy_methods(cls, name):
        setattr(plugin, method, functools.partial(_call_legacy, getattr(plugin, method)))
    handle.plugins[name] = plugin
    return plugin


# The scheduling roles' methods and how many positional parameters they take after ``self`` today; the releases
# before took a ``CycleState`` first.
_ROLE_METHODS: tuple[tuple[type[Plugin], str, int], ...] = (
    (Filter, "filter", 2),  # request, endpoints
    (Scorer, "score", 2),  # request, endpoints
    (Picker, "pick", 2),  # request, scored
    (ProfileHandler, "pick_profiles", 3),  # request, profiles, results
    (ProfileHandler, "process_results", 2),  # request, results
)
_legacy: dict[type[Plugin], tuple[str, ...]] = {}
# request.attributes: the CycleState the adapted (old-signature) plugins of a request share.
_LEGACY_CYCLE = "epp.scheduling.legacy-cycle-state"


def _legacy_methods(cls: type[Plugin], name: str) -> tuple[str, ...]:
    """The role methods of ``cls`` that still take a leading ``cycle`` parameter (inspected once per class)."""
    found = _legacy.get(cls)
    if found is None:
        found = _legacy[cls] = tuple(m for role, m, n in _ROLE_METHODS
                                     if issubclass(cls, role) and _takes_cycle(getattr(cls, m), n))
        if found:
            log.warning("plugin %r (type %s, %s.%s) has the deprecated signature taking the scheduling cycle first "
                        "in %s: adapted in this release only; drop the parameter, as in score(self, request, "
                        "endpoints) (docs/plugins.md)", name, cls.type_name, cls.__module__, cls.__qualname__,
                        ", ".join(f"{m}()" for m in found))
    return found


def _takes_cycle(function: Any, arity: int) -> bool:
    """``function`` (as found on the class, ``self`` first) requires one positional parameter more than ``arity``."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params[1:] if p.kind in positional and p.default is p.empty]
    return len(required) == arity + 1


def _call_legacy(method: Callable[..., Any], request: Any, *args: Any) -> Any:
    cycle = request.attributes.get(_LEGACY_CYCLE)
    if cycle is None:
        cycle = request.attributes[_LEGACY_CYCLE] = CycleState()
    return method(cycle, request, *args)


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.title() for w in rest)
