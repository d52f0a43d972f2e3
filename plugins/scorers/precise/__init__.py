"""Precise prefix-cache routing: the engine's tokens and the endpoints' own KV events
(``precise-prefix-cache-producer``, ``precise-prefix-cache-scorer``)."""

from epp_plugins.scorers.precise import producer, scorer  # noqa: F401
