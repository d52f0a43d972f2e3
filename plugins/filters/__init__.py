"""Built-in filters."""

from epp_plugins.filters import affinity, labels, session, utilization  # noqa: F401
