"""End-to-end fixtures: real processes on loopback (simulated vLLM pods, EPP, Envoy 1.40)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from epp.stack.local import LocalStack
from epp.stack.tour import MODEL

SIM_ARGS = ["--profile", "fast", "--model", MODEL, "--step-fixed-ms", "5"]  # 5 ms per decode step
# Gateway policies of policy_stack: Envoy sets these headers on these path prefixes (after stripping any
# client's copy); the prefix is removed before the request goes to the pod.
POLICIES = {"/rewrite-to-model/": {"x-gateway-model-name-rewrite": MODEL},
            "/interactive/": {"x-gateway-inference-objective": "interactive"}}


@pytest.fixture(scope="package")
def stack() -> Iterator[LocalStack]:
    """The default deployment: ORIGINAL_DST upstream, response bodies through EPP, TLS to EPP."""
    with LocalStack(pods=3, sim_args=SIM_ARGS) as s:
        yield s


@pytest.fixture(scope="package")
def stack_no_bodies() -> Iterator[LocalStack]:
    """The cheap deployment: response_body_mode NONE, override_host upstream, plaintext to EPP."""
    with LocalStack(pods=3, sim_args=SIM_ARGS, response_body_mode="NONE", upstream="override_host",
                    tls=False) as s:
        yield s


@pytest.fixture(scope="package")
def policy_stack() -> Iterator[LocalStack]:
    """A gateway that sets the model-rewrite and objective headers itself (POLICIES) and an EPP that trusts
    them (--trust-model-rewrite-header, --trust-objective-header): only Envoy's strip keeps clients' copies
    away from EPP."""
    with LocalStack(pods=2, sim_args=SIM_ARGS, route_headers=POLICIES,
                    epp_args=["--trust-model-rewrite-header", "--trust-objective-header"]) as s:
        yield s
