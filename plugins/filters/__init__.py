"""Built-in filters."""

from plugins.filters import affinity, labels, session, utilization  # noqa: F401
