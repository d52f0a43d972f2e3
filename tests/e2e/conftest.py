"""End-to-end fixtures: real processes on loopback (simulated vLLM pods, EPP, Envoy 1.40)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from epp.stack.local import LocalStack
from epp.stack.tour import MODEL

SIM_ARGS = ["--profile", "fast", "--model", MODEL, "--step-fixed-ms", "5"]  # 5 ms per decode step


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
