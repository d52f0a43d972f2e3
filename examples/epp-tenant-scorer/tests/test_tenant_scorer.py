"""tenant-scorer through EPP's own configuration loader and scheduler (epp.testing)."""

import pytest
from epp_tenant_scorer import TenantScorer

from epp.plugin import PluginConfigError, registered_types
from epp.testing import Harness, endpoint, request

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: tenant-scorer
  parameters: {tenants: {gold: ["10.1.0.1:8000"]}}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: tenant-scorer, weight: 10}
  - {pluginRef: queue-scorer}
"""


def test_installed_package_is_loaded_by_its_entry_point():
    assert registered_types()["tenant-scorer"].__module__ == "epp_tenant_scorer"


def pool():
    return [endpoint("gold", waiting=20, address="10.1.0.1"), endpoint("a", waiting=1), endpoint("b")]


@pytest.mark.parametrize("api", ["chat-completions", "completions", "messages", "responses"])
def test_a_tenant_goes_to_its_endpoint_even_when_it_is_busier(api):
    h = Harness(CONFIG, pool())
    assert h.pick(request(api, headers={"X-Tenant": "gold"})).name == "gold"


def test_others_avoid_the_reserved_endpoint_and_balance_by_queue():
    h = Harness(CONFIG, [endpoint("gold", address="10.1.0.1"), endpoint("a", waiting=3), endpoint("b")])
    assert h.pick(request()).name == "b"
    assert h.pick(request(headers={"x-tenant": "unknown"})).name == "b"


def test_the_scorer_alone_takes_the_request_and_the_endpoints():
    scorer = TenantScorer(tenants={"gold": ["10.1.0.1:8000"]})
    assert scorer.score(request(headers={"x-tenant": "gold"}), pool()) == [1.0, 0.0, 0.0]
    assert scorer.score(request(), pool()) == [0.0, 1.0, 1.0]


def test_bad_parameters_name_the_plugin():
    with pytest.raises(PluginConfigError, match=r"tenant-scorer.*tenants"):
        Harness(CONFIG.replace('["10.1.0.1:8000"]', '"10.1.0.1"'), pool())
