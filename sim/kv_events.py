"""vLLM-style KV-cache events: one batch per engine step that stored or evicted blocks.

Batches are kept in a ring buffer (readable as JSON at `GET /sim/kv_events?after=SEQ`) and, when an
endpoint is configured, published like vLLM's ZMQ publisher: multipart
`[topic, seq (8-byte big-endian), msgpack([ts, [events...], dp_rank])]`, events either in the legacy
positional form `["BlockStored", hashes, parent, token_ids, block_size, lora_id, medium, lora_name]`,
`["BlockRemoved", hashes, medium]`, `["AllBlocksCleared"]`, or in the tagged-map form (`{"type": ..., fields}`,
vLLM >= 0.26). Block hashes go out as 64-bit integers (vLLM's default) or as 32-byte digests whose last 8 bytes
are that integer (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`).

With a replay endpoint, a ROUTER socket answers vLLM's replay protocol: a client sends `[b"", start_seq]`
and gets `[b"", seq, payload]` for every buffered batch from `start_seq` on, then `[b"", 0xFF*8, b""]`.

`POST /sim/kv_events` injects faults into the stream (tests): `{"drop": n}` loses the next n batches on the
PUB socket (still buffered for replay), `{"pause": true}` stops publishing, `{"inject": kind}` sends one bad
frame (see `BAD_FRAMES`), `{"flood": n}` sends n empty batches at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import threading
import time
from collections import deque
from typing import Any

import msgpack

_MEDIUM = "GPU"
END_SEQ = b"\xff" * 8  # vLLM's replay end marker (-1 as a signed 8-byte integer)
HASH_FORMS = ("int", "bytes")
BAD_FRAMES = ("truncated", "wrong-types", "unknown-tag", "backwards", "not-msgpack", "short-frame")


def digest(h: int) -> bytes:
    """A 32-byte engine hash whose last 8 bytes (big-endian) are ``h``, as vLLM's int form takes them."""
    tail = h.to_bytes(8, "big")
    return hashlib.sha256(tail).digest()[:24] + tail


def _hashes(hashes: list[int], form: str) -> list[Any]:
    return hashes if form == "int" else [digest(h) for h in hashes]


def _parent(parent: int | None, form: str) -> Any:
    return parent if parent is None or form == "int" else digest(parent)


def to_wire(event: tuple[Any, ...], form: str = "int") -> list[Any]:
    kind = event[0]
    if kind == "BlockStored":
        _, hashes, parent, tokens, block_size, lora = event
        return [kind, _hashes(hashes, form), _parent(parent, form), tokens, block_size, None, _MEDIUM, lora]
    if kind == "BlockRemoved":
        return [kind, _hashes(event[1], form), _MEDIUM]
    return [kind]


def to_map(event: tuple[Any, ...], form: str = "int") -> dict[str, Any]:
    """The map form (field names, ``type`` tag) that msgspec writes for a non-array_like tagged struct; some
    consumers (vllm-router 0.1.x's kv_aware index) decode only this form."""
    kind = event[0]
    if kind == "BlockStored":
        _, hashes, parent, tokens, block_size, lora = event
        return {"type": kind, "block_hashes": _hashes(hashes, form), "parent_block_hash": _parent(parent, form),
                "token_ids": tokens, "block_size": block_size, "lora_id": None, "medium": _MEDIUM,
                "lora_name": lora}
    if kind == "BlockRemoved":
        return {"type": kind, "block_hashes": _hashes(event[1], form), "medium": _MEDIUM}
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
    return msgpack.packb(obj, use_bin_type=True)


def _bad_frame(kind: str, seq: int) -> list[bytes]:
    """One malformed message of the given kind (topic, seq, payload)."""
    good = msgpack_encode([time.time(), [["AllBlocksCleared"]], 0])
    if kind == "truncated":
        return [b"", struct.pack(">Q", seq), msgpack_encode([time.time(), [["BlockStored", [1, 2], None]]])[:-3]]
    if kind == "wrong-types":
        return [b"", struct.pack(">Q", seq), msgpack_encode([time.time(), [["BlockStored", "x", 7, {"a": 1}, "y"]]])]
    if kind == "unknown-tag":
        return [b"", struct.pack(">Q", seq), msgpack_encode([time.time(), [["BlockExploded", [1]]], 0])]
    if kind == "backwards":  # an earlier number, never 0 (which reads as a publisher restart)
        return [b"", struct.pack(">Q", max(1, seq - 2)), good]
    if kind == "not-msgpack":
        return [b"", struct.pack(">Q", seq), b"\xc1\xc1\xc1"]
    if kind == "short-frame":
        return [b"", b"\x01"]
    raise ValueError(f"inject: one of {BAD_FRAMES}")


class KVEventLog:
    def __init__(self, buffer: int, endpoint: str | None, topic: str, pod_index: int,
                 encoding: str = "array", hash_form: str = "int", replay_endpoint: str | None = None) -> None:
        if encoding not in ("array", "map"):
            raise ValueError(f"KV event encoding must be 'array' or 'map', not {encoding!r}")
        if hash_form not in HASH_FORMS:
            raise ValueError(f"KV event hash form must be one of {HASH_FORMS}, not {hash_form!r}")
        self._wire = to_wire if encoding == "array" else to_map
        self.hash_form = hash_form
        self.seq = -1
        self.batches: deque[tuple[int, float, list[tuple[Any, ...]]]] = deque(maxlen=max(buffer, 1))
        self._payloads: deque[tuple[int, bytes]] = deque(maxlen=max(buffer, 1))  # for replay
        self._lock = threading.Lock()  # the replay thread reads what the engine appends
        self.topic = topic.encode()
        self.drop = 0  # publish faults (POST /sim/kv_events)
        self.paused = False
        self._socket: Any = None
        self._replay: _Replayer | None = None
        if endpoint:
            self._socket = _open_socket(endpoint, pod_index)
        if replay_endpoint:
            self._replay = _Replayer(_offset(replay_endpoint, pod_index), self)

    def on_events(self, events: list[tuple[Any, ...]]) -> None:
        ts = time.time()
        payload = msgpack_encode([ts, [self._wire(e, self.hash_form) for e in events], 0]) \
            if self._socket is not None or self._replay is not None else b""
        with self._lock:
            self.seq += 1
            seq = self.seq
            self.batches.append((seq, ts, events))
            self._payloads.append((seq, payload))
        if self._socket is None or self.paused:
            return
        if self.drop > 0:
            self.drop -= 1
            return
        self._send([self.topic, struct.pack(">Q", seq), payload])

    def _send(self, frames: list[bytes]) -> None:
        with contextlib.suppress(Exception):
            self._socket.send_multipart(frames, flags=1)  # NOBLOCK: a slow subscriber loses, like vLLM's HWM

    def control(self, doc: dict[str, Any]) -> dict[str, Any]:
        if "drop" in doc:
            self.drop = int(doc["drop"])
        if "pause" in doc:
            self.paused = bool(doc["pause"])
        if self._socket is not None:
            if doc.get("inject"):
                kind = str(doc["inject"])
                with self._lock:
                    frame = _bad_frame(kind, self.seq + 1)
                    if len(frame) == 3 and kind != "backwards":
                        # a bad batch takes its sequence number (and its replay slot), as a real one would: a
                        # reused number would read as a duplicate, not as the fault injected
                        self.seq += 1
                        self._payloads.append((self.seq, frame[2]))
                if len(frame) == 3:
                    frame[0] = self.topic
                self._send(frame)
            for _ in range(int(doc.get("flood", 0))):
                with self._lock:
                    self.seq += 1
                    seq = self.seq
                    payload = msgpack_encode([time.time(), [], 0])
                    self._payloads.append((seq, payload))
                self._send([self.topic, struct.pack(">Q", seq), payload])
        return {"seq": self.seq, "drop": self.drop, "paused": self.paused}

    def payloads_from(self, start: int) -> list[tuple[int, bytes]]:
        with self._lock:
            return [(s, p) for s, p in self._payloads if s >= start]

    def since(self, after: int) -> list[dict[str, Any]]:
        return [{"seq": seq, "ts": ts, "events": [to_json(e) for e in events]}
                for seq, ts, events in list(self.batches) if seq > after]

    def close(self) -> None:
        if self._replay is not None:
            self._replay.close()
            self._replay = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


class _Replayer:
    """vLLM's replay ROUTER, served from a daemon thread (the engine thread owns the PUB socket)."""

    def __init__(self, endpoint: str, log: KVEventLog) -> None:
        import zmq

        self._log = log
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-replay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        while not self._stop.is_set():
            if not sock.poll(100):
                continue
            try:
                frames = sock.recv_multipart()
            except Exception:
                return
            if len(frames) < 3 or len(frames[-1]) != 8:
                continue
            ident, start = frames[0], int.from_bytes(frames[-1], "big")
            for seq, payload in self._log.payloads_from(start):
                sock.send_multipart([ident, b"", struct.pack(">Q", seq), payload])
            sock.send_multipart([ident, b"", END_SEQ, b""])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self._sock.close(linger=0)


def _offset(endpoint: str, pod_index: int) -> str:
    """Each pod gets its own port, like vLLM's data-parallel ranks: endpoint port + pod index."""
    head, _, port = endpoint.rpartition(":")
    return f"{head}:{int(port) + pod_index}" if port.isdigit() else endpoint


def _open_socket(endpoint: str, pod_index: int) -> Any:
    try:
        import zmq
    except ImportError as exc:
        raise RuntimeError("--kv-events needs pyzmq (pip install pyzmq)") from exc
    endpoint = _offset(endpoint, pod_index)
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 100000)
    if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock
