"""Route safety through a real Envoy: a client can never choose where its request goes.

Each trick (a forged ``x-gateway-destination-endpoint`` aimed at Envoy's admin port, at a port nothing
pool-related listens on, at an outside address, as a fallback list, duplicated, upper-cased; a forged
subset hint; a forged served-endpoint header) is tried with EPP up, and with EPP down behind a fail-open
Envoy (override_host: round robin over the pool; ORIGINAL_DST: nothing to dial, 503). The answer always
comes from a pool pod EPP or the fallback policy chose, or is a clean refusal; never from the admin
port, never from the forged address. (Fail-closed with EPP down: test_faults_restart.py sends every
request with forged headers.)

Nor can a client choose its model, priority or prefill pod: client-sent model-rewrite, objective and
``x-prefiller-host-port`` headers are stripped before ext_proc, even in front of an EPP that trusts the
rewrite and objective headers because its gateway sets them (route policies, after the strip).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from epp.extproc.protocol import (
    DESTINATION_HEADER,
    OBJECTIVE_HEADERS,
    PREFILLER_HEADER,
    REWRITE_HEADERS,
    SERVED_KEY,
    SUBSET_KEY,
)
from epp.stack.envoy import POLICY_FILTER, STRIP_FILTER, EnvoySpec, envoy_config
from epp.stack.local import LocalStack, free_port
from epp.stack.tour import MODEL
from tests.e2e.conftest import POLICIES, SIM_ARGS

CHAT = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "where do I go?"}]}
TRICKS = ["admin-port", "unused-port", "outside-address", "fallback-list", "duplicated", "upper-case",
          "subset-outside-pool", "subset-admin", "served", "everything"]


def forged(trick: str, stack: LocalStack) -> list[tuple[str, str]]:
    admin = f"127.0.0.1:{stack.admin_port}"
    return {
        "admin-port": [(DESTINATION_HEADER, admin)],
        "unused-port": [(DESTINATION_HEADER, f"127.0.0.1:{free_port()}")],
        "outside-address": [(DESTINATION_HEADER, "10.255.255.1:80")],
        "fallback-list": [(DESTINATION_HEADER, f"{admin},{stack.endpoints[0]}")],
        "duplicated": [(DESTINATION_HEADER, admin), (DESTINATION_HEADER, admin)],
        "upper-case": [("X-Gateway-Destination-Endpoint", admin)],
        "subset-outside-pool": [(SUBSET_KEY, "10.9.9.9:80")],
        "subset-admin": [(SUBSET_KEY, admin)],
        "served": [(SERVED_KEY, admin)],
        "everything": [(DESTINATION_HEADER, admin), (SUBSET_KEY, admin), (SERVED_KEY, admin)],
    }[trick]


CONTROL_HEADERS = {*REWRITE_HEADERS, *OBJECTIVE_HEADERS, PREFILLER_HEADER}


def test_every_envoy_config_strips_client_pick_and_control_headers_before_ext_proc():
    for upstream in ("original_dst", "override_host"):
        for fail_open in (False, True):
            for body_mode in ("FULL_DUPLEX_STREAMED", "NONE"):
                for policies in ({}, POLICIES):
                    cfg = envoy_config(EnvoySpec(1, 2, 3, ["127.0.0.1:4"], upstream=upstream,
                                                 failure_mode_allow=fail_open, response_body_mode=body_mode,
                                                 route_headers=policies))
                    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
                    names = [f["name"] for f in hcm["http_filters"]]
                    assert names[0] == STRIP_FILTER and names.index("envoy.filters.http.ext_proc") > 0
                    if policies:  # the gateway's own headers are set after the strip, before ext_proc
                        assert names.index(STRIP_FILTER) < names.index(POLICY_FILTER) < names.index(
                            "envoy.filters.http.ext_proc")
                    strip = hcm["http_filters"][0]
                    removed = {m["remove"] for m in strip["typed_config"]["mutations"]["request_mutations"]}
                    assert removed >= {DESTINATION_HEADER, SUBSET_KEY, SERVED_KEY, *CONTROL_HEADERS}


# -- EPP up ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trick", TRICKS)
def test_forged_headers_are_ignored_with_epp_up(stack, trick):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        for _ in range(3):
            r = c.post("/v1/chat/completions", json=CHAT, headers=forged(trick, stack))
            assert r.status_code == 200, (r.status_code, r.text[:200])
            assert r.headers["x-served-by"] in stack.endpoints
            assert r.headers["x-served-by"] == r.headers["x-epp-endpoint"]  # EPP's own pick, nothing else
        # An admin path, header-only (routed at the headers), aimed at the admin port: a pod answers it.
        r = c.get("/server_info", headers=forged(trick, stack))
        assert r.headers.get("x-served-by") in stack.endpoints, (r.status_code, r.text[:200])
        assert "command_line_options" not in r.text


# -- EPP down, fail-open -----------------------------------------------------------------------------------


def _down(stack: LocalStack) -> LocalStack:
    stack.start()
    try:
        stack.kill_epp()
        assert stack.envoy is not None
        stack.envoy.wait_extproc_unhealthy(30)
    except BaseException:
        stack.cleanup()
        raise
    return stack


@pytest.fixture(scope="module")
def open_override_down() -> Iterator[LocalStack]:
    """Fail-open, override_host upstream, EPP dead and seen dead by Envoy: requests go round robin."""
    stack = _down(LocalStack(pods=3, sim_args=SIM_ARGS, upstream="override_host", failure_mode_allow=True))
    yield stack
    stack.cleanup()


@pytest.fixture(scope="module")
def open_original_dst_down() -> Iterator[LocalStack]:
    """Fail-open, ORIGINAL_DST upstream, EPP dead: with no pick there is nothing Envoy may dial."""
    stack = _down(LocalStack(pods=3, sim_args=SIM_ARGS, failure_mode_allow=True))
    yield stack
    stack.cleanup()


@pytest.mark.parametrize("trick", TRICKS)
def test_forged_headers_are_ignored_with_epp_down_fail_open_override_host(open_override_down, trick):
    stack = open_override_down
    served = set()
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        for _ in range(6):
            r = c.post("/v1/chat/completions", json=CHAT, headers=forged(trick, stack))
            assert r.status_code == 200, (r.status_code, r.text[:200])
            assert r.headers["x-served-by"] in stack.endpoints and "x-epp-endpoint" not in r.headers
            served.add(r.headers["x-served-by"])
        r = c.get("/server_info", headers=forged(trick, stack))
        assert r.headers.get("x-served-by") in stack.endpoints, (r.status_code, r.text[:200])
        assert "command_line_options" not in r.text
    assert len(served) >= 2  # the round-robin fallback, not a header, chose


@pytest.mark.parametrize("trick", TRICKS)
def test_forged_headers_are_ignored_with_epp_down_fail_open_original_dst(open_original_dst_down, trick):
    stack = open_original_dst_down
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/server_info")):
            r = c.request(method, path, json=CHAT if method == "POST" else None, headers=forged(trick, stack))
            assert r.status_code == 503, (r.status_code, r.text[:200])
            assert "x-served-by" not in r.headers and "command_line_options" not in r.text


# -- control headers: the gateway's, never a client's ----------------------------------------------------


def _received(r: httpx.Response) -> set[str]:
    """The names of the request headers the pod received (the simulator echoes them on request)."""
    return set(r.headers["x-sim-request-headers"].split(","))


@pytest.mark.parametrize("stream", [False, True])
def test_client_control_headers_never_reach_epp_or_the_pod(policy_stack, stream):
    """EPP here trusts rewrite and objective headers (its gateway sets them): had a client's copy reached
    it, the pod would get the client's model. Envoy strips them first, upper-cased and duplicated too."""
    admin = f"127.0.0.1:{policy_stack.admin_port}"
    forged = [("x-gateway-model-name-rewrite", "evil-model"), ("X-LLM-D-Model-Name-Rewrite", "evil-model"),
              ("x-gateway-inference-objective", "interactive"), ("x-llm-d-inference-objective", "interactive"),
              (PREFILLER_HEADER, admin), ("X-Prefiller-Host-Port", "10.255.255.1:80"),
              ("x-sim-echo-request", "1")]
    with httpx.Client(base_url=policy_stack.url, timeout=30) as c:
        for path in ("/v1/chat/completions", "/interactive/v1/chat/completions"):
            r = c.post(path, json={**CHAT, "stream": stream}, headers=forged)
            assert r.status_code == 200, (r.status_code, r.text[:200])
            assert r.headers["x-sim-request-model"] == MODEL and r.headers["x-served-by"] in policy_stack.endpoints
            received = _received(r)
            assert not received & (CONTROL_HEADERS - {"x-gateway-inference-objective"}), received
            # The objective reaches the pod only where the gateway sets it (the /interactive/ policy).
            assert ("x-gateway-inference-objective" in received) == path.startswith("/interactive/")
        # A model rewrite only through the gateway's policy, which a client's header cannot override.
        r = c.post("/rewrite-to-model/v1/chat/completions", json={**CHAT, "model": "client-alias"},
                   headers=[*forged, ("x-gateway-model-name-rewrite", "evil-model")])
        assert r.status_code == 200 and r.headers["x-sim-request-model"] == MODEL, r.text[:200]
        assert r.json()["model"] == "client-alias"
        assert PREFILLER_HEADER not in _received(r)
