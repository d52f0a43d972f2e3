"""``priority-reserve-policy``: a lower band leaves free what the higher bands recently had in flight at once."""

from __future__ import annotations

import pytest

from epp.admission.demand import Demand
from tests.unit.test_admission import Flow, director_for, fc_config, req, settle

RESERVE = fc_config(6, "  usageLimitPolicyPluginRef: reserve\n", "- {type: priority-reserve-policy, name: reserve}\n")


def test_demand_counts_in_flight_and_the_recent_peak():
    d = Demand()
    for _ in range(3):
        d.started(10)
    d.ended(10)
    d.ended(10)
    assert (d.inflight(10), d.peak(10, 10.0), d.inflight(-1), d.peak(-1, 10.0)) == (1, 3, 0, 0)


async def test_lower_bands_leave_room_for_the_higher_bands_recent_peak():
    d = director_for(RESERVE)
    f = Flow(d)
    for i in range(3):  # the high band had 3 in flight at once ...
        f.start(req(10), f"hi{i}")
    await settle()
    for i in range(3):  # ... and none now
        f.finish(f"hi{i}")
    batch = [f.start(req(-1), f"b{i}") for i in range(5)]
    await settle()
    assert f.order[3:] == ["b0", "b1", "b2"]  # 6 slots, 3 kept for the high band
    f.start(req(10), "hi3")
    await settle()
    assert f.order[-1] == "hi3"  # it found its slot free
    f.finish("hi3")  # one of the reserved slots is free again: still reserved
    await settle()
    assert len(f.order) == 7 and not batch[3].done()
    for task in batch[3:]:
        task.cancel()


def test_window_must_be_positive():
    with pytest.raises(Exception, match="window"):
        director_for(fc_config(6, "  usageLimitPolicyPluginRef: reserve\n",
                               "- {type: priority-reserve-policy, name: reserve, parameters: {window: 0s}}\n"))
