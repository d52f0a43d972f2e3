"""GIE conformance plugins, as llm-d-router names them, so EPP can stand in for the EPP of GIE's conformance
suite. Test-only: off unless a configuration names them.

* ``header-based-testing-filter`` keeps the endpoints listed in ``test-epp-endpoint-selection`` (comma-separated
  IP or IP:port); no header, no endpoint (scheduling then fails, as in GIE).
* ``destination-endpoint-served-verifier`` echoes the endpoint the proxy reports it served the request from
  (``envoy.lb`` metadata ``x-gateway-destination-endpoint-served``) in the response header
  ``x-conformance-test-served-endpoint``.
"""

from __future__ import annotations

from epp.plugin import Endpoint, Filter, InferenceRequest, RequestObserver, ResponseInfo, register_plugin

SELECTION_HEADER = "test-epp-endpoint-selection"
SERVED_HEADER = "x-conformance-test-served-endpoint"


@register_plugin("header-based-testing-filter")
class HeaderBasedTestingFilter(Filter):
    def filter(self, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        wanted = {w.strip() for w in request.headers.get(SELECTION_HEADER, "").split(",") if w.strip()}
        return [e for e in endpoints if e.address in wanted or e.hostport in wanted]


@register_plugin("destination-endpoint-served-verifier")
class DestinationEndpointServedVerifier(RequestObserver):
    def on_response_headers(self, request: InferenceRequest, endpoint: Endpoint, response: ResponseInfo) -> None:
        if response.served_endpoint:
            request.response_headers[SERVED_HEADER] = response.served_endpoint
