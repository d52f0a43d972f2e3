"""An out-of-tree plugin package (examples/epp-tenant-scorer), installed into EPP's environment, loaded by its
entry point, configured by type name, changes routing through the real Envoy."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import pytest

from epp.extproc.protocol import DECISION_HEADER
from epp.stack.local import LocalStack
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS

PACKAGE = Path(__file__).resolve().parents[2] / "examples" / "epp-tenant-scorer"
CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: tenant-scorer
  parameters: {{tenants: {{gold: ["{gold}"]}}}}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: tenant-scorer, weight: 10}}
  - {{pluginRef: queue-scorer}}
"""


def ensure_installed() -> None:
    """``make install`` installs the example; a bare environment gets it here (no dependencies, no network)."""
    try:
        metadata.distribution("epp-tenant-scorer")
    except metadata.PackageNotFoundError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        str(PACKAGE)], check=True, timeout=180)


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    ensure_installed()
    s = LocalStack(pods=3, sim_args=SIM_ARGS)
    s.epp_args = ["--config-text", CONFIG.format(gold=s.endpoints[0])]
    with s:
        yield s


def test_installed_plugin_routes_a_tenant_to_its_endpoint_and_others_elsewhere(stack):
    gold = stack.endpoints[0]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        for i in range(6):
            r = c.post("/v1/chat/completions", json=body, headers={"x-tenant": "gold"})
            assert r.status_code == 200, r.text[:300]
            assert r.headers[DECISION_HEADER] == gold
            r = c.post("/v1/chat/completions", json=body, headers={"x-tenant": "other"} if i % 2 else {})
            assert r.status_code == 200, r.text[:300]
            assert r.headers[DECISION_HEADER] != gold
