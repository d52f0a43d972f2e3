"""llm-d's precise-prefix parameters: each one either changes what EPP does or is refused at load with the reason;
the ingestion thread is stopped by ``stop`` (bounded) and never duplicated by a restart; a model server's restart
seen in its metrics clears its blocks."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from epp.datalayer.endpoint import Endpoint
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.scheduling.config import PickerConfig, load_config
from epp.scheduling.registry import PluginConfigError
from epp_plugins.scorers.precise.events import BlockStored, decode_batch
from epp_plugins.scorers.precise.producer import PrecisePrefixCacheProducer
from epp_plugins.scorers.precise.selector import parse_label_selector
from epp_sim.model_files import write_model_dir

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
TOKENS = list(range(100, 164))  # 4 blocks of 16


def _ingestion_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kv-events" and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leaked_ingestion_thread() -> Iterator[None]:
    before = set(_ingestion_threads())
    yield
    leaked = [t for t in _ingestion_threads() if t not in before]
    assert not leaked, f"a test left {len(leaked)} KV-event ingestion thread(s) running"


Load = Callable[..., PickerConfig]


@pytest.fixture
def load() -> Iterator[Load]:
    """The real config loader (which starts the plugins); every configuration loaded is stopped afterwards."""
    loaded: list[PickerConfig] = []

    def make(params: str, pool: EndpointPool | None = None, type_name: str = "precise-prefix-cache-producer",
             ) -> PickerConfig:
        cfg = load_config(HEAD + f"plugins:\n- type: {type_name}\n  name: p\n  parameters: {params}\n", pool)
        loaded.append(cfg)
        return cfg

    yield make
    for cfg in loaded:
        for p in cfg.plugins.values():
            p.stop()


def producer_of(cfg: PickerConfig) -> PrecisePrefixCacheProducer:
    p = cfg.plugins["p"]
    return p if isinstance(p, PrecisePrefixCacheProducer) else p.producer


@pytest.fixture
def pubs() -> Iterator[Callable[[], tuple[Any, int]]]:
    ctx = zmq.Context()
    made: list[Any] = []

    def make() -> tuple[Any, int]:
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        made.append(pub)
        return pub, port

    yield make
    for s in made:
        s.close(linger=0)
    ctx.term()


def eventually(pred: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def stored(tokens: list[int] = TOKENS, first_hash: int = 1) -> list[Any]:
    return ["BlockStored", list(range(first_hash, first_hash + len(tokens) // 16)), None, tokens, 16, None, "GPU"]


def publish_until(pub: Any, done: Callable[[], object], events: list[Any], timeout: float = 10.0) -> bool:
    """Publish a batch again and again (a SUB misses what is published before its subscription arrives)."""
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        pub.send_multipart([b"", struct.pack(">Q", seq), msgpack.packb([time.time(), events, 0])])
        seq += 1
        if eventually(done, 0.1):
            return True
    return False


# -- refused: named, with the reason and what to do instead -------------------------------------------------

REFUSED = [
    ("{tokenProcessorConfig: {hashAlgorithm: cbor-fnv}}", "tokenProcessorConfig.hashAlgorithm", "own block keys"),
    ("{kvEventsConfig: {concurrency: 4}}", "kvEventsConfig.concurrency", "one thread"),
    ("{indexerConfig: {tokenizersPoolConfig: {workersCount: 5}}}", "indexerConfig.tokenizersPoolConfig",
     "`tokenizer`"),
    ("{indexerConfig: {kvBlockIndexConfig: {inMemoryConfig: {podCacheSize: 10}}}}", "podCacheSize",
     "every endpoint"),
    ("{indexerConfig: {kvBlockIndexConfig: {costAwareMemoryConfig: {size: 2GiB}}}}", "costAwareMemoryConfig",
     "inMemoryConfig.size"),
    ("{indexerConfig: {kvBlockIndexConfig: {redisConfig: {address: 'redis://x:6379'}}}}", "redisConfig",
     "in memory"),
    ("{indexerConfig: {kvBlockIndexConfig: {valkeyConfig: {address: 'valkey://x:6379'}}}}", "valkeyConfig",
     "in memory"),
    ("{indexerConfig: {kvBlockIndexConfig: {enableMetrics: false}}}", "enableMetrics", "always exports"),
    ("{indexerConfig: {kvBlockIndexConfig: {metricsLoggingInterval: 1m}}}", "metricsLoggingInterval", "/metrics"),
]


@pytest.mark.parametrize("type_name", ["precise-prefix-cache-producer", "precise-prefix-cache-scorer"])
@pytest.mark.parametrize(("params", "path", "why"), REFUSED, ids=[r[1] for r in REFUSED])
def test_unsupported_llmd_parameters_are_refused_by_name(load: Load, type_name: str, params: str, path: str,
                                                         why: str) -> None:
    with pytest.raises(PluginConfigError) as err:
        load(params, type_name=type_name)
    text = str(err.value)
    assert path in text and "not supported" in text and why in text, text


@pytest.mark.parametrize(("params", "match"), [
    ("{kvEventsConfig: {engineType: trtllm}}", r"engineType must be one of \['vllm', 'sglang'\]"),
    ("{kvEventsConfig: {podDiscoveryConfig: {podLabelSelector: 'role in (a'}}}", "podLabelSelector"),
    ("{indexerConfig: {prefixStoreConfig: {cacheSize: 10}}}", "renderCacheSize"),
    ("{tokenProcessorConfig: {blockSize: 16}, indexerConfig: {tokenProcessorConfig: {blockSize: 16}}}",
     "set twice"),
    ("{indexerConfig: {kvCacheBackendConfigs: [{name: gpu, weight: -1}]}}", "weight must be >= 0"),
])
def test_bad_values_name_the_parameter(load: Load, params: str, match: str) -> None:
    with pytest.raises(PluginConfigError, match=match):
        load(params)


def test_llmd_values_that_describe_what_epp_does_are_accepted(load: Load) -> None:
    p = producer_of(load("{kvEventsConfig: {concurrency: 1, engineType: vllm}, indexerConfig: {kvBlockIndexConfig: "
                         "{enableMetrics: true, metricsLoggingInterval: 0s}}}"))
    assert p.engine == "vllm" and p.ingestor.engine == "vllm"


# -- engineType ------------------------------------------------------------------------------------------------

def test_engine_type_selects_the_event_schema() -> None:
    """SGLang's schema ends at ``medium``: a later position (here an int) is not vLLM's lora_name, and a map's
    ``lora_name`` / ``extra_keys`` are not read; a batch must carry its rank."""
    sglang_event = [*stored(), 7]
    payload = msgpack.packb([0.0, [sglang_event, {"type": "BlockStored", "block_hashes": [9], "parent_block_hash": None,
                                                  "token_ids": TOKENS[:16], "block_size": 16, "lora_name": "x",
                                                  "extra_keys": [["salt"]]}], 0])
    events, rejects = decode_batch(payload, "sglang")
    assert not rejects and [type(e) for e in events] == [BlockStored, BlockStored]
    assert events[1].lora is None and events[1].salt is None
    events, rejects = decode_batch(payload, "vllm")
    assert [r.reason for r in rejects] == ["wrong-type"]  # 7 read as lora_name
    assert events[0].lora == "x" and events[0].salt == "salt"
    assert [r.reason for r in decode_batch(msgpack.packb([0.0, [stored()[:5]], 0]), "sglang")[1]] == ["wrong-type"]
    with pytest.raises(Exception, match="data_parallel_rank"):
        decode_batch(msgpack.packb([0.0, []]), "sglang")


def test_engine_type_reaches_ingestion(load: Load, pubs: Callable[[], tuple[Any, int]]) -> None:
    pub, port = pubs()
    for engine, indexed in (("sglang", True), ("vllm", False)):
        pool = EndpointPool()
        pool.sync([EndpointSpec("e", "127.0.0.1", 8000, kv_events=f"tcp://127.0.0.1:{port}")])
        p = producer_of(load(f"{{kvEventsConfig: {{engineType: {engine}}}}}", pool))
        assert publish_until(pub, lambda p=p: p.ingestor.stats.frames["e"], [[*stored(), 7]])
        assert (p.index.size() == 4) is indexed, engine
        assert (p.ingestor.stats.dropped["wrong-type"] > 0) is not indexed
        p.stop()


# -- podLabelSelector / podNamespace -------------------------------------------------------------------------------

def test_label_selector_grammar() -> None:
    sel = parse_label_selector("llm-d.ai/role in (decode, both),tier!=cpu, gpu, !draining")
    assert sel.matches({"llm-d.ai/role": "decode", "gpu": ""})
    assert sel.matches({"llm-d.ai/role": "both", "gpu": "h100", "tier": "gpu"})
    assert not sel.matches({"llm-d.ai/role": "prefill", "gpu": ""})
    assert not sel.matches({"llm-d.ai/role": "decode", "gpu": "", "tier": "cpu"})
    assert not sel.matches({"llm-d.ai/role": "decode"})
    assert not sel.matches({"llm-d.ai/role": "decode", "gpu": "", "draining": "true"})
    assert parse_label_selector("a==1,b notin (x)").matches({"a": "1"})
    assert parse_label_selector("").matches({})
    for bad in ("a in (x", "a=1)", "=x", "a in ()", "a b"):
        with pytest.raises(ValueError):
            parse_label_selector(bad)


def test_pod_label_selector_and_namespace_choose_the_subscribed_endpoints(
        load: Load, pubs: Callable[[], tuple[Any, int]]) -> None:
    (pa, port_a), (pb, port_b), (_, port_c) = pubs(), pubs(), pubs()

    def specs(role_a: str, role_b: str) -> list[EndpointSpec]:
        return [EndpointSpec("a", "127.0.0.1", 8001, {"llm-d.ai/role": role_a}, kv_events=f"tcp://127.0.0.1:{port_a}",
                             namespace="llm"),
                EndpointSpec("b", "127.0.0.1", 8002, {"llm-d.ai/role": role_b}, kv_events=f"tcp://127.0.0.1:{port_b}",
                             namespace="llm"),
                EndpointSpec("c", "127.0.0.1", 8003, {"llm-d.ai/role": "decode"},
                             kv_events=f"tcp://127.0.0.1:{port_c}", namespace="other")]

    pool = EndpointPool()
    pool.sync(specs("decode", "prefill"))
    p = producer_of(load("{kvEventsConfig: {podDiscoveryConfig: {podLabelSelector: 'llm-d.ai/role in (decode,both)', "
                         "podNamespace: llm}}}", pool))
    assert p._subscribed == {"a"}
    assert publish_until(pa, lambda: p.ingestor.stats.frames["a"], [stored()])
    publish_until(pb, lambda: False, [stored(first_hash=50)], timeout=0.5)
    assert p.ingestor.stats.frames["b"] == 0 and p.index.size() == 4  # b's events are not ingested
    assert p.debug_state()["subscribed"] == ["a"]

    pool.sync(specs("prefill", "both"))  # relabelled: b in, a out (its blocks forgotten: it falls back)
    assert p._subscribed == {"b"}
    assert eventually(lambda: p.index.size() == 0 and "a" not in p.ingestor.stats.last_frame)
    assert publish_until(pb, lambda: p.ingestor.stats.frames["b"], [stored(first_hash=50)])
    assert p.index.size() == 4


def test_static_endpoints_have_no_namespace(load: Load) -> None:
    pool = EndpointPool()
    pool.sync([EndpointSpec("a", "127.0.0.1", 8001)])
    assert producer_of(load("{kvEventsConfig: {podDiscoveryConfig: {podNamespace: llm}}}", pool))._subscribed == set()


def test_default_publisher_is_offset_by_the_data_parallel_rank() -> None:
    p = PrecisePrefixCacheProducer(kv_events_config={"podDiscoveryConfig": {"socketPort": 6000,
                                                                             "replaySocketPort": 6100}})
    assert p.addresses(Endpoint("r0", "10.0.0.1", 8000)) == ("tcp://10.0.0.1:6000", "tcp://10.0.0.1:6100")
    assert p.addresses(Endpoint("r1", "10.0.0.1", 8001, rank=1)) == ("tcp://10.0.0.1:6001", "tcp://10.0.0.1:6101")
    assert p.addresses(Endpoint("x", "fd00::1", 8000, kv_events="tcp://h:1", rank=1)) == ("tcp://h:1",
                                                                                        "tcp://[fd00::1]:6101")


# -- indexerConfig ---------------------------------------------------------------------------------------------------

def test_in_memory_size_bounds_the_index() -> None:
    p = PrecisePrefixCacheProducer(indexer_config={"kvBlockIndexConfig": {"inMemoryConfig": {"size": 3}}})
    slot = p.index.slot("e")
    p.index.store(slot, BlockStored([1, 2, 3, 4], None, TOKENS, 16, None, "gpu", None))
    assert p.index.size() == 3 and p.index.skipped["index-full"] == 1
    keys = p.keys.chain(TOKENS, p.keys.root(None, None))
    assert p.index.match(keys, {slot: "e"}) == {"e": 3}  # the chain's head was kept
    p.index.remove(slot, [1])
    p.index.store(slot, BlockStored([5], None, TOKENS[:16], 16, None, "gpu", None))
    assert p.index.size() == 3  # a removal made room again


@pytest.mark.parametrize("key", ["kvCacheBackendConfigs", "backendConfigs"])
def test_backend_configs_weigh_the_tiers(key: str) -> None:
    tiers = [{"name": "gpu", "weight": 1.0}, {"name": "CPU", "weight": 0.5}]
    p = PrecisePrefixCacheProducer(indexer_config={key: tiers})
    a, b = p.index.slot("a"), p.index.slot("b")
    p.index.store(a, BlockStored([1, 2, 3, 4], None, TOKENS, 16, None, "gpu", None))
    p.index.store(b, BlockStored([1, 2, 3, 4], None, TOKENS, 16, None, "cpu", None))
    p.index.store(b, BlockStored([1, 2], None, TOKENS[:32], 16, None, "gpu", None))
    keys = p.keys.chain(TOKENS, p.keys.root(None, None))
    # b: two blocks on GPU (1 each) then two on CPU only (0.5 each); unweighted both would hold all 4
    assert p.index.match(keys, {a: "a", b: "b"}) == {"a": 4, "b": 3}
    plain = PrecisePrefixCacheProducer()
    s = plain.index.slot("b")
    plain.index.store(s, BlockStored([1, 2, 3, 4], None, TOKENS, 16, None, "cpu", None))
    assert plain.index.match(keys, {s: "b"}) == {"b": 4}


def test_prefix_store_config_sizes_the_token_cache(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model")
    p = PrecisePrefixCacheProducer(tokenizer=str(model),
                                   indexer_config={"prefixStoreConfig": {"cacheSize": 1000, "blockSize": 256}})
    assert p.local is not None and p.local.cache.max_chars == 256_000
    assert PrecisePrefixCacheProducer(tokenizer=str(model)).local.cache.max_chars == 64 << 20


def test_token_processor_config_in_its_older_place() -> None:
    p = PrecisePrefixCacheProducer(indexer_config={"tokenProcessorConfig": {"blockSize": 64, "hashSeed": "42"}})
    assert p.keys.block_size == 64 and p.block_tokens == 64
    assert p.keys.seed == PrecisePrefixCacheProducer(token_processor_config={"hashSeed": "42"}).keys.seed


# -- lifecycle -------------------------------------------------------------------------------------------------------

def test_stop_ends_the_thread_and_a_restart_keeps_one(load: Load) -> None:
    pool = EndpointPool()
    pool.sync([EndpointSpec("a", "127.0.0.1", 8001)])
    cfg = load("{}", pool)
    p = producer_of(cfg)
    threads = _ingestion_threads()  # this producer's, and any an earlier module left running
    own = p.ingestor._thread
    p.start()  # a config reload that keeps the plugin starts it again
    assert _ingestion_threads() == threads and p._subscribed == {"a"}
    t0 = time.monotonic()
    p.stop(timeout=2.0)
    assert time.monotonic() - t0 < 2.0 and not own.is_alive()
    p.stop()  # idempotent
    pool.sync([])  # no longer followed
    assert p.ingestor is None


def test_a_server_restart_seen_in_its_metrics_clears_what_its_stream_did_not_show(
        load: Load, pubs: Callable[[], tuple[Any, int]]) -> None:
    """A restarted publisher whose first frame EPP gets is numbered past the old stream's last (a short-lived
    process, a late reconnect) reads as a gap: the old process's blocks would stay indexed beside the new one's.
    Told by the scraper (the pool's restart listeners), the ingestor clears the endpoint and takes the next frame as
    a new stream. A restart the stream showed itself (``seq == 0``) after the old process was last scraped is not
    cleared again."""
    pub, port = pubs()
    pool = EndpointPool()
    pool.sync([EndpointSpec("a", "127.0.0.1", 8001, kv_events=f"tcp://127.0.0.1:{port}")])
    p = producer_of(load("{}", pool))
    ing = p.ingestor
    assert publish_until(pub, lambda: ing.stats.frames["a"], [stored()])
    last = ing._streams["a"].last

    def send(seq: int, first: int) -> None:  # the SUB is connected now: one send arrives
        tokens = list(range(first, first + 64))
        pub.send_multipart([b"", struct.pack(">Q", seq), msgpack.packb([time.time(), [stored(tokens, first)], 0])])

    send(last + 5, 1000)  # the new process, past the old numbering: taken as a gap
    assert eventually(lambda: p.index.size() == 8) and ing.stats.restarts["a"] == 0
    pool.restarted(pool.get("a"), time.monotonic())
    assert eventually(lambda: p.index.size() == 0 and ing.stats.restarts["a"] == 1)
    send(2, 2000)  # numbered below the old stream's last, yet the start of the new one
    assert eventually(lambda: p.index.size() == 4)

    last_seen = time.monotonic()
    send(0, 3000)  # the next restart, which the stream shows: cleared there, the new frame kept
    assert eventually(lambda: ing.stats.restarts["a"] == 2 and p.index.size() == 4)
    pool.restarted(pool.get("a"), last_seen)  # the scraper's word for the same restart
    frames = ing.stats.frames["a"]
    send(1, 4000)  # applied after the command (commands are read before each poll)
    assert eventually(lambda: ing.stats.frames["a"] > frames)
    assert p.index.size() == 8 and ing.stats.restarts["a"] == 2
