"""CI smoke for ``python -m bench.replicas``: 1 and 2 EPPs behind one Envoy, with and without a real redis-server,
then the store killed halfway; a few seconds each on fast pods. Checks the table and that no request failed (the
store's death included); no timing assertions."""

from __future__ import annotations

from bench.quality import QualityConfig
from bench.replicas import HEADER, WORKLOAD, ReplicasConfig, run_replicas, store_args
from epp.cli import parse_args
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.state.store import SharedState, StoreOptions
from epp_plugins.scorers.prefix import ApproxPrefixCacheProducer
from tests.scorers_helpers import req
from tests.state_helpers import start_redis
from tests.unit.test_scorers_prefix import result


async def test_replicas_benchmark_runs_and_a_killed_store_loses_no_request(tmp_path) -> None:
    start_redis().stop()  # skips when redis-server cannot be had
    small = {WORKLOAD: {"groups": 3, "system_tokens": 300, "question_tokens": (10, 30), "output_tokens": (4, 8)}}
    cfg = ReplicasConfig(replicas=[1, 2], out=tmp_path, quality=QualityConfig(
        pods=2, sim_profile="fast", num_gpu_blocks=512, rate=6.0, duration=3.0, warmup=0.5, drain=20.0,
        workload_kw=small, plots=False, quiet=True))
    result = await run_replicas(cfg)
    runs = result["runs"]
    assert [(r["n"], r["store"], r["store_killed"]) for r in runs] == [
        (1, False, False), (1, True, False), (2, True, False), (2, False, False), (2, True, True)]
    for r in runs:
        s = r["summary"]
        assert s["requests"] > 0 and s["error_pct"] == 0 and s["ok"] == s["measured"], (r["n"], r["store"],
                                                                                        s["errors_sample"])
        assert s["hit_rate"] is not None
    shared = next(r for r in runs if r["n"] == 2 and r["store"] and not r["store_killed"])
    assert shared["store_stats"].get("epp_state_store_prefix_received_total", 0) > 0  # the replicas shared picks
    assert result["table"].splitlines()[0].split()[: 3] == HEADER[:3]
    assert len(result["table"].splitlines()) == 1 + len(runs)


async def test_each_fleet_starts_on_an_empty_store() -> None:
    """The runs share one redis-server and each starts on pods whose prefix caches were reset: a fleet must not
    read the picks earlier fleets left in the store's stream (issue 13: they were predicted hits that missed)."""
    redis = start_redis()

    def fleet_state(run: int) -> tuple[SharedState, EndpointPool, ApproxPrefixCacheProducer]:
        cfg = parse_args(["--static-endpoints", "10.0.0.1:8000", *store_args(redis.url, "50ms", run)])
        pool = EndpointPool("p")
        pool.sync([EndpointSpec("a", "10.0.0.1", 8000)])
        producer = ApproxPrefixCacheProducer(block_size_tokens=4, auto_tune=False)
        producer.name = "prefix"
        return SharedState(StoreOptions.from_config(cfg), pool, lambda: [producer]), pool, producer

    text = "the quick brown fox jumps over the lazy dog " * 20
    try:
        first, pool, producer = fleet_state(0)
        first._hook()
        r = req(text)
        producer.state(r, pool.endpoints)
        producer.pre_request(r, result(pool.get("a")))
        await first.sync()
        await first.stop()
        for run, inherits in ((0, True), (1, False)):  # a replica of the same fleet starts warm; the next fleet not
            late, pool, producer = fleet_state(run)
            await late.sync()
            st = producer.state(req(text), pool.endpoints)
            assert (late.stats.received, producer.match(st, pool.get("a")) > 0) == (int(inherits), inherits), run
            await late.stop()
    finally:
        redis.stop()
