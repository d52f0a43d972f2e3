"""Each default is defined once: what repeats a flag's default reads it from ``epp.config.Config``, and other shared
defaults from the one module that owns them, so that changing a default changes it everywhere."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from epp.admission.wake import Waker
from epp.api.parsing import decode_json_object, parse_request
from epp.config import Config
from epp.datalayer.scraper import MetricsScraper
from epp.datalayer.sources import MetricsDataSource
from epp.extproc.stream import StreamOptions
from epp.logs import setup_logging
from epp.observability.metrics import Runtime
from epp.plugin import DEFAULT_SCORER_STALENESS
from epp.replay import ReplayOptions, build_parser
from epp.server import FINAL_GRACE, EppServer
from epp.stack.envoy import EnvoySpec
from epp.stack.local import LocalStack
from epp.trace import TraceRecorder
from epp_plugins.admission.saturation import UtilizationDetector
from epp_plugins.filters.utilization import UtilizationFilter
from epp_plugins.scorers.precise.index import BlockKeys
from epp_plugins.scorers.precise.producer import PrecisePrefixCacheProducer
from epp_plugins.scorers.prefix import ApproxPrefixCacheProducer, PrefixCacheScorer
from epp_plugins.scorers.prefix.producer import (
    DEFAULT_BLOCK_SIZE_TOKENS,
    DEFAULT_LRU_CAPACITY_PER_SERVER,
    DEFAULT_MAX_PREFIX_BLOCKS,
)

ROOT = Path(__file__).resolve().parents[2]


def default(function: Any, name: str) -> Any:
    return inspect.signature(function).parameters[name].default


def test_flag_defaults_are_the_configs():
    cfg = Config()
    assert StreamOptions() == StreamOptions(
        max_body_bytes=cfg.max_request_body_bytes, max_json_depth=cfg.max_json_depth,
        max_messages=cfg.max_request_messages, max_prompt_chars=cfg.max_prompt_chars,
        max_prompt_tokens=cfg.max_prompt_tokens, max_body_chunks=cfg.max_request_body_chunks)
    assert default(parse_request, "max_json_depth") == default(decode_json_object, "max_depth") == cfg.max_json_depth
    assert DEFAULT_SCORER_STALENESS == Runtime().staleness_threshold == cfg.metrics_staleness_threshold
    assert default(MetricsScraper, "interval") == cfg.refresh_metrics_interval
    assert default(Waker, "timeout") == cfg.wake_timeout
    assert default(TraceRecorder, "max_bytes") == cfg.record_trace_max_bytes
    assert default(setup_logging, "verbosity") == cfg.verbosity and default(setup_logging, "fmt") == cfg.log_format
    replay = ReplayOptions()
    assert (replay.refresh_interval, replay.max_json_depth) == (cfg.refresh_metrics_interval, cfg.max_json_depth)


def test_shared_defaults_agree():
    assert default(EppServer.stop, "grace") == FINAL_GRACE
    source = MetricsDataSource()
    assert (default(MetricsScraper, "path"), default(MetricsScraper, "scheme")) == (source.path, source.scheme)
    detector, utilization = UtilizationDetector(), UtilizationFilter()
    assert (detector.queue, detector.kv, detector.staleness) == (utilization.queue, utilization.kv,
                                                                 utilization.staleness) == (5, 0.8, 0.2)
    spec = EnvoySpec(listen_port=0, admin_port=0, extproc_port=0)
    stack = LocalStack.__dataclass_fields__
    assert {k: stack[k].default for k in ("upstream", "response_body_mode", "route_timeout", "extproc_san")} == {
        "upstream": spec.upstream, "response_body_mode": spec.response_body_mode,
        "route_timeout": spec.route_timeout, "extproc_san": spec.extproc_san}
    ns = build_parser().parse_args(["trace.jsonl"])
    replay = ReplayOptions()
    assert (ns.refresh_metrics_interval, ns.warmup, ns.drain, ns.seed) == (
        replay.refresh_interval, replay.warmup, replay.drain, replay.seed)


def test_prefix_producer_defaults_agree():
    """approx-prefix-cache-producer owns the block size, blocks matched and LRU capacity; prefix-cache-scorer's own
    producer, precise-prefix-cache-producer (its approximate fallback and its block keys) and the docs follow."""
    approx, own, precise = ApproxPrefixCacheProducer(), PrefixCacheScorer().producer, PrecisePrefixCacheProducer()
    expected = (DEFAULT_BLOCK_SIZE_TOKENS, DEFAULT_MAX_PREFIX_BLOCKS, DEFAULT_LRU_CAPACITY_PER_SERVER, True)
    for producer in (approx, own, precise):
        assert (producer.block_tokens, producer.max_blocks, producer.capacity, producer.feedback) == expected
    assert precise.keys.block_size == default(BlockKeys, "block_size") == DEFAULT_BLOCK_SIZE_TOKENS
    readme = (ROOT / "plugins/scorers/README.md").read_text()
    assert (f"`blockSizeTokens` ({DEFAULT_BLOCK_SIZE_TOKENS}), `maxPrefixBlocksToMatch` ({DEFAULT_MAX_PREFIX_BLOCKS}"
            in readme and f"`lruCapacityPerServer` ({DEFAULT_LRU_CAPACITY_PER_SERVER})" in readme)
    assert f"| `tokenProcessorConfig.blockSizeTokens` (`blockSize`) | {DEFAULT_BLOCK_SIZE_TOKENS} |" in readme
    assert (f"| `maxPrefixBlocksToMatch`, `lruCapacityPerServer`, `cachedTokensFeedback` | "
            f"{DEFAULT_MAX_PREFIX_BLOCKS}, {DEFAULT_LRU_CAPACITY_PER_SERVER}, true |") in readme
