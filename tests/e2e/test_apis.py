"""Every API through a real Envoy, with the real SDKs; each answer comes from the pod EPP picked."""

from __future__ import annotations

import pytest

from epp.stack.tour import format_table, run_tour


@pytest.mark.parametrize("variant", ["stack", "stack_no_bodies"])
def test_every_api_is_served_by_the_endpoint_epp_picked(variant, request):
    stack = request.getfixturevalue(variant)
    results = run_tour(stack.url)
    table = format_table(results)
    assert all(r.ok for r in results), table
    assert all(r.picked == r.served_by for r in results), table
    assert len(results) == 15
