"""GIE conformance plugins (plugins/conformance.py), through the harness."""

from epp.plugin import ResponseInfo
from epp.testing import Harness, endpoint, request
from epp_plugins.conformance import SELECTION_HEADER, SERVED_HEADER

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
- type: queue-scorer
"""


def pool():
    return [endpoint("a", address="10.9.0.1", port=3000), endpoint("b", address="10.9.0.2", port=3000, waiting=9),
            endpoint("c", address="10.9.0.2", port=3002, waiting=1)]


def test_the_header_pins_by_address_or_address_and_port():
    h = Harness(CONFIG, pool())
    assert h.pick(request(headers={SELECTION_HEADER: "10.9.0.2"})).name == "c"  # both of 10.9.0.2: least queue
    assert h.pick(request(headers={SELECTION_HEADER: "10.9.0.2:3000"})).name == "b"
    assert h.pick(request(headers={SELECTION_HEADER: " 10.9.0.7, 10.9.0.2:3000 "})).name == "b"
    got = h.config.plugins["header-based-testing-filter"].filter(request(), h.endpoints)
    assert got == []  # no header: no endpoint, as in GIE


def test_the_served_endpoint_is_echoed_only_when_reported():
    h = Harness(CONFIG, pool())
    verifier = h.plugin("destination-endpoint-served-verifier")
    r = request()
    verifier.on_response_headers(r, h.endpoint("a"), ResponseInfo(status=200))
    assert SERVED_HEADER not in r.response_headers
    verifier.on_response_headers(r, h.endpoint("a"), ResponseInfo(status=200, served_endpoint="10.9.0.1:3000"))
    assert r.response_headers[SERVED_HEADER] == "10.9.0.1:3000"


def test_off_unless_configured():
    h = Harness(CONFIG.replace("- type: header-based-testing-filter\n", ""), pool())
    assert h.pick(request(headers={SELECTION_HEADER: "10.9.0.2:3000"})).name == "a"
