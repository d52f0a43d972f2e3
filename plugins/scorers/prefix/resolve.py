"""Which plugin's prefix match another plugin reads (affinity filter, no-hit-lru, token-load, latency,
disaggregation): one place that checks the configuration names a producer or prefix scorer, and only one."""

from __future__ import annotations

from epp.plugin import Plugin, PluginConfigError
from epp_plugins.scorers.prefix.producer import ApproxPrefixCacheProducer
from epp_plugins.scorers.prefix.scorer import PrefixCacheScorer


def resolve_prefix_source(plugin: Plugin, name: str | None, required: bool) -> PrefixSource | None:
    """The plugin whose prefix match ``plugin`` should read: the one called ``name`` (a producer or a prefix
    scorer), else the only producer, else the only prefix scorer. Raises when ``required`` and none
    qualifies, or when several do. Call ``prefix_producer()`` on the result at request time (a scorer
    binds to its producer only when it starts)."""
    handle = plugin.handle
    if handle is None:
        if required or name:
            raise PluginConfigError(f"plugin {plugin.name!r}: needs a prefix-cache-scorer in its configuration")
        return None
    if name:
        found = handle.plugin(name)
        if isinstance(found, (ApproxPrefixCacheProducer, PrefixCacheScorer)):
            return found
        raise PluginConfigError(f"plugin {plugin.name!r}: {name!r} is not a prefix-cache-scorer or "
                                "approx-prefix-cache-producer")
    candidates: list[PrefixSource] = list(handle.plugins_of(ApproxPrefixCacheProducer))
    if not candidates:
        candidates = list(handle.plugins_of(PrefixCacheScorer))
    if len(candidates) == 1:
        return candidates[0]
    if required or candidates:
        what = "no" if not candidates else "several"
        raise PluginConfigError(f"plugin {plugin.name!r}: {what} prefix-cache-scorer / approx-prefix-cache-producer "
                                "plugins; name one with prefixPluginName")
    return None


PrefixSource = ApproxPrefixCacheProducer | PrefixCacheScorer
