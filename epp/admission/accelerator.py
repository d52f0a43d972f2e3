"""The accelerator budget: how many models may be awake at once where model servers share an accelerator.

Endpoints whose engines share one accelerator (a node's GPUs) form a group; each awake (or waking) endpoint takes
its model's memory from the group's budget. Before EPP wakes an endpoint whose group has no room, it puts the
least-recently-used awake endpoints there to sleep. From the endpoints' pod annotations (Kubernetes) or labels (pod
labels, or ``labels`` in a static endpoints file); an annotation wins over a label of the same name:

* ``epp.io/accelerator``: the group (default: the endpoint's address, i.e. engines on the same host share one);
* ``epp.io/accelerator-memory``: what the endpoint's model takes while awake, in any unit (default 1: the budget
  then counts models);
* ``epp.io/accelerator-budget``: the group's capacity in the same unit (the smallest of its endpoints' values;
  default ``--accelerator-budget``; 0: no limit).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from epp.datalayer.endpoint import Endpoint

GROUP_LABEL = "epp.io/accelerator"
MEMORY_LABEL = "epp.io/accelerator-memory"
BUDGET_LABEL = "epp.io/accelerator-budget"


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def _value(e: Endpoint, key: str) -> str | None:
    return e.annotations.get(key) or e.labels.get(key)


def group(e: Endpoint) -> str:
    return _value(e, GROUP_LABEL) or e.address


def memory(e: Endpoint) -> float:
    value = _number(_value(e, MEMORY_LABEL))
    return 1.0 if value is None else value


def budget(members: Iterable[Endpoint], default: float) -> float:
    """The group's capacity; 0: no limit."""
    found = [v for e in members if (v := _number(_value(e, BUDGET_LABEL))) is not None]
    return min(found) if found else default
