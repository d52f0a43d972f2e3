"""Engine specs and the scraping loop, against real aiohttp servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from bench.scrape_bench import render_vllm_page, run_bench
from epp.datalayer.endpoint import EndpointMetrics
from epp.datalayer.engines import (
    BUILTIN_ENGINES,
    ENGINE_LABEL_KEY,
    EngineConfigError,
    EngineRegistry,
    EngineSpec,
    ExtractError,
)
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.datalayer.promtext import parse
from epp.datalayer.scraper import UNREACHABLE_AFTER, MetricsScraper
from epp.director import Director
from epp.scheduling.config import load_config

SGLANG_PAGE = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen",engine_type="unified"} 6.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen",engine_type="unified"} 11.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen",engine_type="unified"} 0.25
# TYPE sglang:cache_config_info gauge
sglang:cache_config_info{num_pages="123456",page_size="64"} 1.0
"""

TRTLLM_PAGE = """\
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting 2
trtllm_num_requests_running 9
trtllm_kv_cache_utilization 0.875
trtllm_kv_cache_tokens_per_block 32
trtllm_kv_cache_max_blocks 4096
"""

TRITON_PAGE = """\
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 5
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 64
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 5
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 7
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.5
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 128
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 1000
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 1000
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 2000
"""


def _extract(engine: EngineSpec, page: str) -> EndpointMetrics:
    m = EndpointMetrics()
    engine.extract(parse(page, engine.families).families).apply(m)
    return m


# ------------------------------------------------------------------------------------------- engines


def test_builtin_engine_specs_extract_their_pages():
    m = _extract(BUILTIN_ENGINES["vllm"], render_vllm_page(waiting=3, running=7, kv_usage=0.42))
    assert (m.waiting_requests, m.running_requests, m.kv_cache_usage) == (3, 7, 0.42)
    assert (m.block_size, m.num_gpu_blocks) == (16, 27865)
    m = _extract(BUILTIN_ENGINES["sglang"], SGLANG_PAGE)
    assert (m.waiting_requests, m.running_requests, m.kv_cache_usage, m.block_size, m.num_gpu_blocks) == (
        11, 6, 0.25, 64, 123456)
    m = _extract(BUILTIN_ENGINES["trtllm-serve"], TRTLLM_PAGE)
    assert (m.waiting_requests, m.running_requests, m.kv_cache_usage, m.block_size, m.num_gpu_blocks) == (
        2, 9, 0.875, 32, 4096)
    m = _extract(BUILTIN_ENGINES["triton-tensorrt-llm"], TRITON_PAGE)
    assert (m.waiting_requests, m.running_requests, m.kv_cache_usage, m.block_size, m.num_gpu_blocks) == (
        7, 5, 0.5, 128, 2000)
    assert BUILTIN_ENGINES["vllm"].families == {
        "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info", "vllm:cache_config_info", "vllm:engine_sleep_state"}


def test_vllm_sleep_state():
    def page(awake: float) -> str:
        return render_vllm_page(waiting=0, running=0, kv_usage=0.0) + "".join(
            f'vllm:engine_sleep_state{{engine="0",model_name="m",sleep_state="{state}"}} {value}\n'
            for state, value in (("awake", awake), ("weights_offloaded", 1 - awake), ("discard_all", 0.0)))

    assert _extract(BUILTIN_ENGINES["vllm"], page(0.0)).sleeping
    assert not _extract(BUILTIN_ENGINES["vllm"], page(1.0)).sleeping
    assert not _extract(BUILTIN_ENGINES["vllm"], render_vllm_page(waiting=0, running=0, kv_usage=0.0)).sleeping


def test_lora_takes_the_newest_series():
    m = _extract(BUILTIN_ENGINES["vllm"], render_vllm_page())
    assert m.active_models == {"sql-lora", "chat-lora"} and m.waiting_models == {"tweet-lora"}
    assert m.max_active_models == 4
    # everything finished: the newest series has empty adapter lists, and that is the truth now
    page = render_vllm_page(lora=False) + (
        "# TYPE vllm:lora_requests_info gauge\n"
        'vllm:lora_requests_info{max_lora="8",running_lora_adapters="a,b",waiting_lora_adapters="c"} 1.7e+09\n'
        'vllm:lora_requests_info{max_lora="8",running_lora_adapters="",waiting_lora_adapters=""} 1.8e+09\n'
        'vllm:lora_requests_info{max_lora="8",running_lora_adapters="b",waiting_lora_adapters=""} 1.75e+09\n')
    m = _extract(BUILTIN_ENGINES["vllm"], page)
    assert m.active_models == frozenset() and m.waiting_models == frozenset() and m.max_active_models == 8


def test_optional_metrics_may_be_absent_but_load_metrics_may_not():
    vllm = BUILTIN_ENGINES["vllm"]
    page = render_vllm_page(lora=False).replace('num_gpu_blocks="27865"', 'num_gpu_blocks="None"')
    values = vllm.extract(parse(page, vllm.families).families)
    assert values.missing == ["vllm:lora_requests_info"] and values.num_gpu_blocks is None
    assert values.block_size == 16 and values.waiting_requests == 3
    m = EndpointMetrics(active_models=frozenset({"gone"}), max_active_models=4, num_gpu_blocks=5)
    values.apply(m)
    assert m.num_gpu_blocks == 5  # absent cache info: left as it was
    assert m.active_models == frozenset() and m.max_active_models == 0  # no LoRA family: no adapters
    for broken in (page.replace("vllm:kv_cache_usage_perc{", "vllm:kv_cache_usage_percent{"),
                   page.replace("} 0.42\n", "} NaN\n")):
        with pytest.raises(ExtractError):
            vllm.extract(parse(broken, vllm.families).families)
    with pytest.raises(ExtractError, match="no series matches"):
        BUILTIN_ENGINES["triton-tensorrt-llm"].extract(
            parse(TRITON_PAGE.replace('"waiting"', '"queued"'), ["nv_trt_llm_request_metrics"]).families)


def test_engine_configs_replace_builtins_and_select_by_label():
    reg = EngineRegistry.from_params({"engineConfigs": [
        {"name": "vllm", "queuedRequestsSpec": "vllm:num_requests_waiting",
         "runningRequestsSpec": "vllm:num_requests_running", "kvUsageSpec": "vllm:gpu_cache_usage_perc",
         "loraSpec": ""},
        {"name": "mine", "queuedRequestsSpec": "q{shard=a}", "kvUsageSpec": "kv", "cacheBlockSizeSpec": "bs",
         "cacheInfoSpec": "info", "cacheNumBlocksLabel": "blocks"},
    ], "defaultEngine": "mine"})
    vllm = reg.get("vllm")
    assert vllm is not None and vllm.lora is None and vllm.cache_info is None  # replaced wholesale
    assert vllm.families == {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:gpu_cache_usage_perc"}
    assert reg.get("sglang") is BUILTIN_ENGINES["sglang"]  # other built-ins kept
    mine = reg.default
    assert mine.name == "mine" and mine.running is None
    m = _extract(mine, 'q{shard="b"} 1\nq{shard="a"} 4\nkv 0.5\nbs 16\ninfo{blocks="77"} 1\n')
    assert (m.waiting_requests, m.running_requests, m.kv_cache_usage, m.block_size, m.num_gpu_blocks) == (
        4, 0, 0.5, 16, 77)

    pool = EndpointPool()
    pool.sync([EndpointSpec("a", "10.0.0.1", 1), EndpointSpec("b", "10.0.0.2", 1, {ENGINE_LABEL_KEY: "sglang"}),
               EndpointSpec("c", "10.0.0.3", 1, {ENGINE_LABEL_KEY: "unknown"})])
    a, b, c = pool.endpoints
    assert reg.for_endpoint(a) is mine and reg.for_endpoint(b).name == "sglang"
    assert reg.for_endpoint(c) is mine and not reg.is_known(c)
    assert EngineRegistry().for_endpoint(a).name == "vllm"
    custom_key = EngineRegistry(engine_label_key="engine")
    pool.sync([EndpointSpec("d", "10.0.0.4", 1, {"engine": "trtllm-serve"})])
    assert custom_key.for_endpoint(pool.endpoints[0]).name == "trtllm-serve"

    for bad in ({"engineConfigs": [{"name": ""}]}, {"engineConfigs": [{"name": "x", "kvUsageSpc": "kv"}]},
                {"engineConfigs": [{"name": "x", "kvUsageSpec": "kv{"}]}, {"defaultEngine": "nope"},
                {"engineConfigs": [{"name": "x"}, {"name": "x"}]}, {"engineConfig": []}):
        with pytest.raises(EngineConfigError):
            EngineRegistry.from_params(bad)


# ------------------------------------------------------------------------------------------- scraper


class FakeServer:
    """One model server's /metrics: a page, or a failure mode."""

    def __init__(self, page: str) -> None:
        self.page = page
        self.mode = "ok"  # ok | 500 | garbage | hang
        self.hits = 0
        self.times: list[float] = []  # loop time of each request
        self.release = asyncio.Event()
        self.port = 0

    async def handle(self, _req: web.Request) -> web.Response:
        self.hits += 1
        self.times.append(asyncio.get_running_loop().time())
        if self.mode == "500":
            return web.Response(status=500, text="boom")
        if self.mode == "garbage":
            return web.Response(body=b"\x00\xff<html>{{{ not metrics\n" * 20, content_type="text/plain")
        if self.mode == "hang":
            await self.release.wait()
        return web.Response(text=self.page, content_type="text/plain")


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., object]]:
    runners: list[web.AppRunner] = []
    made: list[FakeServer] = []

    async def make(*pages: str) -> list[FakeServer]:
        out = []
        for page in pages:
            srv = FakeServer(page)
            app = web.Application()
            app.router.add_get("/metrics", srv.handle)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            await web.SockSite(runner, sock).start()
            srv.port = sock.getsockname()[1]
            runners.append(runner)
            made.append(srv)
            out.append(srv)
        return out

    yield make
    for srv in made:
        srv.release.set()
    for r in runners:
        await r.cleanup()


def _specs(srvs: list[FakeServer], labels: dict[str, str] | None = None) -> list[EndpointSpec]:
    return [EndpointSpec(f"ep{s.port}", "127.0.0.1", s.port, dict(labels or {})) for s in srvs]


async def _until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def _closed_port() -> int:
    """A loopback port nothing listens on: connections are refused."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    return port


def _scrape_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("scrape ") and not t.done()]


async def test_scraper_keeps_metrics_current(servers):
    (srv,) = await servers(render_vllm_page(waiting=3, running=7, kv_usage=0.42))
    pool = EndpointPool()
    pool.sync(_specs([srv]))
    (ep,) = pool.endpoints
    scraper = MetricsScraper(pool, interval=0.02, timeout=0.5)
    await scraper.start()
    try:
        await _until(lambda: ep.metrics.updated_at > 0, 5.0)
        m = ep.metrics
        assert (m.waiting_requests, m.running_requests, m.kv_cache_usage) == (3, 7, 0.42)
        assert m.active_models == {"sql-lora", "chat-lora"} and (m.block_size, m.num_gpu_blocks) == (16, 27865)
        assert m.last_error is None and m.age() < 0.5
        srv.page = render_vllm_page(waiting=12, running=1, kv_usage=0.9)
        await _until(lambda: ep.metrics.waiting_requests == 12, 5.0)  # a few 20 ms scrape intervals
        assert ep.metrics.kv_cache_usage == 0.9
        hits = srv.hits
        await asyncio.sleep(0.2)
        assert srv.hits - hits <= 13  # ~every 20 ms, never faster; a busy machine may scrape less often
        await _until(lambda: srv.hits - hits >= 3, 5.0)
        await _until(lambda: scraper.stats(ep).scrapes >= 10, 5.0)
        stats = scraper.stats(ep)
        assert stats is not None and stats.errors == 0 and 0 < stats.last_duration < 0.5
        assert scraper.url_for(ep) == f"http://127.0.0.1:{srv.port}/metrics"
    finally:
        await scraper.stop()
    assert not _scrape_tasks()


async def test_failing_endpoints_keep_old_values_and_go_stale(servers):
    good, err500, garbage, hung = await servers(*(render_vllm_page(waiting=i) for i in (1, 2, 3, 4)))
    pool = EndpointPool()
    pool.sync(_specs([good, err500, garbage, hung]))
    eps = pool.endpoints
    scraper = MetricsScraper(pool, interval=0.02, timeout=0.15)
    await scraper.start()
    try:
        await _until(lambda: all(ep.metrics.updated_at for ep in eps), 5.0)
        err500.mode, garbage.mode, hung.mode = "500", "garbage", "hang"
        await asyncio.sleep(0.05)
        before = {ep: ep.metrics.updated_at for ep in eps}
        await _until(lambda: all(ep.metrics.last_error for ep in eps[1:]), 5.0)
        await asyncio.sleep(0.2)
        g, e5, ga, h = eps
        assert g.metrics.last_error is None and g.metrics.updated_at > before[g] and g.metrics.age() < 0.1
        assert e5.metrics.last_error == "HTTP 500"
        assert "not found" in (ga.metrics.last_error or "")
        assert "timeout" in (h.metrics.last_error or "")
        for ep, waiting in ((e5, 2), (ga, 3), (h, 4)):
            assert ep.metrics.waiting_requests == waiting  # previous values kept
            assert ep.metrics.updated_at <= before[ep] and ep.metrics.age() > 0.2  # not stamped: staleness grows
            stats = scraper.stats(ep)
            assert stats is not None and stats.errors >= 1 and stats.last_error == ep.metrics.last_error
        assert scraper.stats(e5).errors >= 5 and scraper.stats(h).errors >= 1
        # recovery clears the error and stamps again
        err500.mode = "ok"
        await _until(lambda: e5.metrics.last_error is None and e5.metrics.age() < 0.1, 5.0)
        assert scraper.stats(e5).consecutive_errors == 0
    finally:
        await scraper.stop()
    assert not _scrape_tasks()


async def test_engine_label_picks_the_spec_and_unreachable_endpoint_reports(servers):
    (srv,) = await servers(SGLANG_PAGE)
    pool = EndpointPool()
    dead_port = _closed_port()
    pool.sync([*_specs([srv], {ENGINE_LABEL_KEY: "sglang"}), EndpointSpec("dead", "127.0.0.1", dead_port)])
    sg, dead = pool.endpoints
    scraper = MetricsScraper(pool, interval=0.02, timeout=0.3)
    await scraper.start()
    try:
        await _until(lambda: sg.metrics.updated_at > 0 and dead.metrics.last_error is not None, 5.0)
        assert (sg.metrics.waiting_requests, sg.metrics.running_requests, sg.metrics.block_size) == (11, 6, 64)
        assert dead.metrics.updated_at == 0 and dead.metrics.age() == float("inf")
        assert dead.metrics.last_error.startswith("connect: ")
    finally:
        await scraper.stop()


async def test_pool_changes_start_and_stop_polling(servers):
    s1, s2, s3 = await servers(*(render_vllm_page(waiting=i) for i in (1, 2, 3)))
    pool = EndpointPool()
    pool.sync(_specs([s1]))
    scraper = MetricsScraper(pool, interval=0.02, timeout=0.3)
    await scraper.start()
    try:
        (e1,) = pool.endpoints
        assert scraper.polling == {e1}
        pool.sync(_specs([s1, s2, s3]))
        e2, e3 = pool.get(f"ep{s2.port}"), pool.get(f"ep{s3.port}")
        assert scraper.polling == {e1, e2, e3}
        await _until(lambda: e3.metrics.waiting_requests == 3 and e2.metrics.waiting_requests == 2, 5.0)
        assert len(_scrape_tasks()) == 3
        pool.sync(_specs([s1, s3]))
        assert scraper.polling == {e1, e3} and scraper.stats(e2) is None
        await asyncio.sleep(0.05)
        hits = s2.hits
        assert len(_scrape_tasks()) == 2
        await asyncio.sleep(0.1)
        assert s2.hits == hits  # nobody polls the removed endpoint
        # a changed address replaces the endpoint object: the old task stops, a new one starts
        pool.sync([EndpointSpec(f"ep{s1.port}", "127.0.0.1", s2.port), *_specs([s3])])
        new1 = pool.get(f"ep{s1.port}")
        assert new1 is not e1 and scraper.polling == {new1, e3}
        await _until(lambda: new1.metrics.waiting_requests == 2, 5.0)
    finally:
        await scraper.stop()
    assert not _scrape_tasks() and scraper.polling == frozenset()
    pool.sync(_specs([s1, s2]))  # after stop, pool changes start nothing
    await asyncio.sleep(0)
    assert not _scrape_tasks()


async def test_first_ticks_are_jittered(servers):
    srvs = await servers(*(render_vllm_page() for _ in range(8)))
    pool = EndpointPool()
    pool.sync(_specs(srvs))
    scraper = MetricsScraper(pool, interval=0.2, timeout=0.5)
    await scraper.start()
    try:
        await _until(lambda: all(s.hits >= 4 for s in srvs), 5.0)
        # Each round's scrapes spread over the interval, not all at once. A round can still bunch up when a busy
        # machine stalls the loop past the interval (every phase's timer fires at the stall's end), but the phases
        # are kept: a later round spreads again.
        spreads = [max(s.times[k] for s in srvs) - min(s.times[k] for s in srvs) for k in range(4)]
        assert max(spreads) > 0.03, spreads
    finally:
        await scraper.stop()


def test_bench_smoke():
    r = run_bench(endpoints=3, interval=0.05, duration=0.3, warmup=0.2, micro_number=3)
    assert 180 <= r["page_lines"] <= 320
    assert r["parse_us"]["promtext"] < r["parse_us"]["prometheus_client"]
    for mode in ("http-only", "promtext", "prometheus_client"):
        assert r["e2e"][mode]["scrapes_per_s"] > 0 and r["e2e"][mode]["errors"] == 0


def test_urls_and_arguments():
    pool = EndpointPool()
    pool.sync([EndpointSpec("v6", "::1", 8000, metrics_port=9400), EndpointSpec("v4", "10.0.0.1", 8000)])
    v6, v4 = pool.endpoints
    assert MetricsScraper(pool).url_for(v6) == "http://[::1]:9400/metrics"
    assert MetricsScraper(pool, scheme="https", path="stats").url_for(v4) == "https://10.0.0.1:8000/stats"
    for kwargs in ({"scheme": "ftp"}, {"interval": 0}, {"timeout": -1}):
        with pytest.raises(ValueError):
            MetricsScraper(pool, **kwargs)


async def test_endpoints_that_stop_answering_leave_the_candidates_until_they_answer(servers):
    err500, hung = await servers(*(render_vllm_page(waiting=i) for i in (1, 2)))
    port = _closed_port()  # nothing listens there yet
    pool = EndpointPool()
    pool.sync([*_specs([err500, hung]), EndpointSpec("back", "127.0.0.1", port)])
    e5, h, back = pool.endpoints
    director = Director(pool, load_config("", pool))
    scraper = MetricsScraper(pool, interval=0.02, timeout=0.1)
    err500.mode, hung.mode = "500", "hang"
    await scraper.start()
    try:
        await _until(lambda: h.metrics.unreachable and back.metrics.unreachable, 5.0)
        assert scraper.stats(back).consecutive_unanswered >= UNREACHABLE_AFTER
        assert not e5.metrics.unreachable  # it answers, badly: stale metrics, still a candidate
        assert director.candidates(None) == [e5]
        assert director.candidates([h.hostport, back.hostport]) == [h, back]  # none answers: all of them
        err500.mode = "hang"
        await _until(lambda: e5.metrics.unreachable, 5.0)
        assert director.candidates(None) == [e5, h, back]
        async def page(_req: web.Request) -> web.Response:
            return web.Response(text=render_vllm_page(waiting=7))

        app = web.Application()
        app.router.add_get("/metrics", page)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            await _until(lambda: not back.metrics.unreachable and back.metrics.waiting_requests == 7, 5.0)
            assert director.candidates(None) == [back]
        finally:
            await runner.cleanup()
    finally:
        await scraper.stop()


def test_the_served_model_comes_from_the_model_name_label():
    m = _extract(BUILTIN_ENGINES["vllm"], 'vllm:num_requests_waiting{model_name="org/m"} 0\n'
                 'vllm:num_requests_running{model_name="org/m"} 1\nvllm:kv_cache_usage_perc{model_name="org/m"} 0\n')
    assert m.served_model == "org/m"


def _counter_page(prompt_tokens: float, waiting: int = 0) -> str:
    return (f'vllm:num_requests_waiting{{model_name="m"}} {waiting}\nvllm:num_requests_running{{model_name="m"}} 0\n'
            f'vllm:kv_cache_usage_perc{{model_name="m"}} 0\n'
            f'vllm:prompt_tokens_total{{model_name="m"}} {prompt_tokens}\n')


async def test_a_restart_is_told_at_the_first_scrape_that_shows_it(servers, caplog):
    """Counters that grow, then an outage (failed scrapes), then a page whose counter went back: the pool's restart
    listeners hear it in that very scrape, once, with the time the old process was last scraped; a failing listener
    neither stops the others nor fails the scrape."""
    (srv,) = await servers(_counter_page(100))
    pool = EndpointPool()
    pool.sync(_specs([srv]))
    (ep,) = pool.endpoints
    heard: list[tuple[int, float, float]] = []  # (server hits, last_seen, updated_at) when told

    def broken(_ep, _last_seen):
        raise RuntimeError("a plugin's bug")

    pool.add_restart_listener(broken)
    pool.add_restart_listener(lambda e, last_seen: heard.append((srv.hits, last_seen, e.metrics.updated_at)))
    scraper = MetricsScraper(pool, interval=0.02, timeout=0.5)
    await scraper.start()
    try:
        for tokens in (200, 300, 300):
            srv.page = _counter_page(tokens)
            hits = srv.hits
            await _until(lambda h=hits: srv.hits >= h + 2 and ep.metrics.updated_at > 0, 5.0)
        srv.mode = "500"  # a scrape gap: the old process's last page was 300 tokens
        await _until(lambda: scraper.stats(ep).consecutive_errors >= 2, 5.0)
        last_ok = ep.metrics.updated_at
        assert not heard and scraper.stats(ep).restarts == 0
        srv.page, srv.mode = _counter_page(12, waiting=4), "ok"  # the new process
        hits = srv.hits
        await _until(lambda: ep.metrics.updated_at > last_ok, 5.0)
        assert len(heard) == 1
        told_at_hit, last_seen, stamp_when_told = heard[0]
        assert told_at_hit == hits + 1  # the first scrape of the new page
        assert last_seen == stamp_when_told == last_ok  # told before that scrape is stamped
        assert ep.metrics.waiting_requests == 4 and ep.metrics.last_error is None
        srv.page = _counter_page(15)
        hits = srv.hits
        await _until(lambda: srv.hits >= hits + 3, 5.0)
        assert len(heard) == 1 and scraper.stats(ep).restarts == 1  # compared with the new process from then on
    finally:
        await scraper.stop()
    assert any("restarted (vllm:prompt_tokens_total 300 -> 12)" in r.getMessage() for r in caplog.records)
