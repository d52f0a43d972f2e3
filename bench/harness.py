"""Processes the benchmarks run on loopback: the simulated pods (started once, shared by every target), the
targets in front of them (Envoy round robin, Envoy + EPP, vllm-router), and CPU accounting from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from epp.scheduling.config import GIE_DEFAULT_CONFIG
from epp.stack import procs
from epp.stack.envoy import EnvoyProcess, EnvoySpec
from epp.stack.local import HOST, LocalStack, ManagedProcess, free_port, free_port_range

PREFIX_ONLY_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
"""

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting ---------------------------------------------------------------------------------------
def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def box_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return float(sum(parts) - idle), float(sum(parts))


@dataclass
class CpuMeter:
    """CPU % (100 = one core) of named processes and of the whole box between start() and stop()."""

    pids: dict[str, int]
    _t0: float = 0.0
    _cpu0: dict[str, float] = field(default_factory=dict)
    _box0: tuple[float, float] = (0.0, 0.0)

    def start(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._cpu0 = {n: proc_cpu_seconds(p) for n, p in self.pids.items()}
        self._box0 = box_cpu()
        return self

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._t0, 1e-9)
        out = {n: round(100 * (proc_cpu_seconds(p) - self._cpu0[n]) / wall, 1) for n, p in self.pids.items()}
        busy, total = box_cpu()
        ncpu = os.cpu_count() or 1
        out["box"] = round(100 * ncpu * (busy - self._box0[0]) / max(total - self._box0[1], 1.0), 1)
        # everything else on the machine (other jobs sharing it): the noise to read results against
        out["others"] = round(max(0.0, out["box"] - sum(v for k, v in out.items() if k != "box")), 1)
        return out


# -- the simulated pods -----------------------------------------------------------------------------------
class SimPods:
    """``python -m epp_sim`` serving ``n`` pods on consecutive loopback ports, with async helpers to reset their
    prefix caches, wait for them to be idle and read their prefix-cache counters."""

    def __init__(self, n: int, sim_args: list[str], log_dir: Path, kv_events: bool = False) -> None:
        self.n = n
        self.base = free_port_range(n)
        self.endpoints = [f"{HOST}:{self.base + i}" for i in range(n)]
        self.kv_event_endpoints: list[str] = []
        if kv_events:
            # vLLM-style ZMQ publishers, one port per pod, on vLLM's default (empty) topic and in the tagged-map
            # form vllm-router's kv_aware index decodes (it drops positional events and other topics).
            ev = free_port_range(n)
            self.kv_event_endpoints = [f"tcp://{HOST}:{ev + i}" for i in range(n)]
            sim_args = [*sim_args, "--kv-events", f"tcp://*:{ev}", "--kv-events-topic", "",
                        "--kv-events-encoding", "map"]
        self.sim_args = sim_args
        self.proc = ManagedProcess("sim", [sys.executable, "-m", "epp_sim", "--pods", str(n), "--host", HOST,
                                           "--base-port", str(self.base), *sim_args], log_dir)

    def start(self) -> SimPods:
        self.proc.log_path.unlink(missing_ok=True)  # wait_for_log must not find an earlier run's line
        self.proc.start()
        self.proc.wait_for_log("sim ready", 60)
        return self

    def stop(self) -> None:
        self.proc.stop()

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    async def state(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async def one(ep: str) -> dict[str, Any]:
            async with http.get(f"http://{ep}/sim/state") as r:
                return await r.json()
        return list(await asyncio.gather(*(one(ep) for ep in self.endpoints)))

    async def timings(self, http: aiohttp.ClientSession) -> dict[str, tuple[float, float | None]]:
        """Arrival and first-token times (monotonic) of the requests the pods timed since the last call, by
        ``x-bench-id`` (bench/client.py sends it; the pods hand each record over once)."""
        async def one(ep: str) -> list[list[Any]]:
            async with http.get(f"http://{ep}/sim/timings") as r:
                return (await r.json())["timings"]
        return {bid: (arrival, first) for rows in await asyncio.gather(*(one(ep) for ep in self.endpoints))
                for bid, arrival, first in rows}

    async def busy(self, http: aiohttp.ClientSession) -> float:
        """Seconds the pods' engines have spent in steps (the simulated GPUs' busy time), summed."""
        return sum(s["busy_s"] for s in await self.state(http))

    async def counters(self, http: aiohttp.ClientSession) -> dict[str, float]:
        """Prefix-cache and other counters summed over pods, read from /metrics as a scraper would."""
        wanted = {"vllm:prefix_cache_queries_total": "queries", "vllm:prefix_cache_hits_total": "hits",
                  "vllm:num_preemptions_total": "preemptions", "vllm:prompt_tokens_total": "prompt_tokens",
                  "vllm:generation_tokens_total": "generation_tokens",
                  # server-side TTFT and queue time: what the pods saw, without the proxies in between
                  "vllm:time_to_first_token_seconds_sum": "ttft_sum",
                  "vllm:time_to_first_token_seconds_count": "ttft_count",
                  "vllm:request_queue_time_seconds_sum": "queue_sum",
                  "vllm:request_queue_time_seconds_count": "queue_count"}

        async def one(ep: str) -> dict[str, float]:
            async with http.get(f"http://{ep}/metrics") as r:
                text = await r.text()
            out: dict[str, float] = {}
            for line in text.splitlines():
                if not line or line[0] == "#":
                    continue
                name = line.split("{", 1)[0].split(" ", 1)[0]
                key = wanted.get(name)
                if key:
                    out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
            return out

        total: dict[str, float] = dict.fromkeys(wanted.values(), 0.0)
        for d in await asyncio.gather(*(one(ep) for ep in self.endpoints)):
            for k, v in d.items():
                total[k] += v
        return total

    async def wait_idle(self, http: aiohttp.ClientSession, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = await self.state(http)
            if all(s["running"] == 0 and s["waiting"] == 0 for s in states):
                return True
            await asyncio.sleep(0.2)
        return False

    async def reset_prefix_caches(self, http: aiohttp.ClientSession) -> None:
        async def one(ep: str) -> None:
            async with http.post(f"http://{ep}/sim/control", json={"reset_prefix_cache": True}) as r:
                r.raise_for_status()
        await asyncio.gather(*(one(ep) for ep in self.endpoints))


# -- targets ----------------------------------------------------------------------------------------------
class Target:
    """Something that routes requests to the shared pods; ``url`` is where clients send them."""

    name: str
    description: str
    url: str

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        raise NotImplementedError

    async def audit(self, http: aiohttp.ClientSession) -> dict[str, Any] | None:
        """The router's own account of its predictions, when it keeps one (EPP: /debug/endpoints)."""
        return None


class EnvoyRoundRobin(Target):
    """Envoy's own round robin over the pods (the baseline listener of our Envoy config), no ext_proc."""

    def __init__(self, endpoints: list[str], name: str = "envoy-rr") -> None:
        self.name = name
        self.description = "Envoy, ROUND_ROBIN cluster, no ext_proc"
        self.endpoints = endpoints

    def start(self) -> None:
        # The ext_proc port is never served: the baseline listener does not use it.
        self.envoy = EnvoyProcess(EnvoySpec(listen_port=free_port(), admin_port=free_port(),
                                            extproc_port=free_port(), endpoints=self.endpoints,
                                            baseline_port=free_port()))
        self.envoy.start()
        self.url = f"http://{HOST}:{self.envoy.spec.baseline_port}"

    def stop(self) -> None:
        self.envoy.stop()

    def pids(self) -> dict[str, int]:
        assert self.envoy.proc is not None
        return {"envoy": self.envoy.proc.pid}


class EnvoyEpp(Target):
    """Envoy + EPP (ext_proc) in front of the shared pods; ``config_text`` None is EPP's default config."""

    def __init__(self, endpoints: list[str], name: str, config_text: str | None = None,
                 response_body_mode: str = "FULL_DUPLEX_STREAMED", baseline: bool = False,
                 epp_args: list[str] | None = None) -> None:
        self.name = name
        self.description = f"Envoy + EPP ({'default config' if config_text is None else 'custom config'}, " \
                           f"response_body_mode {response_body_mode})"
        args = list(epp_args or [])
        if config_text is not None:
            args += ["--config-text", config_text]
        self.stack = LocalStack(sim_endpoints=endpoints, epp_args=args, response_body_mode=response_body_mode,
                                baseline=baseline)

    def start(self) -> None:
        self.stack.start()
        self.url = self.stack.url

    def stop(self) -> None:
        self.stack.cleanup()

    def pids(self) -> dict[str, int]:
        assert self.stack.epp is not None and self.stack.epp.proc is not None
        assert self.stack.envoy is not None and self.stack.envoy.proc is not None
        return {"epp": self.stack.epp.proc.pid, "envoy": self.stack.envoy.proc.pid}

    async def audit(self, http: aiohttp.ClientSession) -> dict[str, Any] | None:
        """EPP's prediction audit (predicted vs reported cached tokens, predicted vs seen TTFT) and the
        characters per token and what its plugins learned, read from /debug/endpoints after the run."""
        try:
            async with http.get(f"http://{HOST}:{self.stack.metrics_port}/debug/endpoints",
                                timeout=aiohttp.ClientTimeout(total=10)) as r:
                doc = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return {"predictions": doc.get("predictions"), "chars_per_token": doc.get("chars_per_token"),
                "learned": doc.get("plugins")}


PRECISE_EXAMPLE = Path(__file__).parents[1] / "manifests" / "examples" / "precise-prefix.yaml"


class EnvoyEppPrecise(EnvoyEpp):
    """EPP with the shipped ``precise-prefix.yaml``, fed by the pods' KV events (each pod's publisher named in a
    static endpoints file, as on a real deployment with per-pod ports). With the pods' ``tokenizer`` (a file or a
    name the simulator knows) EPP tokenizes itself, as the pods do; without, each pod renders the prompt."""

    def __init__(self, endpoints: list[str], kv_event_endpoints: list[str], tokenizer: str | None = None,
                 name: str = "epp-precise") -> None:
        import yaml

        from epp_sim.model_files import write_model_dir

        self.dir = Path(tempfile.mkdtemp(prefix="epp-precise-"))
        doc = yaml.safe_load(PRECISE_EXAMPLE.read_text())
        if tokenizer:
            doc["plugins"][0]["parameters"]["tokenizer"] = str(write_model_dir(self.dir / "model", tokenizer))
        lines = []
        for ep, zmq in zip(endpoints, kv_event_endpoints, strict=True):
            host, port = ep.rsplit(":", 1)
            lines.append(f"- {{address: '{host}', port: {port}, kvEventsEndpoint: '{zmq}'}}")
        (self.dir / "endpoints.yaml").write_text("endpoints:\n" + "\n".join(lines) + "\n")
        super().__init__(endpoints, name, config_text=yaml.safe_dump(doc, sort_keys=False),
                         epp_args=["--static-endpoints-file", str(self.dir / "endpoints.yaml")])
        how = "EPP tokenizes (the pods' tokenizer.json and chat template)" if tokenizer else "the pods render"
        self.description = f"Envoy + EPP, precise-prefix.yaml (the pods' KV events over ZMQ; {how})"

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def vllm_router_binary() -> str | None:
    return shutil.which("vllm-router") or shutil.which("vllm-router", path=str(Path(sys.executable).parent))


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


class VllmRouter(Target):
    """The vllm-project/router (PyPI ``vllm-router``, a Rust router) as a subprocess on loopback.

    ``kv_event_endpoints`` (one ZMQ endpoint per pod, in ``endpoints`` order) feeds the ``kv_aware`` policy
    the pods' KV events: ``--kv-event-source http://pod=tcp://...`` per pod and ``--kv-event-model``. It
    also asks each pod for the prompt's token ids (``POST /v1/chat/completions/render``, else ``/tokenize``)
    before it picks."""

    program = "vllm-router"

    def __init__(self, endpoints: list[str], policy: str, name: str | None = None,
                 extra_args: list[str] | None = None, kv_event_endpoints: list[str] | None = None,
                 model: str = "") -> None:
        self.name = name or f"vllm-router-{policy.replace('_', '-')}"
        self.description = f"vllm-router {_package_version('vllm-router')} --policy {policy}"
        self.endpoints = endpoints
        self.policy = policy
        self.extra_args = list(extra_args or [])
        if kv_event_endpoints:
            for ep, zmq in zip(endpoints, kv_event_endpoints, strict=True):
                self.extra_args += ["--kv-event-source", f"http://{ep}={zmq}"]
            self.extra_args += ["--kv-event-model", model, "--kv-event-block-size", "16"]
            self.description += " (KV events from every pod over ZMQ)"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        exe = vllm_router_binary()
        if not exe:
            raise FileNotFoundError("vllm-router not installed: pip install 'epp[bench]'")
        return [exe, "--host", HOST, "--port", str(self.port), "--policy", self.policy,
                "--worker-urls", *(f"http://{ep}" for ep in self.endpoints),
                "--prometheus-host", HOST, "--prometheus-port", str(free_port()), "--log-level", "warning",
                *self.extra_args]

    def start(self) -> None:
        self.port = free_port()
        argv = self.argv()
        self.dir = Path(tempfile.mkdtemp(prefix=f"epp-{self.program}-"))
        self.log_path = self.dir / f"{self.program}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = procs.spawn(argv, stdout=self._log, stderr=subprocess.STDOUT)  # stops with the bench
        self.url = f"http://{HOST}:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.program} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.program} not ready: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, 15)
        with contextlib.suppress(AttributeError):
            self._log.close()
        shutil.rmtree(getattr(self, "dir", ""), ignore_errors=True)

    def pids(self) -> dict[str, int]:
        assert self.proc is not None
        return {"router": self.proc.pid}


class SglangRouter(VllmRouter):
    """SGLang's router (PyPI ``sglang-router``, Rust) as a subprocess: ``--policy cache_aware`` by default (its
    own default: an approximate radix tree of the request text per worker, with load balancing when the
    queues differ by more than 64 requests and a factor 1.5)."""

    program = "sglang-router"

    def __init__(self, endpoints: list[str], policy: str = "cache_aware", name: str | None = None,
                 extra_args: list[str] | None = None) -> None:
        super().__init__(endpoints, policy, name or "sglang-router", extra_args)
        self.description = f"sglang-router {_package_version('sglang-router')} --policy {policy}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "sglang_router.launch_router", "--host", HOST, "--port", str(self.port),
                "--policy", self.policy, "--worker-urls", *(f"http://{ep}" for ep in self.endpoints),
                "--prometheus-host", HOST, "--prometheus-port", str(free_port()), "--log-level", "warn",
                *self.extra_args]


def sglang_router_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("sglang_router") is not None


def make_targets(names: list[str], endpoints: list[str], kv_event_endpoints: list[str] | None = None,
                 model: str = "", tokenizer: str | None = None) -> list[Target]:
    """The quality benchmark's targets by name (see TARGETS). ``kv_event_endpoints``: the pods' ZMQ KV event
    publishers (SimPods(kv_events=True)), needed by vllm-router-kv-aware and epp-precise; ``tokenizer``: the
    pods' --tokenizer, which epp-precise tokenizes with."""
    out: list[Target] = []
    for n in names:
        if n == "envoy-rr":
            out.append(EnvoyRoundRobin(endpoints))
        elif n == "epp-default":
            out.append(EnvoyEpp(endpoints, n))
        elif n == "epp-default-none":  # optional: EPP never sees response bodies
            out.append(EnvoyEpp(endpoints, n, response_body_mode="NONE"))
        elif n == "epp-gie":  # GIE's default configuration (queue x2, kv-cache x2, prefix x3)
            t = EnvoyEpp(endpoints, n, config_text=GIE_DEFAULT_CONFIG)
            t.description = "Envoy + EPP, GIE's default configuration (--config-name gie-default)"
            out.append(t)
        elif n == "epp-prefix":
            t = EnvoyEpp(endpoints, n, config_text=PREFIX_ONLY_CONFIG)
            t.description = "Envoy + EPP (prefix-cache-scorer only, max-score-picker)"
            out.append(t)
        elif n.startswith("epp:"):  # epp:<file>: EPP with your own EndpointPickerConfig, to A/B configs
            path = Path(n.removeprefix("epp:"))
            t = EnvoyEpp(endpoints, f"epp-{path.stem}", config_text=path.read_text())
            t.description = f"Envoy + EPP ({path})"
            out.append(t)
        elif n == "epp-precise":
            if not kv_event_endpoints:
                raise ValueError("epp-precise needs pods publishing KV events (SimPods(kv_events=True))")
            out.append(EnvoyEppPrecise(endpoints, kv_event_endpoints, tokenizer, name=n))
        elif n == "vllm-router-kv-aware":
            if not kv_event_endpoints:
                raise ValueError("vllm-router-kv-aware needs pods publishing KV events (SimPods(kv_events=True))")
            out.append(VllmRouter(endpoints, "kv_aware", name=n, kv_event_endpoints=kv_event_endpoints, model=model))
        elif n.startswith("vllm-router-"):
            out.append(VllmRouter(endpoints, n.removeprefix("vllm-router-").replace("-", "_"), name=n))
        elif n == "sglang-router" or n.startswith("sglang-router-"):
            policy = n.removeprefix("sglang-router").removeprefix("-").replace("-", "_") or "cache_aware"
            out.append(SglangRouter(endpoints, policy, name=n))
        else:
            known = ", ".join((*TARGETS, *OPTIONAL_TARGETS, "epp:<config file>"))
            raise ValueError(f"unknown target {n!r} (known: {known})")
    return out


TARGETS = ("envoy-rr", "epp-default", "epp-gie", "vllm-router-cache-aware", "vllm-router-round-robin")
OPTIONAL_TARGETS = ("epp-default-none", "epp-prefix", "epp-precise", "vllm-router-power-of-two",
                    "vllm-router-consistent-hash", "vllm-router-kv-aware", "sglang-router", "sglang-router-round-robin")
# The pressure suite's: round robin, EPP's default and precise configurations, and the peers at their best policies.
PRESSURE_TARGETS = ("envoy-rr", "epp-default", "epp-precise", "epp-gie", "vllm-router-cache-aware",
                    "vllm-router-kv-aware", "sglang-router")
KV_EVENT_TARGETS = ("epp-precise", "vllm-router-kv-aware")  # the pods publish KV events when one of these runs
# Routers that are not EPP and not a cache-blind baseline: what "best peer" means in the verdicts.
PEERS = ("vllm-router-cache-aware", "vllm-router-kv-aware", "sglang-router", "vllm-router-power-of-two",
         "vllm-router-consistent-hash")
