"""Prefill/decode pods on loopback for the P/D tests and bench: one simulator process per role (so the
prefill pods can die alone), and a static endpoints file labelling each pod with ``llm-d.ai/role``.

::

    with PdPods(prefill=1, decode=2, sim_args=[...]) as pods, \\
            LocalStack(sim_endpoints=pods.endpoints, epp_args=pods.epp_args()) as stack:
        ...  # pods.kill("prefill") to take the prefill pods away
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from epp.stack.local import HOST, ManagedProcess, free_port_range

ROLE_LABEL = "llm-d.ai/role"
EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "manifests/examples/pd-disaggregation.yaml"


class PdPods:
    def __init__(self, prefill: int = 1, decode: int = 2, sim_args: list[str] | None = None,
                 decode_role: str = "decode") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="epp-pd-"))
        self.sim_args = list(sim_args or ["--profile", "fast"])
        self.groups: dict[str, tuple[str, list[str]]] = {}  # role -> (sim role, endpoints)
        for role, n, sim_role in (("prefill", prefill, "prefill"), ("decode", decode, decode_role)):
            if n:
                base = free_port_range(n)
                self.groups[role] = (sim_role, [f"{HOST}:{base + i}" for i in range(n)])
        self.procs: dict[str, ManagedProcess] = {}
        self.endpoints_file = self.dir / "endpoints.yaml"

    @property
    def endpoints(self) -> list[str]:
        return [e for _, eps in self.groups.values() for e in eps]

    def role_endpoints(self, role: str) -> list[str]:
        return self.groups[role][1] if role in self.groups else []

    def epp_args(self, config: Path | str = EXAMPLE_CONFIG) -> list[str]:
        return ["--static-endpoints-file", str(self.endpoints_file), "--config-file", str(config)]

    def start(self) -> PdPods:
        items = []
        for role, (sim_role, eps) in self.groups.items():
            port = int(eps[0].rsplit(":", 1)[1])
            proc = ManagedProcess(f"sim-{role}", [
                sys.executable, "-m", "epp_sim", "--pods", str(len(eps)), "--host", HOST, "--base-port", str(port),
                "--roles", ",".join([sim_role] * len(eps)), *self.sim_args], self.dir)
            self.procs[role] = proc
            proc.start()
            items += [{"address": HOST, "port": int(e.rsplit(":", 1)[1]), "name": f"{role}-{i}",
                       "labels": {ROLE_LABEL: sim_role}} for i, e in enumerate(eps)]
        for proc in self.procs.values():
            proc.wait_for_log("sim ready", 30)
        self.endpoints_file.write_text(yaml.safe_dump({"endpoints": items}, sort_keys=False))
        return self

    def kill(self, role: str) -> None:
        """Stop the pods of ``role`` at once (SIGKILL: a crashed node)."""
        proc = self.procs.get(role)
        if proc is not None and proc.proc is not None and proc.alive():
            proc.proc.kill()
            proc.proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PdPods:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
