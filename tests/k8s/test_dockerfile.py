"""The Dockerfile cannot be built here (no registry for base images), so check what can be checked: its
entry point is a real console script, it runs as a non-root user, it copies what exists, it exposes EPP's
ports, and its HEALTHCHECK one-liner really speaks gRPC health (run against a live health server)."""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from epp.config import Config
from epp.health import HealthServicer
from epp.stack.local import free_port

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        op, _, args = full.strip().partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def one(op: str) -> str:
    found = [a for o, a in instructions() if o == op]
    assert found, f"no {op}"
    return found[-1]


def test_entrypoint_is_a_console_script():
    entry = json.loads(one("ENTRYPOINT"))  # exec form, so signals reach EPP (graceful drain on SIGTERM)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry[0] in scripts, f"{entry[0]} is not in [project.scripts]"
    module, func = scripts[entry[0]].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    assert not [o for o, _ in instructions() if o == "CMD"]  # arguments come from the Deployment


def test_runs_slim_and_non_root():
    bases = [a.split()[0] for o, a in instructions() if o == "FROM"]
    assert bases and all(re.fullmatch(r"python:3\.1[1-9]-slim", b) for b in bases)
    user = one("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0  # numeric: runAsNonRoot can check it


def test_copies_exist_and_ports_are_epps():
    for op, args in instructions():
        if op == "COPY" and not args.startswith("--from"):
            for src in shlex.split(args)[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: no such file"
    d = Config()
    assert {int(p) for p in one("EXPOSE").split()} == {d.grpc_port, d.grpc_health_port, d.metrics_port}


@pytest.fixture
async def health_server():
    servicer = HealthServicer(ready=lambda: False)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    yield servicer, port, server
    await server.stop(0)


async def test_healthcheck_speaks_grpc_health(health_server):
    servicer, port, server = health_server
    args = one("HEALTHCHECK")
    cmd = json.loads(args[args.index("CMD") + 3:].strip())
    assert cmd[:2] == ["python", "-c"] and f":{Config().grpc_health_port}'" in cmd[2]
    code = cmd[2].replace(f":{Config().grpc_health_port}'", f":{port}'")

    def run() -> int:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20).returncode

    assert await asyncio.to_thread(run) == 0  # live although not ready (liveness)
    servicer.draining = True
    assert await asyncio.to_thread(run) == 0  # draining pods are still alive
    await server.stop(0)
    assert await asyncio.to_thread(run) != 0  # nothing answering: unhealthy


def test_opentelemetry_protos_win_over_the_copy_bundled_in_xds_protos():
    """Installed in one pip call, either wheel's copy of opentelemetry/proto may land last; xds-protos' old one
    breaks tracing. The image puts opentelemetry-proto's files back on top, as the Makefile does."""
    runs = [args for op, args in instructions() if op == "RUN"]
    install = next(r for r in runs if "/wheels/*.whl" in r)
    assert install.index("/wheels/*.whl") < install.index("--force-reinstall --no-deps /wheels/opentelemetry_proto-")
