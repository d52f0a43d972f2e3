"""Built-in scorers (and the approximate prefix-cache producer)."""

from epp_plugins.scorers import latency, load, nohit, precise, prefix, session  # noqa: F401
