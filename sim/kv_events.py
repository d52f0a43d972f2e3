"""vLLM-style KV-cache events: one batch per engine step that stored or evicted blocks.

Batches are kept in a ring buffer (readable as JSON at `GET /sim/kv_events?after=SEQ`) and, when an
endpoint is configured and pyzmq is installed, published like vLLM's ZMQ publisher: multipart
`[topic, seq (8-byte big-endian), msgpack([ts, [events...], dp_rank])]` with events in the legacy
positional form `["BlockStored", hashes, parent, token_ids, block_size, lora_id, medium, lora_name]`,
`["BlockRemoved", hashes, medium]`, `["AllBlocksCleared"]`.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections import deque
from typing import Any

_MEDIUM = "GPU"


def to_wire(event: tuple[Any, ...]) -> list[Any]:
    kind = event[0]
    if kind == "BlockStored":
        _, hashes, parent, tokens, block_size, lora = event
        return [kind, hashes, parent, tokens, block_size, None, _MEDIUM, lora]
    if kind == "BlockRemoved":
        return [kind, event[1], _MEDIUM]
    return [kind]


def to_map(event: tuple[Any, ...]) -> dict[str, Any]:
    """The map form (field names, ``type`` tag) that msgspec writes for a non-array_like tagged struct; some
    consumers (vllm-router 0.1.x's kv_aware index) decode only this form."""
    kind = event[0]
    if kind == "BlockStored":
        _, hashes, parent, tokens, block_size, lora = event
        return {"type": kind, "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
                "block_size": block_size, "lora_id": None, "medium": _MEDIUM, "lora_name": lora}
    if kind == "BlockRemoved":
        return {"type": kind, "block_hashes": event[1], "medium": _MEDIUM}
    return {"type": kind}


def to_json(event: tuple[Any, ...]) -> dict[str, Any]:
    kind = event[0]
    if kind == "BlockStored":
        _, hashes, parent, tokens, block_size, lora = event
        return {"type": kind, "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
                "block_size": block_size, "lora_name": lora, "medium": _MEDIUM}
    if kind == "BlockRemoved":
        return {"type": kind, "block_hashes": event[1], "medium": _MEDIUM}
    return {"type": kind}


def msgpack_encode(obj: Any) -> bytes:
    """The msgpack subset our batches use (None, bool, int, float, str, bytes, list, dict)."""
    out = bytearray()
    _pack(obj, out)
    return bytes(out)


def _pack(obj: Any, out: bytearray) -> None:
    if obj is None:
        out.append(0xC0)
    elif obj is True:
        out.append(0xC3)
    elif obj is False:
        out.append(0xC2)
    elif isinstance(obj, int):
        if 0 <= obj < 0x80:
            out.append(obj)
        elif -32 <= obj < 0:
            out.append(obj & 0xFF)
        elif 0 <= obj <= 0xFFFFFFFF:
            out += b"\xce" + struct.pack(">I", obj)
        elif 0 <= obj <= 0xFFFFFFFFFFFFFFFF:
            out += b"\xcf" + struct.pack(">Q", obj)
        else:
            out += b"\xd3" + struct.pack(">q", obj)
    elif isinstance(obj, float):
        out += b"\xcb" + struct.pack(">d", obj)
    elif isinstance(obj, str):
        raw = obj.encode()
        n = len(raw)
        if n < 32:
            out.append(0xA0 | n)
        elif n < 0x10000:
            out += b"\xda" + struct.pack(">H", n)
        else:
            out += b"\xdb" + struct.pack(">I", n)
        out += raw
    elif isinstance(obj, bytes | bytearray):
        out += b"\xc6" + struct.pack(">I", len(obj)) + obj
    elif isinstance(obj, dict):
        n = len(obj)
        if n < 16:
            out.append(0x80 | n)
        elif n < 0x10000:
            out += b"\xde" + struct.pack(">H", n)
        else:
            out += b"\xdf" + struct.pack(">I", n)
        for key, item in obj.items():
            _pack(key, out)
            _pack(item, out)
    elif isinstance(obj, list | tuple):
        n = len(obj)
        if n < 16:
            out.append(0x90 | n)
        elif n < 0x10000:
            out += b"\xdc" + struct.pack(">H", n)
        else:
            out += b"\xdd" + struct.pack(">I", n)
        for item in obj:
            _pack(item, out)
    else:
        raise TypeError(f"cannot msgpack {type(obj).__name__}")


class KVEventLog:
    def __init__(self, buffer: int, endpoint: str | None, topic: str, pod_index: int,
                 encoding: str = "array") -> None:
        if encoding not in ("array", "map"):
            raise ValueError(f"KV event encoding must be 'array' or 'map', not {encoding!r}")
        self._wire = to_wire if encoding == "array" else to_map
        self.seq = -1
        self.batches: deque[tuple[int, float, list[tuple[Any, ...]]]] = deque(maxlen=max(buffer, 1))
        self.topic = topic.encode()
        self._socket: Any = None
        if endpoint:
            self._socket = _open_socket(endpoint, pod_index)

    def on_events(self, events: list[tuple[Any, ...]]) -> None:
        self.seq += 1
        ts = time.time()
        self.batches.append((self.seq, ts, events))
        if self._socket is not None:
            payload = msgpack_encode([ts, [self._wire(e) for e in events], 0])
            with contextlib.suppress(Exception):
                self._socket.send_multipart([self.topic, struct.pack(">Q", self.seq), payload], flags=1)

    def since(self, after: int) -> list[dict[str, Any]]:
        return [{"seq": seq, "ts": ts, "events": [to_json(e) for e in events]}
                for seq, ts, events in self.batches if seq > after]

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


def _open_socket(endpoint: str, pod_index: int) -> Any:
    try:
        import zmq  # optional dependency
    except ImportError as exc:
        raise RuntimeError("--kv-events needs pyzmq (pip install pyzmq)") from exc
    # Each pod gets its own port, like vLLM's data-parallel ranks: endpoint port + pod index.
    head, _, port = endpoint.rpartition(":")
    if port.isdigit():
        endpoint = f"{head}:{int(port) + pod_index}"
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 100000)
    if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock
