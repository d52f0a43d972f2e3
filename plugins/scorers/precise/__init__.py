"""Precise prefix-cache routing: the engine's tokens and the endpoints' own KV events
(``precise-prefix-cache-producer``, ``precise-prefix-cache-scorer``)."""

from plugins.scorers.precise import producer, scorer  # noqa: F401
