"""Request traces: what ``epp replay`` (epp/replay.py) replays, and EPP's opt-in recorder of them.

A trace is JSON lines. An optional first line describes it (``{"epp_trace": 1, ...}``, e.g. ``"sim"``: the pod
settings the traffic ran on, which ``epp replay`` takes as defaults); every other line is one request::

    {"t": 1733570000.123456, "method": "POST", "path": "/v1/chat/completions",
     "headers": {"content-type": "application/json", ...}, "body": "{\\"model\\": ...}"}

``t`` is the arrival time in seconds (any origin: replay starts at the first request; EPP writes wall-clock time,
so traces of several EPP processes merge); ``path`` has no query string; ``body`` is the request body as text
(``body_b64`` when it is not UTF-8). Prompts are in the trace: treat it like the traffic itself.

EPP records with ``--record-trace FILE`` (``epp --help``): every request that reaches routing, before admission,
as Envoy sent it (the model path prefix included), minus credential headers. The decision log
(``/debug/decisions``) keeps no prompt text, so it cannot be replayed.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from epp.api.types import InferenceRequest
from epp.config import Config

log = logging.getLogger(__name__)

TRACE_VERSION = 1
# Never written: credentials (and Envoy's pseudo-headers, whose path and method have their own fields).
DROPPED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key",
                             "x-goog-api-key", "content-length"})
_FLUSH_EVERY = 1.0  # seconds: a recorder's file lags the traffic by at most this much (plus a write)


@dataclass(slots=True)
class TraceRecord:
    t: float
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def header_line(**meta: Any) -> str:
    return json.dumps({"epp_trace": TRACE_VERSION, **meta}, separators=(",", ":")) + "\n"


def record_line(t: float, method: str, path: str, headers: Mapping[str, str], body: bytes) -> str:
    rec: dict[str, Any] = {"t": round(t, 6), "method": method, "path": path.partition("?")[0],
                           "headers": {k: v for k, v in headers.items()
                                       if not k.startswith(":") and k.lower() not in DROPPED_HEADERS}}
    try:
        rec["body"] = body.decode()
    except UnicodeDecodeError:
        rec["body_b64"] = base64.b64encode(body).decode()
    return json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n"


def read_trace(paths: Iterable[str | Path]) -> tuple[list[TraceRecord], dict[str, Any]]:
    """The requests of one or more trace files, in arrival order, and the first file's description."""
    records: list[TraceRecord] = []
    meta: dict[str, Any] = {}
    for n, path in enumerate(paths):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    if "epp_trace" in doc:
                        if doc["epp_trace"] != TRACE_VERSION:
                            raise ValueError(f"trace version {doc['epp_trace']!r}, this EPP reads {TRACE_VERSION}")
                        meta = meta or (doc if n == 0 else {})
                        continue
                    body = base64.b64decode(doc["body_b64"]) if "body_b64" in doc else doc.get("body", "").encode()
                    records.append(TraceRecord(float(doc["t"]), str(doc.get("method", "POST")), str(doc["path"]),
                                               {str(k).lower(): str(v) for k, v in (doc.get("headers") or {}).items()},
                                               body))
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise ValueError(f"{path}:{i}: not a trace record: {e}") from None
    records.sort(key=lambda r: r.t)
    return records, meta


class TraceRecorder:
    """Appends every routed request to a trace file, up to ``max_bytes`` (then stops, with a warning)."""

    def __init__(self, path: str, max_bytes: int = Config.record_trace_max_bytes) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.written = 0
        self.records = 0
        self._file: IO[str] | None = open(path, "a", encoding="utf-8", buffering=1 << 20)  # noqa: SIM115
        self._flushed = time.monotonic()
        log.warning("recording a request trace (prompts included) to %s, up to %d bytes", path, max_bytes)

    def record(self, request: InferenceRequest) -> None:
        f = self._file
        if f is None:
            return
        try:
            # received_at is monotonic; wall-clock time lets the traces of several processes merge
            t = time.time() - (time.monotonic() - request.received_at) if request.received_at else time.time()
            line = record_line(t, request.method, request.headers.get(":path") or request.path, request.headers,
                               request.raw_body)
            if self.written + len(line) > self.max_bytes:
                log.warning("request trace %s reached %d bytes: recording stopped", self.path, self.written)
                self.close()
                return
            f.write(line)
            self.written += len(line)
            self.records += 1
            now = time.monotonic()
            if now - self._flushed > _FLUSH_EVERY:
                f.flush()
                self._flushed = now
        except Exception:
            log.exception("recording request %s to the trace failed", request.request_id)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
