"""Plugin registry: kebab-case type name -> plugin class.

Built-in and outside plugins register the same way: a module that decorates its classes with
``@register_plugin("my-scorer")``, made known to EPP through the ``epp.plugins`` entry-point group
in the package's ``pyproject.toml``::

    [project.entry-points."epp.plugins"]
    my-plugins = "my_package.plugins"

``load_entry_points`` imports every such module once at start-up, after the types the core defines itself
(``CORE_TYPES``).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar

from epp.scheduling.plugins import Plugin

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
    """What a plugin may reach beyond its parameters: the endpoint pool and the other plugins."""

    def __init__(self, pool: EndpointPool | None = None) -> None:
        self.pool = pool
        self.plugins: dict[str, Plugin] = {}

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
    handle.plugins[name] = plugin
    return plugin


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.title() for w in rest)
