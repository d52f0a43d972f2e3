"""Built-in scorers."""

from plugins.scorers import load, prefix  # noqa: F401
