"""End to end: fake API server + simulated vLLM pods + EPP (``--pool-name``, kubeconfig) + a real Envoy.

A pod turns unready while requests flow through Envoy: once EPP has applied the update, no request is
sent to that pod, and no request is lost on the way (``x-served-by`` names the pod that answered).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from epp.stack.local import HOST, LocalStack
from tests.k8s.fakeapi import ThreadedFakeKube, inference_pool, pod

MODEL = "demo-model"
ACTIVE = "inference.networking.k8s.io/active-ports"


class PoolStack(LocalStack):
    """LocalStack whose EPP finds its endpoints through Kubernetes instead of ``--static-endpoints``."""

    def epp_argv(self) -> list[str]:
        argv = super().epp_argv()
        if "--static-endpoints" in argv:
            i = argv.index("--static-endpoints")
            del argv[i:i + 2]
        return argv


@dataclass
class Outcome:
    started: float
    status: int
    served_by: str


def _sim_pod(i: int, port: int, ready: bool = True) -> dict:
    # Every simulated pod listens on 127.0.0.1 at its own port: one pod object per port, the active-ports
    # annotation tells EPP which of the pool's target ports is this pod's.
    return pod(f"sim-{i}", HOST, labels={"app": "sim"}, ready=ready, annotations={ACTIVE: str(port)})


@pytest.fixture
def fake_kube(tmp_path, monkeypatch):
    kube = ThreadedFakeKube()
    monkeypatch.setenv("KUBECONFIG", str(kube.kube.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield kube
    kube.stop()


def test_pod_turns_unready_under_load(fake_kube):
    stack = PoolStack(pods=3, sim_args=["--profile", "fast", "--model", MODEL],
                      epp_args=["--pool-name", "vllm", "--pool-namespace", "default", "--drain-timeout", "0s"])
    ports = [stack.sim_base + i for i in range(3)]
    k = fake_kube.kube
    fake_kube.call(k.apply, inference_pool("vllm", selector={"app": "sim"}, ports=ports))
    for i, port in enumerate(ports):
        fake_kube.call(k.apply, _sim_pod(i, port))
    victim = f"{HOST}:{ports[1]}"

    outcomes: list[Outcome] = []
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=stack.url, timeout=10) as client:
            for _ in range(2000):  # bounded, whatever happens
                if stop.is_set():
                    return
                started = time.monotonic()
                try:
                    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
                    with lock:
                        outcomes.append(Outcome(started, r.status_code, r.headers.get("x-served-by", "")))
                except httpx.HTTPError as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")

    with stack, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(worker) for _ in range(4)]
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and sum(o.served_by == victim for o in outcomes) < 5:
                time.sleep(0.05)
            assert any(o.served_by == victim for o in outcomes), "the victim never got traffic before"
            fake_kube.call(k.apply, _sim_pod(1, ports[1], ready=False))
            assert stack.epp is not None
            stack.epp.wait_for_log("2 endpoints (+0 -1)", timeout=10)
            applied = time.monotonic()  # EPP has dropped the pod by now (we saw its log line)
            while time.monotonic() < applied + 1.5:
                time.sleep(0.05)
        finally:
            stop.set()
            for f in futures:
                f.result(timeout=30)

    assert not errors, errors[:5]
    after = [o for o in outcomes if o.started > applied]
    assert len(after) >= 20, f"too few requests after the update: {len(after)}"
    assert all(o.status == 200 for o in outcomes), {o.status for o in outcomes}
    assert not [o for o in after if o.served_by == victim], "a request went to the unready pod"
    assert {o.served_by for o in after} == {f"{HOST}:{ports[0]}", f"{HOST}:{ports[2]}"}
