"""GIE conformance plugins through the real Envoy: the test header pins the endpoint, and the endpoint the proxy
reports it served from comes back in x-conformance-test-served-endpoint. The rig's Envoy reports the served
endpoint as a conformant gateway does (envoy.lb metadata), here with a Lua filter after ext_proc."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import epp.stack.envoy as envoy
from epp.extproc.protocol import DECISION_HEADER, DESTINATION_HEADER, LB_NAMESPACE, SERVED_KEY
from epp.stack.local import LocalStack
from epp.stack.tour import MODEL
from epp_plugins.conformance import SELECTION_HEADER, SERVED_HEADER
from tests.e2e.conftest import SIM_ARGS

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
- type: queue-scorer
"""
REPORT_SERVED = f"""
function envoy_on_request(handle)
  local dest = handle:headers():get("{DESTINATION_HEADER}")
  if dest then handle:streamInfo():dynamicMetadata():set("{LB_NAMESPACE}", "{SERVED_KEY}", dest) end
end
"""


def with_served_report(spec: envoy.EnvoySpec, build=envoy.envoy_config) -> dict[str, Any]:
    cfg = build(spec)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    lua = {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": REPORT_SERVED}}}
    hcm["http_filters"].insert(len(hcm["http_filters"]) - 1, lua)  # after ext_proc, before the router
    return cfg


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(envoy, "envoy_config", with_served_report)
        with LocalStack(pods=3, sim_args=SIM_ARGS, epp_args=["--config-text", CONFIG]) as s:
            yield s


def post(stack: LocalStack, headers: dict[str, str]) -> httpx.Response:
    body = {"model": MODEL, "prompt": "Write as if you were a critic: San Francisco", "max_tokens": 2}
    return httpx.post(f"{stack.url}/v1/completions", json=body, headers=headers, timeout=30)


def test_the_selection_header_pins_each_endpoint_and_the_served_one_is_echoed(stack):
    for target in [*stack.endpoints, *reversed(stack.endpoints)]:
        r = post(stack, {SELECTION_HEADER: target})
        assert r.status_code == 200, r.text[:300]
        assert r.headers[DECISION_HEADER] == target
        assert r.headers[SERVED_HEADER] == target


def test_no_selection_header_no_endpoint(stack):
    r = post(stack, {})
    assert r.status_code >= 400
    assert SERVED_HEADER not in r.headers
