"""Health in every state, graceful drain, config reload and the debug endpoints, on an EPP embedded
in the test's event loop (real gRPC and HTTP servers on loopback, no Envoy)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import aiohttp
import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.cli import parse_args
from epp.config import Config
from epp.datalayer.pool import EndpointPool
from epp.director import Director
from epp.extproc.stream import StreamOptions
from epp.health import EXT_PROC_SERVICE, HealthServicer
from epp.observability.instrument import TimedScorer
from epp.reload import ConfigReloader, FileWatcher
from epp.scheduling.config import load_config
from epp.server import EppServer
from tests.extproc_helpers import body_msg, headers_msg

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NAMES = ["readiness", "", EXT_PROC_SERVICE, "inference-extension"]
REQ = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 4}).encode()

CONFIG_A = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
dataLayer: {sources: []}
plugins:
- type: queue-scorer
- type: max-score-picker
"""
CONFIG_B = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
dataLayer: {sources: []}
plugins:
- type: kv-cache-utilization-scorer
- type: random-picker
"""
BROKEN = CONFIG_A + "- type: no-such-plugin\n"


# -- health, on its own -----------------------------------------------------------------------------

@pytest.fixture
async def health():
    servicer = HealthServicer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, health_pb2_grpc.HealthStub(channel)
    servicer.close()
    await channel.close()
    await server.stop(0)


async def check(stub, service: str) -> int:
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


async def test_health_in_every_state(health):
    servicer, stub = health
    ready = False
    servicer.ready = lambda: ready
    assert servicer.state == "starting"
    assert await check(stub, "liveness") == SERVING
    for name in NAMES:
        assert await check(stub, name) == NOT_SERVING, name

    ready = True
    assert servicer.state == "serving"
    for name in ["liveness", *NAMES]:
        assert await check(stub, name) == SERVING, name

    servicer.draining = True
    assert servicer.state == "draining"
    assert await check(stub, "liveness") == SERVING  # a draining pod is alive: no restart
    for name in NAMES:
        assert await check(stub, name) == NOT_SERVING, name
    assert servicer.not_serving_answers == len(NAMES)

    listed = await stub.List(health_pb2.HealthListRequest(), timeout=5)
    assert {k: v.status for k, v in listed.statuses.items()} == {
        "liveness": SERVING, "readiness": NOT_SERVING, EXT_PROC_SERVICE: NOT_SERVING}


async def test_unknown_service_names_with_leader_election(health):
    servicer, stub = health
    servicer.ready = lambda: True
    servicer.strict_names = True
    assert await check(stub, "inference-extension") == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    for name in ["liveness", "readiness", "", EXT_PROC_SERVICE]:
        assert await check(stub, name) == SERVING, name


async def test_a_failing_readiness_probe_is_not_serving(health):
    servicer, stub = health
    servicer.ready = lambda: 1 / 0
    assert await check(stub, "readiness") == NOT_SERVING


async def test_watch_streams_each_change_and_ends_on_close(health):
    servicer, stub = health
    ready = False
    servicer.ready = lambda: ready
    call = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=30)
    assert (await call.read()).status == NOT_SERVING
    ready = True  # polled: seen within a second or so
    assert (await asyncio.wait_for(call.read(), 10)).status == SERVING
    servicer.draining = True  # pushed at once
    assert (await asyncio.wait_for(call.read(), 10)).status == NOT_SERVING
    servicer.close()
    assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF


# -- an embedded EPP ------------------------------------------------------------------------------

def make_cfg(**kw) -> Config:
    base = dict(host="127.0.0.1", grpc_port=0, grpc_health_port=0, metrics_port=0, secure_serving=False,
                static_endpoints="127.0.0.1:9,127.0.0.1:10", config_text=CONFIG_A, debug_endpoints=True)
    base.update(kw)
    return Config(**base)


@pytest.fixture
async def epp():
    servers: list[EppServer] = []

    async def start(**kw) -> EppServer:
        server = EppServer(make_cfg(**kw))
        await server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        if not getattr(s, "_stopped_in_test", False):
            await s.stop(0)


class ExtProc:
    """An ext_proc client speaking to the embedded server like Envoy does."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.ExternalProcessorStub(self.channel)

    async def open(self):
        call = self.stub.Process(timeout=30)
        await call.write(headers_msg())
        return call

    @staticmethod
    async def finish(call) -> str:
        await call.write(body_msg(REQ))
        first = await asyncio.wait_for(call.read(), 10)
        await call.done_writing()
        while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
            pass
        return first.request_headers.response.header_mutation.set_headers[0].header.raw_value.decode()

    async def close(self) -> None:
        await self.channel.close()


async def test_start_builds_and_wires_only_declared_state(epp):
    """``start`` is the one place that builds and wires: the server and the director gain no attribute their
    constructors did not declare, and the pieces are connected to each other."""
    declared = set(vars(EppServer(make_cfg())))
    server = await epp()
    assert set(vars(server)) == declared
    unit = server.routing
    pool = EndpointPool()
    assert set(vars(unit.director)) == set(vars(Director(pool, load_config(CONFIG_A, pool))))
    assert unit.director.hooks is unit.hooks and server.servicer is not None and unit.reloader is None
    rt = unit.metrics.runtime
    assert rt.streams() == 0 and rt.draining() is False and rt.config() is unit.director.config
    assert rt.staleness_threshold == server.cfg.metrics_staleness_threshold
    assert server.health.ready() and not server.health.strict_names
    assert EppServer(make_cfg(ha_enable_leader_election=True)).health.strict_names  # GIE, with leader election


async def test_metrics_staleness_flag_reaches_the_scorers_and_the_metrics(epp, tmp_path):
    """--metrics-staleness-threshold is the threshold of a scorer configured without its own, at start and after a
    live reload, and the one epp_endpoint_metrics_stale uses."""
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_A)
    flag = parse_args(["--static-endpoints=127.0.0.1:9", "--metrics-staleness-threshold=500ms"])
    server = await epp(config_file=str(path), config_text="",
                       metrics_staleness_threshold=flag.metrics_staleness_threshold)
    unit = server.routing
    assert unit.director.config.plugins["queue-scorer"].staleness == 0.5
    assert unit.metrics.runtime.staleness_threshold == 0.5
    replace(path, CONFIG_B)
    assert unit.reloader is not None and unit.reloader.check()
    assert unit.director.config.plugins["kv-cache-utilization-scorer"].staleness == 0.5


async def test_drain_serves_old_and_new_streams_then_exits_once_quiet(epp):
    server = await epp()
    client = ExtProc(server.grpc_port)
    health = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}"))
    try:
        inflight = await client.open()
        await asyncio.sleep(0.1)
        assert server.servicer.active_streams == 1
        drain = asyncio.create_task(server.drain(timeout=60, quiet_period=0.3))
        await asyncio.sleep(0.1)
        assert await check(health, "readiness") == NOT_SERVING
        assert await check(health, "liveness") == SERVING
        # A new stream during the drain is served (the proxy has not moved away yet).
        late = await client.open()
        assert (await ExtProc.finish(late)).startswith("127.0.0.1:")
        await asyncio.sleep(0.6)
        assert not drain.done()  # a stream is still open: no exit
        assert (await ExtProc.finish(inflight)).startswith("127.0.0.1:")
        t0 = time.monotonic()
        await asyncio.wait_for(drain, 20)
        assert time.monotonic() - t0 >= 0.25  # the quiet period was honoured
        server._stopped_in_test = True
        with pytest.raises(grpc.aio.AioRpcError):
            await check(health, "liveness")
    finally:
        await client.close()


async def test_drain_without_quiet_period_serves_the_whole_timeout(epp):
    server = await epp()
    t0 = time.monotonic()
    await server.drain(timeout=1.0, quiet_period=0)
    assert time.monotonic() - t0 >= 0.95
    server._stopped_in_test = True


async def test_quiet_period_waits_for_a_probe_told_not_serving(epp):
    """Nobody has been told to move away yet: an idle EPP keeps serving until a probe learns it."""
    server = await epp()
    drain = asyncio.create_task(server.drain(timeout=30, quiet_period=0.2))
    await asyncio.sleep(0.8)
    assert not drain.done()
    health = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    assert await check(health, EXT_PROC_SERVICE) == NOT_SERVING  # Envoy's check, on the ext_proc port
    await asyncio.wait_for(drain, 20)
    server._stopped_in_test = True


async def test_second_signal_hurries_the_drain(epp):
    server = await epp()
    hurry = asyncio.Event()
    drain = asyncio.create_task(server.drain(timeout=60, hurry=hurry))
    await asyncio.sleep(0.2)
    hurry.set()
    await asyncio.wait_for(drain, 10)
    server._stopped_in_test = True


# -- config reload --------------------------------------------------------------------------------

def replace(path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_file_watcher_sees_atomic_and_in_place_changes(tmp_path, caplog):
    path = tmp_path / "f.yaml"
    path.write_text("one")
    seen: list[str] = []
    w = FileWatcher(path, seen.append)
    assert w.check() and seen == ["one"]
    assert not w.check()
    replace(path, "two")
    assert w.check() and seen[-1] == "two"
    st = path.stat()
    path.write_text("six")  # same size, in place
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert w.check() and seen[-1] == "six"
    path.unlink()
    with caplog.at_level(logging.ERROR):
        assert not w.check() and not w.check()
    assert sum("cannot be read" in r.getMessage() for r in caplog.records) == 1


def test_reloader_applies_valid_and_refuses_invalid(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_A)
    applied = []
    r = ConfigReloader(path, load_config, applied.append)
    r.started_with(CONFIG_A)
    assert not r.check()
    replace(path, CONFIG_B)
    assert r.check() and r.generation == 2 and len(applied) == 1
    assert sorted(applied[0].plugins) == ["kv-cache-utilization-scorer", "random-picker", "single-profile-handler"]
    with caplog.at_level(logging.ERROR):
        replace(path, BROKEN)
        r.check()
    assert len(applied) == 1 and r.generation == 2 and "no-such-plugin" in r.last_error
    line = next(rec.getMessage() for rec in caplog.records if "rejected" in rec.getMessage())
    assert "keeping the configuration in force" in line and "no-such-plugin" in line
    replace(path, CONFIG_B + "\n")  # whitespace only, but a new text: loaded again
    assert r.check() and r.generation == 3 and r.last_error is None


def test_reloader_notices_a_change_made_during_start_up(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_B)  # the server loaded A, then the file changed before the watcher started
    applied = []
    r = ConfigReloader(path, load_config, applied.append)
    r.started_with(CONFIG_A)
    assert r.check() and len(applied) == 1


async def test_live_reload_swaps_the_config_and_keeps_plugin_timings(epp, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_A)
    server = await epp(config_file=str(path), config_text="")
    before = server.routing.director.config
    replace(path, CONFIG_B)
    assert server.routing.reloader.check()
    after = server.routing.director.config
    assert after is not before and after.scheduler.profiles["default"].picker.name == "random-picker"
    assert all(isinstance(s, TimedScorer) for s, _ in after.scheduler.profiles["default"].scorers)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.metrics_port}/debug/endpoints") as r:
            view = await r.json()
        async with http.get(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
            text = await r.text()
    assert view["config"]["generation"] == 2 and view["config"]["profiles"]["default"]["picker"] == "random-picker"
    assert 'epp_config_reloads_total{result="success"} 1.0' in text


# -- debug endpoints ------------------------------------------------------------------------------

async def test_debug_endpoints_and_page(epp):
    server = await epp()
    client = ExtProc(server.grpc_port)
    for _ in range(3):
        await ExtProc.finish(await client.open())
    await client.close()
    base = f"http://127.0.0.1:{server.metrics_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/debug/endpoints") as r:
            eps = await r.json()
        async with http.get(base + "/debug/decisions?limit=2") as r:
            dec = await r.json()
        async with http.get(base + "/debug/decisions?limit=x") as r:
            assert r.status == 400
        async with http.get(base + "/debug") as r:
            page = await r.text()
            assert r.status == 200 and r.content_type == "text/html"
    assert eps["state"] == "serving" and eps["decisions"] == 3 and eps["streams"] == 0
    assert [e["name"] for e in eps["endpoints"]] == ["127.0.0.1:9", "127.0.0.1:10"]
    assert sum(e["picks"] for e in eps["endpoints"]) == 3
    e0 = eps["endpoints"][0]
    assert e0["metrics_age_s"] is None and e0["stale"] is True and e0["inflight"] == 0
    assert dec["total"] == 3 and len(dec["decisions"]) == 2 and dec["decisions"][0]["model"] == "m"
    assert 'id="decisions-total"' in page and "/debug/endpoints" in page


async def test_debug_endpoints_can_be_turned_off(epp):
    server = await epp(debug_endpoints=False)
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{server.metrics_port}/debug") as r:
        assert r.status == 404


def test_operability_flags():
    from epp.cli import parse_args

    cfg = parse_args(["--static-endpoints", "10.0.0.1:8000"])
    assert cfg.tracing is None and cfg.explain_decisions is False and cfg.explain_token == ""
    assert cfg.drain_timeout == 30 and cfg.drain_quiet_period == 0 and cfg.debug_endpoints is False
    cfg = parse_args(["--static-endpoints", "10.0.0.1:8000", "--tracing=false", "--explain-decisions",
                      "--explain-token", "t" * 20, "--drain-timeout=1m", "--drain-quiet-period", "500ms",
                      "--debug-endpoints"])
    assert cfg.tracing is False and cfg.explain_decisions is True and cfg.explain_token == "t" * 20
    assert cfg.drain_timeout == 60 and cfg.drain_quiet_period == pytest.approx(0.5) and cfg.debug_endpoints is True
    assert parse_args(["--static-endpoints", "10.0.0.1:8000", "--tracing"]).tracing is True
    with pytest.raises(SystemExit):
        parse_args(["--static-endpoints", "10.0.0.1:8000", "--drain-quiet-period=-1"])


async def test_limit_flags_reach_every_stream(epp):
    cfg = parse_args(["--static-endpoints=127.0.0.1:9", "--max-request-body-bytes=1000", "--max-json-depth=5",
                      "--max-request-messages=3", "--max-prompt-chars=40", "--max-prompt-tokens=7",
                      "--max-request-body-chunks=9", "--max-buffered-body-bytes=5000", "--trust-objective-header",
                      "--trust-model-rewrite-header"])
    server = await epp(**{k: getattr(cfg, k) for k in (
        "max_request_body_bytes", "max_json_depth", "max_request_messages", "max_prompt_chars", "max_prompt_tokens",
        "max_request_body_chunks", "max_buffered_body_bytes", "trust_objective_header", "trust_model_rewrite_header")})
    options = server.servicer.options
    assert options.budget is not None and options.budget.limit == 5000
    options.budget = None
    assert options == StreamOptions(max_body_bytes=1000, max_json_depth=5, max_messages=3, max_prompt_chars=40,
                                    max_prompt_tokens=7, max_body_chunks=9, trust_objective_header=True,
                                    trust_rewrite_header=True)
