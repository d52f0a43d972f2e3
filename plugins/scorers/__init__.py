"""Built-in scorers (and the approximate prefix-cache producer)."""

from plugins.scorers import load, nohit, prefix, session  # noqa: F401
