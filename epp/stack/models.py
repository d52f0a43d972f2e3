"""A local stack serving several models, each from its own simulator process (vLLM sleep mode on), behind one
EPP and a real Envoy: the rig for models at their own path prefix (``http://<envoy>/<model>/v1``), sleep and
wake. Endpoints come from a static endpoints file, so each pod can carry labels (the accelerator it shares)."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from epp.stack import dev_import
from epp.stack.local import HOST, LocalStack, ManagedProcess, free_port_range


@dataclass
class ModelServers:
    model: str  # the served model name
    pods: int = 1
    labels: list[dict[str, str]] = field(default_factory=list)  # per pod (missing: none)


@dataclass
class MultiModelStack:
    models: list[ModelServers]
    sim_args: list[str] = field(default_factory=lambda: ["--profile", "fast"])
    epp_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="epp-models-"))
        self.sims: list[ManagedProcess] = []
        self.pods: dict[str, list[str]] = {}  # served model -> host:port of its pods
        self.stack: LocalStack | None = None

    @property
    def url(self) -> str:
        assert self.stack is not None
        return self.stack.url

    def start(self) -> MultiModelStack:
        try:
            entries = []
            for i, spec in enumerate(self.models):
                base = free_port_range(spec.pods)
                sim = ManagedProcess(f"sim-{i}", [sys.executable, "-m", "epp_sim", "--pods", str(spec.pods),
                                                  "--host", HOST, "--base-port", str(base), "--model", spec.model,
                                                  *self.sim_args], self.dir)
                sim.start()
                self.sims.append(sim)
                self.pods[spec.model] = [f"{HOST}:{base + k}" for k in range(spec.pods)]
                for k in range(spec.pods):
                    labels = spec.labels[k] if k < len(spec.labels) else {}
                    entries.append({"address": HOST, "port": base + k, "name": f"{spec.model}-{k}", "labels": labels})
            for sim in self.sims:
                sim.wait_for_log("sim ready", 30)
            path = self.dir / "endpoints.yaml"
            path.write_text(yaml.safe_dump({"endpoints": entries}))
            self.stack = LocalStack(sim_endpoints=[p for pods in self.pods.values() for p in pods],
                                    epp_args=["--static-endpoints-file", str(path), *self.epp_args]).start()
            self.wait_models_known()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_models_known(self, timeout: float = 20.0) -> None:
        """Until EPP's scrapes have learned every model (the prefixes resolve only then)."""
        deadline = time.monotonic() + timeout
        for model in self.pods:
            while self.status(model).get("bootReady") is not True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"EPP has not learned model {model!r}")
                time.sleep(0.05)

    def status(self, prefix: str) -> dict:
        r = dev_import("httpx").get(f"{self.url}/{prefix}/status", timeout=10)
        return r.json() if r.status_code == 200 else {}

    def sim_state(self, hostport: str) -> dict:
        return dev_import("httpx").get(f"http://{hostport}/sim/state", timeout=10).json()["sleep"]

    def sleep(self, hostport: str, level: int = 1, timeout: float = 10.0) -> None:
        """Put a pod to sleep directly (as an operator would) and wait until EPP's scrapes see it."""
        httpx = dev_import("httpx")
        deadline = time.monotonic() + timeout
        while httpx.post(f"http://{hostport}/sleep?level={level}", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{hostport} refused to sleep")
            time.sleep(0.1)
        assert self.stack is not None
        while True:
            view = httpx.get(f"http://{HOST}:{self.stack.metrics_port}/debug/endpoints", timeout=10).json()
            if any(e["address"] == hostport and e["sleeping"] for e in view["endpoints"]):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"EPP did not see {hostport} sleep")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.cleanup()
        for sim in self.sims:
            sim.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> MultiModelStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
