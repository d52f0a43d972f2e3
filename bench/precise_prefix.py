"""Costs of precise prefix routing, on one core: KV-event ingestion, index memory, tokenization.

    python -m bench.precise_prefix [--events 200000] [--blocks 1000000] [--sizes 8000,128000]

* Ingestion: vLLM-shaped batches (one ``BlockStored`` per request per step, ``--blocks-per-event`` blocks of 16
  tokens, some ``BlockRemoved``) decoded and applied to the index on this thread ("decode + index"), and the
  same batches published over ZMQ on loopback to the ingestion thread ("ZMQ + decode + index").
* Memory: traced allocations of the index holding ``--blocks`` blocks of one endpoint (keys, masks, the engine
  hash map), per million blocks.
* Tokenization: a chat request whose system prompt has about N tokens (natural English text), through the
  model's chat template and ``tokenizer.json`` (the deepseek tokenizer the simulator uses): cold (empty token
  cache, a fresh tokenizer) and warm (the same system prompt, a new question), plus the block keys.
"""

from __future__ import annotations

import argparse
import gc
import random
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import fmt, table
from bench.workloads import NaturalText
from epp.api.types import ApiKind, InferenceRequest, ParsedBody
from epp_plugins.scorers.precise.events import decode_batch
from epp_plugins.scorers.precise.index import BlockIndex, BlockKeys
from epp_plugins.scorers.precise.tokenize import LocalTokenizer
from epp_sim.kv_events import msgpack_encode, to_wire
from epp_sim.model_files import write_model_dir

BLOCK = 16


def _batches(n_events: int, blocks_per_event: int, per_batch: int, seed: int = 1) -> list[bytes]:
    """Payloads of ``n_events`` events: chains of stored blocks (each event continues a request's chain), every
    tenth event a removal of earlier blocks."""
    rng = random.Random(seed)
    out: list[bytes] = []
    events: list[list[Any]] = []
    h = 1
    parents: list[int] = []
    for i in range(n_events):
        if i % 10 == 9 and parents:
            events.append(to_wire(("BlockRemoved", [parents.pop(rng.randrange(len(parents)))])))
        else:
            parent = parents[-1] if parents and rng.random() < 0.7 else None
            hashes = list(range(h, h + blocks_per_event))
            h += blocks_per_event
            tokens = [rng.randrange(128000) for _ in range(BLOCK * blocks_per_event)]
            events.append(to_wire(("BlockStored", hashes, parent, tokens, BLOCK, None)))
            parents.append(hashes[-1])
            if len(parents) > 4096:
                parents = parents[-2048:]
        if len(events) == per_batch:
            out.append(msgpack_encode([time.time(), events, 0]))
            events = []
    if events:
        out.append(msgpack_encode([time.time(), events, 0]))
    return out


def ingest_local(payloads: list[bytes]) -> tuple[int, float]:
    index = BlockIndex(BlockKeys(BLOCK), 0.0)
    slot = index.slot("pod")
    n = 0
    t0 = time.process_time()
    for p in payloads:
        events, _ = decode_batch(p)
        index.apply(slot, events)
        n += len(events)
    return n, time.process_time() - t0


def ingest_zmq(payloads: list[bytes], n_events: int, timeout: float = 120.0) -> tuple[int, float] | None:
    """Events/s through EPP's ingestion thread (PUB on loopback -> SUB -> decode -> index): wall time from the
    first frame to the last event applied."""
    import zmq

    from epp_plugins.scorers.precise.subscriber import EventIngestor

    index = BlockIndex(BlockKeys(BLOCK), 0.0)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    ing = EventIngestor(lambda name, evs: index.apply(index.slot(name), evs), index.drop_endpoint,
                        max_frames_per_second=1 << 30)
    ing.start()
    try:
        ing.add("pod", f"tcp://127.0.0.1:{port}")
        deadline = time.monotonic() + 10
        while not ing.stats.connects["pod"] and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # the subscription reaches the publisher
        t0 = time.monotonic()
        for seq, p in enumerate(payloads):
            pub.send_multipart([b"", struct.pack(">Q", seq), p])
        deadline = t0 + timeout
        while ing.stats.events["pod"] < n_events and time.monotonic() < deadline:
            time.sleep(0.005)
        elapsed = time.monotonic() - t0
        got = ing.stats.events["pod"]
    finally:
        ing.stop()
        pub.close(linger=0)
        ctx.term()
    return (got, elapsed) if got else None


def index_memory(blocks: int, blocks_per_event: int = 16) -> float:
    """Traced bytes per block held by the index (one endpoint; a key held by several endpoints costs one more
    bit in its mask)."""
    gc.collect()
    rng = random.Random(2)
    index = BlockIndex(BlockKeys(BLOCK), 0.0)
    slot = index.slot("pod")
    from epp_plugins.scorers.precise.events import BlockStored

    chunk = [rng.randrange(128000) for _ in range(BLOCK * blocks_per_event)]  # content: keys differ by parent
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    h = 1
    for _ in range(blocks // blocks_per_event):
        hashes = list(range(h, h + blocks_per_event))
        index.store(slot, BlockStored(hashes, h - 1 if h > 1 else None, chunk, BLOCK, None, "gpu", None))
        h += blocks_per_event
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    held = index.size()
    return used / max(held, 1)


def _chat_request(system: str, question: str) -> InferenceRequest:
    payload = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    return InferenceRequest("r", "/v1/chat/completions", "POST", {},
                            ParsedBody(api=ApiKind.CHAT_COMPLETIONS, model="m", payload=payload), b"")


def _ms(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000, out


def tokenization(sizes: list[int], model_dir: Path) -> list[dict[str, Any]]:
    text = NaturalText(seed=3)
    keys = BlockKeys(BLOCK)
    rows = []
    for n in sizes:
        system = text.text(random.Random(n), n)
        tok = LocalTokenizer(str(model_dir))  # a fresh token cache
        tok.request_tokens(_chat_request("hi", "hi"))  # compiles the template (once per process); caches nothing
        first, again = _chat_request(system, "First question?"), _chat_request(system, "Another question?")
        cold, ids = _ms(lambda t=tok, r=first: t.request_tokens(r))
        warm, ids = _ms(lambda t=tok, r=again: t.request_tokens(r), 3)
        keys_ms, _ = _ms(lambda i=ids: keys.chain(i, keys.root(None, None)), 3)
        rows.append({"tokens": len(ids), "cold_ms": cold, "warm_ms": warm, "keys_ms": keys_ms})
    return rows


def run(events: int = 200_000, blocks: int = 1_000_000, sizes: tuple[int, ...] = (8000, 128000),
        blocks_per_event: int = 4, per_batch: int = 16, zmq_too: bool = True) -> dict[str, Any]:
    payloads = _batches(events, blocks_per_event, per_batch)
    n, cpu = ingest_local(payloads)
    result: dict[str, Any] = {"events": n, "blocks_per_event": blocks_per_event, "per_batch": per_batch,
                              "local_eps": n / cpu if cpu else None}
    if zmq_too:
        z = ingest_zmq(payloads, n)
        result["zmq_eps"] = z[0] / z[1] if z and z[1] else None
    result["bytes_per_block"] = index_memory(blocks)
    result["blocks"] = blocks
    with tempfile.TemporaryDirectory(prefix="bench-precise-") as d:
        result["tokenize"] = tokenization(list(sizes), write_model_dir(Path(d) / "model"))
    return result


def render(r: dict[str, Any]) -> str:
    ing = table([["decode + index (this thread)", fmt(r["local_eps"]), fmt(r["local_eps"] * r["blocks_per_event"])],
                 ["ZMQ + decode + index (EPP's thread)", fmt(r.get("zmq_eps")),
                  fmt(r["zmq_eps"] * r["blocks_per_event"]) if r.get("zmq_eps") else "-"]],
                ["KV-event ingestion, one core", "events/s", "blocks/s"], align_left=1)
    mem = table([[f"{r['blocks']:,} blocks, one endpoint", fmt(r["bytes_per_block"]),
                  fmt(r["bytes_per_block"] * 1e6 / (1 << 20))]],
                ["Index memory", "bytes/block", "MiB per 1M blocks"], align_left=1)
    tok = table([[fmt(t["tokens"]), fmt(t["cold_ms"], 1), fmt(t["warm_ms"], 2), fmt(t["keys_ms"], 2)]
                 for t in r["tokenize"]],
                ["Prompt tokens", "tokenize cold ms", "tokenize warm ms", "block keys ms"], align_left=0)
    return (f"{r['events']:,} events, {r['blocks_per_event']} blocks of {BLOCK} tokens each, "
            f"{r['per_batch']} per batch\n\n{ing}\n\n{mem}\n\n{tok}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--blocks", type=int, default=1_000_000, help="blocks in the index for the memory figure")
    ap.add_argument("--sizes", default="8000,128000", help="system prompt sizes in tokens")
    ap.add_argument("--blocks-per-event", type=int, default=4)
    ap.add_argument("--per-batch", type=int, default=16, help="events per batch (one engine step)")
    ap.add_argument("--no-zmq", action="store_true", help="skip the ZMQ measurement")
    a = ap.parse_args()
    print(render(run(a.events, a.blocks, tuple(int(s) for s in a.sizes.split(",")), a.blocks_per_event,
                     a.per_batch, not a.no_zmq)))


if __name__ == "__main__":
    main()
