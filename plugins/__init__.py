"""EPP's built-in plugins.

Loaded through the ``epp.plugins`` entry point declared in ``pyproject.toml``, exactly as an outside
plugin package would be: importing this package registers every built-in type.
"""

from epp_plugins import (  # noqa: F401
    admission,
    conformance,
    disagg,
    filters,
    pickers,
    profile_handlers,
    remote,
    scorers,
)
