"""A lean gRPC server for the ext_proc port: HTTP/2 and gRPC message framing, on the event loop itself.

Why not grpc.aio: profiling EPP under streamed responses (``py-spy``, bench/README.md §2) put about three
quarters of its CPU in grpc.aio's own machinery, not in EPP: every message read and every message written
is a completion-queue event that a poller thread hands to the event loop through a socket write, then a
future and a task step. An ext_proc stream is one message in and one out per response chunk, so that cost
is paid per streamed token. Here a socket read is parsed in place, each message is handed to its RPC
synchronously, and everything the read produced goes back in one socket write.

Scope: what a gRPC server must do for the clients of this port (Envoy's ext_proc filter and its gRPC health
checker; grpcio clients in tests), per RFC 9113 and the gRPC HTTP/2 protocol: the connection preface,
SETTINGS, PING, WINDOW_UPDATE flow control both ways, HEADERS + CONTINUATION (HPACK decoded by the ``hpack``
library), padded frames, RST_STREAM, GOAWAY (graceful drain), length-prefixed messages up to a size limit,
trailers-only error answers; optionally SETTINGS_MAX_CONCURRENT_STREAMS and a maximum connection age, which
make a client such as Envoy spread its streams over more connections and open new ones over time (``--workers``
places each connection on a worker: epp.workers). Not supported, and refused in the protocol's terms: compressed
messages (``grpc-encoding``), server push. TLS (and mutual TLS) comes from ``ssl.SSLContext`` with ALPN ``h2``.

An RPC is an object the server feeds: ``message(bytes)`` per request message, ``half_close()`` when the
client has sent its last, ``cancel()`` when the stream is reset or the connection lost. It answers through
its ``Call``: ``send(bytes)`` and ``finish(status, message)``; ``before_flush(fn)`` lets it hold an answer until the
read it is handling is done (the ext_proc RPC merges its answers to one read's body chunks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Protocol

import hpack

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Error codes (RFC 9113 §7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
# gRPC status codes
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT = 0, 1, 2, 3
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14

DEFAULT_WINDOW = 65_535
MAX_FRAME_SIZE = 1 << 20  # what we accept (advertised): big request bodies arrive in few frames
RECV_WINDOW = 16 << 20  # advertised per stream and for the connection; replenished at half
MAX_HEADER_BLOCK = 256 << 10  # a header block (with CONTINUATIONs) larger than this ends the connection
MAX_STREAM_ID = 0x7FFFFFFF
# A graceful GOAWAY is two (RFC 9113 §6.8, as gRPC servers do): the first, naming the largest stream id, tells the
# client to open no more streams here, and a PING follows it; streams the client opened before it read that GOAWAY
# arrive before the PING's ACK and are served. The second GOAWAY, on the ACK (or after this many seconds without
# one), names the last stream really received; later ones are refused.
GOAWAY_PING = b"goaway\x00\x00"
GOAWAY_ACK_TIMEOUT = 5.0
AGE_JITTER = 0.1  # connection ages vary by +-10%, so connections opened together do not all go away together
_FRAME_HEAD = struct.Struct(">BHBBL")  # 24-bit length as 8 + 16 bits, type, flags, stream id
_U32 = struct.Struct(">L")
_GRPC_PREFIX = struct.Struct(">BL")


def _frame_head(ftype: int, flags: int, stream_id: int, n: int) -> bytes:
    return _FRAME_HEAD.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id)


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _frame_head(ftype, flags, stream_id, len(payload)) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name (RFC 7541 §6.2.2): touches no dynamic table, so
    the server needs no HPACK encoder state."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


# ":status: 200" is static entry 8; "content-type" static name 31, as a literal without indexing.
_RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + _hpack_int(16, 7) + b"application/grpc"
_OK_TRAILERS = _literal(b"grpc-status", b"0")


def _percent_encode(text: str) -> bytes:
    """grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2)."""
    raw = text.encode("utf-8")
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in raw)


class ConnectionError_(Exception):  # not the builtin: ends the connection with GOAWAY(code)
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Rpc(Protocol):
    def message(self, data: bytes) -> None: ...
    def half_close(self) -> None: ...
    def cancel(self) -> None: ...


RpcFactory = Callable[["Call"], Rpc]


class Call:
    """One gRPC stream on a connection: what an RPC answers through."""

    __slots__ = (
        "buf",
        "conn",
        "finished",
        "headers_sent",
        "metadata",
        "pending",
        "pending_trailers",
        "recv_unacked",
        "remote_closed",
        "rpc",
        "send_window",
        "stream_id",
    )

    def __init__(self, conn: _Connection, stream_id: int, send_window: int, metadata: dict[str, str]) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.send_window = send_window
        self.recv_unacked = 0
        self.buf = bytearray()  # request bytes of a message not yet whole
        self.rpc: Rpc | None = None
        self.headers_sent = False
        self.finished = False  # trailers queued or sent: nothing more is sent
        self.remote_closed = False
        # DATA payload waiting for flow-control window: a view of what send() was given (a large body waits for
        # several WINDOW_UPDATEs, and is not copied at each), made a bytearray only if more is sent meanwhile.
        self.pending: bytearray | memoryview | None = None
        self.pending_trailers: bytes | None = None
        self.metadata = metadata  # the request's headers (lower-case names)

    def send(self, message: bytes) -> None:
        """Send one response message (serialized protobuf)."""
        if self.finished:
            return
        out = self.conn.out
        if not self.headers_sent:
            self.headers_sent = True
            out.append(_frame(HEADERS, END_HEADERS, self.stream_id, _RESPONSE_HEADERS))
        data = _GRPC_PREFIX.pack(0, len(message)) + message
        if self.pending is not None:
            if isinstance(self.pending, memoryview):
                self.pending = bytearray(self.pending)
            self.pending += data
            return
        self.conn.send_data(self, data)

    def flush(self) -> None:
        """Write what was sent outside a socket read (after an awaited step); within one, the read's single
        write carries it."""
        self.conn.flush()

    def before_flush(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once, just before the connection next writes (at the end of the read being handled, or at
        the next ``flush``): an RPC may hold an answer back to merge it with its answers to the read's later
        messages."""
        self.conn.before_flush.append(fn)

    def finish(self, status: int = OK, message: str = "") -> None:
        """End the RPC with trailers (trailers-only when nothing was sent); later calls are ignored."""
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        if status == OK and not message:
            block = _OK_TRAILERS
        else:
            block = _literal(b"grpc-status", str(status).encode()) + (
                _literal(b"grpc-message", _percent_encode(message)) if message else b"")
        if not self.headers_sent:
            self.headers_sent = True
            block = _RESPONSE_HEADERS + block
        trailers = _frame(HEADERS, END_HEADERS | END_STREAM, self.stream_id, block)
        if self.pending is not None:
            self.pending_trailers = trailers  # after the data still waiting for window
            return
        conn.out.append(trailers)
        conn.closed_locally(self)


class Server:
    """Serves ``methods`` (path -> RPC factory) on one port; ``start`` returns the bound port."""

    def __init__(self, methods: dict[str, RpcFactory], max_message_bytes: int = 4 << 20,
                 tls: Callable[[], ssl.SSLContext] | None = None, handshake_timeout: float = 10.0,
                 max_concurrent_streams: int = 0, max_connection_age: float = 0.0) -> None:
        self.methods = methods
        self.max_message_bytes = max_message_bytes
        self.tls = tls  # asked for the context at each new connection: certificates reload without a restart
        self.handshake_timeout = handshake_timeout
        # Advertised in SETTINGS (0: no limit, not advertised). Envoy's connection pool honours it: past it, its
        # streams go to another connection, opened when all are full.
        self.max_concurrent_streams = max_concurrent_streams
        # Seconds (+-AGE_JITTER) after which a connection is told to go away gracefully (0: never): the client
        # opens a new one, which --workers places anew; streams in flight finish on the old one.
        self.max_connection_age = max_connection_age
        self.connections: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self.draining = False
        self.connections_total = 0  # accepted or adopted, since start
        self.connections_aged = 0  # told to go away for their age
        self.streams_refused = 0  # over max_concurrent_streams

    @property
    def active_calls(self) -> int:
        return sum(len(c.calls) for c in self.connections)

    def _protocol(self) -> asyncio.Protocol:
        return _Connection(self) if self.tls is None else _TlsConnection(self)

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, backlog=1024)
        return self._server.sockets[0].getsockname()[1]

    async def adopt(self, sock: socket.socket) -> None:
        """Serve a connection accepted elsewhere (``--workers``: by the supervisor, handed over a Unix socket)."""
        await asyncio.get_running_loop().connect_accepted_socket(self._protocol, sock)

    async def stop(self, grace: float | None) -> None:
        """Stop accepting, tell every connection to go away (streams in flight continue), wait up to ``grace``
        seconds for them to end, then close what is left."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.go_away(NO_ERROR)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (grace or 0.0)
        while self.active_calls and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()


class _TlsConnection(asyncio.Protocol):
    """TLS in memory (``ssl.MemoryBIO``) around an HTTP/2 connection, with the context current when the
    connection was accepted: certificates and the client CA reload without a restart, and each read is still
    decrypted and handed over in one piece. The HTTP/2 connection sees this object as its transport."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.inner = _Connection(server)
        self.transport: asyncio.Transport | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls: ssl.SSLObject | None = None
        self.ready = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        try:
            self.tls = self.server.tls().wrap_bio(self.incoming, self.outgoing, server_side=True)  # type: ignore[misc]
        except Exception:
            log.exception("ext_proc TLS context unavailable")
            transport.abort()  # type: ignore[attr-defined]
            return
        self.timer = asyncio.get_running_loop().call_later(self.server.handshake_timeout, self.abort)

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            return
        self.incoming.write(data)
        if not self.ready:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._send_tls()
                return
            except (ssl.SSLError, OSError) as e:
                log.debug("ext_proc TLS handshake failed: %r", e)
                self._send_tls()
                self.abort()
                return
            self.ready = True
            if self.timer is not None:
                self.timer.cancel()
            self._send_tls()
            self.inner.connection_made(self)  # type: ignore[arg-type]
        plain = []
        tls, incoming = self.tls, self.incoming
        try:
            # Read while records (or decrypted bytes) are left, rather than until SSLWantReadError: raising it
            # took ~1.6 us per socket read, and a streamed response is one read per chunk.
            while incoming.pending or tls.pending():
                piece = tls.read(1 << 18)
                if not piece:
                    break
                plain.append(piece)
        except ssl.SSLWantReadError:  # a record not yet whole
            pass
        except ssl.SSLZeroReturnError:  # close_notify
            self.close()
        except (ssl.SSLError, OSError) as e:
            log.debug("ext_proc TLS error: %r", e)
            self.abort()
        if plain:
            self.inner.data_received(b"".join(plain))
        self._send_tls()

    def _send_tls(self) -> None:
        if self.outgoing.pending and self.transport is not None:
            self.transport.write(self.outgoing.read())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.ready:
            self.inner.connection_lost(exc)
        self.transport = None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- the transport the HTTP/2 connection writes to ------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.tls is not None and self.transport is not None:
            self.tls.write(data)
            self._send_tls()

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                self.tls.unwrap()  # type: ignore[union-attr]  # close_notify
            self._send_tls()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface_seen = False
        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = 1 << 16
        self.calls: dict[int, Call] = {}
        self.out: list[bytes | memoryview] = []  # frames produced while handling input; written once per read
        self.before_flush: list[Callable[[], None]] = []  # Call.before_flush
        self.send_window = DEFAULT_WINDOW  # connection-level, what the peer lets us send
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.recv_unacked = 0
        self.last_stream = 0
        self.continuation: tuple[int, int, list[bytes], int] | None = None  # stream, flags, fragments, size
        self.blocked: dict[int, Call] = {}  # calls with data waiting for window
        self.replenish: list[Call] = []  # calls past half their receive window this read (rare: 8 MiB unacked)
        self.going_away = False  # the last GOAWAY is out (or the peer's came): new streams are refused
        self.goaway_announced = False  # the first of a graceful pair is out: new streams still served
        self.goaway_timer: asyncio.TimerHandle | None = None
        self.age_timer: asyncio.TimerHandle | None = None
        self.settings_acked = False  # the peer has our SETTINGS: past this, max_concurrent_streams is enforced
        self.opened_at = 0.0  # loop time of connection_made
        self.paths: set[str] = set()  # methods called on this connection (epp.workers tells health checks apart)
        self.paused = False

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.opened_at = asyncio.get_running_loop().time()
        server = self.server
        server.connections.add(self)
        server.connections_total += 1
        settings = struct.pack(">HLHLHL", 0x4, RECV_WINDOW, 0x5, MAX_FRAME_SIZE, 0x2, 0)  # window, frame, no push
        if server.max_concurrent_streams > 0:
            settings += struct.pack(">HL", 0x3, server.max_concurrent_streams)
        self.out.append(_frame(SETTINGS, 0, 0, settings))
        self.out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(RECV_WINDOW - DEFAULT_WINDOW)))
        if server.draining:
            self.go_away(NO_ERROR)
        elif server.max_connection_age > 0:
            age = server.max_connection_age * random.uniform(1 - AGE_JITTER, 1 + AGE_JITTER)
            self.age_timer = asyncio.get_running_loop().call_later(age, self._aged)
        self.flush()

    def _aged(self) -> None:
        self.age_timer = None
        if not self.goaway_announced and not self.going_away:
            self.server.connections_aged += 1
            self.go_away(NO_ERROR)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._parse()
        except ConnectionError_ as e:
            log.warning("ext_proc connection error: %s", e)
            self.go_away(e.code, str(e))
            self.flush()
            self.abort()
            return
        self._replenish()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for timer in (self.age_timer, self.goaway_timer):
            if timer is not None:
                timer.cancel()
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.finished = True
            self._cancel(call)
        self.transport = None

    def pause_writing(self) -> None:  # the peer reads slower than we answer: stop reading from it
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    # -- output -------------------------------------------------------------------------------------------

    def flush(self) -> None:
        if self.before_flush:
            hooks, self.before_flush = self.before_flush, []
            for fn in hooks:
                try:
                    fn()
                except Exception:
                    log.exception("ext_proc: an RPC's held answer could not be sent")
        if self.out:
            out, self.out = self.out, []
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(out))

    def send_data(self, call: Call, data: bytes | bytearray | memoryview) -> None:
        """Send DATA frames as far as both flow-control windows allow; keep the rest pending."""
        view = memoryview(data)
        sent = 0
        total = len(view)
        limit = self.peer_max_frame
        while sent < total:
            room = min(call.send_window, self.send_window, limit)
            if room <= 0:
                call.pending = view[sent:]
                self.blocked[call.stream_id] = call
                return
            n = min(room, total - sent)
            # The header and a view of the payload: flush's join is the one copy (a large body is ~4 frames).
            self.out += (_frame_head(DATA, 0, call.stream_id, n), view[sent:sent + n])
            call.send_window -= n
            self.send_window -= n
            sent += n

    def _unblock(self) -> None:
        for stream_id, call in list(self.blocked.items()):
            if self.send_window <= 0:
                return
            data, call.pending = call.pending, None
            del self.blocked[stream_id]
            if data:
                self.send_data(call, data)
            if call.pending is None and call.pending_trailers is not None:
                self.out.append(call.pending_trailers)
                call.pending_trailers = None
                self.closed_locally(call)

    def closed_locally(self, call: Call) -> None:
        """Our trailers are out. If the client still has its side open, reset it with NO_ERROR so it stops
        sending (what gRPC servers do); either way the stream is over for us."""
        if not call.remote_closed:
            self.out.append(_frame(RST_STREAM, 0, call.stream_id, _U32.pack(NO_ERROR)))
        call.rpc = None  # the RPC holds its call: without this each request is cyclic garbage for the collector
        self.calls.pop(call.stream_id, None)
        self.blocked.pop(call.stream_id, None)
        if self.going_away and not self.calls:
            self.flush()
            self.close_when_written()

    def go_away(self, code: int, reason: str = "") -> None:
        """Close the connection: at once on an error; gracefully (NO_ERROR) in two steps, see GOAWAY_PING."""
        if self.transport is None or self.going_away:
            return
        if code == NO_ERROR and not self.goaway_announced:
            self.goaway_announced = True
            self.out.append(_frame(GOAWAY, 0, 0, _U32.pack(MAX_STREAM_ID) + _U32.pack(NO_ERROR)))
            self.out.append(_frame(PING, 0, 0, GOAWAY_PING))
            self.flush()
            self.goaway_timer = asyncio.get_running_loop().call_later(GOAWAY_ACK_TIMEOUT, self._final_goaway)
            return
        self._final_goaway(code, reason)

    def _final_goaway(self, code: int = NO_ERROR, reason: str = "") -> None:
        if self.transport is None or self.going_away:
            return
        if self.goaway_timer is not None:
            self.goaway_timer.cancel()
            self.goaway_timer = None
        self.going_away = True
        self.out.append(_frame(GOAWAY, 0, 0, _U32.pack(self.last_stream) + _U32.pack(code) + reason.encode()[:256]))
        self.flush()
        if not self.calls:
            self.close_when_written()

    def close_when_written(self) -> None:
        if self.transport is not None:
            self.transport.close()  # writes what is buffered first

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- input --------------------------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self.buf
        pos = 0
        if not self.preface_seen:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            if buf[:len(PREFACE)] != PREFACE:
                raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self.preface_seen = True
            pos = len(PREFACE)
        end = len(buf)
        unpack = _FRAME_HEAD.unpack_from
        with memoryview(buf) as view:
            while end - pos >= 9:
                hi, lo, ftype, flags, stream_id = unpack(buf, pos)
                length = (hi << 16) | lo
                if length > MAX_FRAME_SIZE:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - pos - 9 < length:
                    break
                start, pos = pos + 9, pos + 9 + length
                # DATA as a view, not two copies: _messages copies each message out once.
                self._frame(ftype, flags, stream_id & 0x7FFFFFFF,
                            view[start:pos] if ftype == DATA else bytes(view[start:pos]))
        if pos:
            # A new buffer for the rest, not this one resized: a view may outlive the read (an error an RPC keeps
            # holds its traceback's frames), and a bytearray with a view cannot change size.
            self.buf = buf[pos:]

    def _frame(self, ftype: int, flags: int, stream_id: int, payload: bytes | memoryview) -> None:
        if self.continuation is not None and ftype != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "header block interrupted")
        if ftype == DATA:
            self._on_data(flags, stream_id, payload)
        elif ftype == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif ftype == CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif ftype == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif ftype == PING:
            if len(payload) != 8 or stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "bad PING")
            if not flags & ACK:
                self.out.append(_frame(PING, ACK, 0, payload))
            elif payload == GOAWAY_PING and self.goaway_announced:
                self._final_goaway()
        elif ftype == RST_STREAM:
            call = self.calls.pop(stream_id, None)
            if call is not None:
                call.finished = True
                self.blocked.pop(stream_id, None)
                self._cancel(call)
                if self.going_away and not self.calls:  # its last stream, reset by the client
                    self.flush()
                    self.close_when_written()
        elif ftype == GOAWAY:
            self.going_away = True
            if not self.calls:
                self.close_when_written()
        elif ftype == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "a client cannot push")
        # PRIORITY and unknown frame types are ignored (RFC 9113 §5.5)

    @staticmethod
    def _unpad(flags: int, payload: bytes | memoryview) -> bytes | memoryview:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ConnectionError_(PROTOCOL_ERROR, "bad padding")
            return payload[1: len(payload) - payload[0]]
        return payload

    def _on_data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        self.recv_unacked += len(payload)  # padding counts against flow control too
        call = self.calls.get(stream_id)
        if call is None or call.remote_closed:
            return  # a stream we ended (or reset): its late data only counts against the connection window
        call.recv_unacked += len(payload)
        if call.recv_unacked >= RECV_WINDOW // 2:
            self.replenish.append(call)
        data = self._unpad(flags, payload)
        if data:
            self._messages(call, data)
        if flags & END_STREAM and not call.remote_closed:
            call.remote_closed = True
            if call.rpc is not None and not call.finished:
                self._guard(call, call.rpc.half_close)
            elif call.finished:
                self.calls.pop(stream_id, None)

    def _messages(self, call: Call, data: bytes | memoryview) -> None:
        """Cut gRPC length-prefixed messages out of the stream's bytes and hand them to the RPC."""
        buf = call.buf
        if not buf and len(data) >= 5:  # the common case: a frame holds whole messages
            flag, n = _GRPC_PREFIX.unpack_from(data, 0)
            if len(data) == 5 + n and not flag and n <= self.server.max_message_bytes:
                if call.rpc is not None and not call.finished:
                    self._guard(call, call.rpc.message, bytes(data[5:]))
                return
        buf += data
        while len(buf) >= 5 and not call.finished:
            flag, n = _GRPC_PREFIX.unpack_from(buf, 0)
            if flag:
                call.finish(UNIMPLEMENTED, "compressed messages are not supported")
                self._cancel(call)
                return
            if n > self.server.max_message_bytes:
                call.finish(RESOURCE_EXHAUSTED, f"message of {n} bytes exceeds the limit of "
                            f"{self.server.max_message_bytes}")
                self._cancel(call)
                return
            if len(buf) < 5 + n:
                return
            message = bytes(buf[5: 5 + n])
            del buf[: 5 + n]
            if call.rpc is not None:
                self._guard(call, call.rpc.message, message)

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if flags & END_HEADERS:
            self._on_header_block(flags, stream_id, block)
        else:
            self.continuation = (stream_id, flags, [block], len(block))

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is None or self.continuation[0] != stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
        sid, first_flags, fragments, size = self.continuation
        size += len(payload)
        if size > MAX_HEADER_BLOCK:
            raise ConnectionError_(PROTOCOL_ERROR, "header block too large")
        fragments.append(payload)
        self.continuation = (sid, first_flags, fragments, size)
        if flags & END_HEADERS:
            self.continuation = None
            self._on_header_block(first_flags, sid, b"".join(fragments))

    def _on_header_block(self, flags: int, stream_id: int, block: bytes) -> None:
        try:  # always decoded, even for a stream we refuse: the HPACK table is shared by the connection
            fields = self.decoder.decode(block, raw=True)
        except hpack.HPACKError as e:
            raise ConnectionError_(COMPRESSION_ERROR, f"HPACK: {e}") from None
        call = self.calls.get(stream_id)
        if call is not None:  # trailers from the client end its side
            if flags & END_STREAM and not call.remote_closed:
                call.remote_closed = True
                if call.rpc is not None and not call.finished:
                    self._guard(call, call.rpc.half_close)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            raise ConnectionError_(PROTOCOL_ERROR, f"stream {stream_id} is not a new client stream")
        self.last_stream = stream_id
        limit = self.server.max_concurrent_streams
        # Over the limit only once the peer has it: before our SETTINGS reach it, a client may open more, and Envoy
        # does not retry a refused ext_proc stream (its request fails), so those are served.
        if self.going_away or (limit and self.settings_acked and len(self.calls) >= limit):
            if not self.going_away:
                self.server.streams_refused += 1
            self.out.append(_frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        metadata = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in fields}
        call = Call(self, stream_id, self.peer_initial_window, metadata)
        call.remote_closed = bool(flags & END_STREAM)
        self.calls[stream_id] = call
        path = metadata.get(":path", "")
        factory = self.server.methods.get(path)
        if factory is None:
            call.finish(UNIMPLEMENTED, f"unknown method {path}")
            return
        self.paths.add(path)  # served methods only: a finite set
        if metadata.get("grpc-encoding", "identity") not in ("identity", ""):
            call.finish(UNIMPLEMENTED, "compressed messages are not supported")
            return
        try:
            call.rpc = factory(call)
        except Exception:
            log.exception("RPC %s failed to start", metadata.get(":path"))
            call.finish(INTERNAL, "internal error")
            return
        if call.remote_closed:
            self._guard(call, call.rpc.half_close)

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += increment
        else:
            call = self.calls.get(stream_id)
            if call is None:
                return
            call.send_window += increment
        if self.blocked:
            self._unblock()

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            self.settings_acked = True
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "bad SETTINGS")
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, i)
            if key == 0x4:  # INITIAL_WINDOW_SIZE: applies to every open stream by difference
                if value > 0x7FFFFFFF:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for call in self.calls.values():
                    call.send_window += delta
            elif key == 0x5:  # MAX_FRAME_SIZE
                if not 16_384 <= value <= 16_777_215:
                    raise ConnectionError_(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.peer_max_frame = value
        self.out.append(_frame(SETTINGS, ACK, 0))
        if self.blocked:
            self._unblock()

    def _replenish(self) -> None:
        """Give the peer its receive window back once half is used (we consume input as it arrives)."""
        if self.recv_unacked >= RECV_WINDOW // 2:
            self.out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.recv_unacked)))
            self.recv_unacked = 0
        if not self.replenish:  # every read: a list checked, not every open stream
            return
        calls, self.replenish = self.replenish, []
        calls_open = self.calls
        for call in calls:
            # still open: a call ended in this read (our trailers, RST_STREAM) is owed nothing more on its stream
            if call.recv_unacked >= RECV_WINDOW // 2 and not call.remote_closed \
                    and calls_open.get(call.stream_id) is call:
                self.out.append(_frame(WINDOW_UPDATE, 0, call.stream_id, _U32.pack(call.recv_unacked)))
                call.recv_unacked = 0

    # -- RPC callbacks --------------------------------------------------------------------------------------

    def _guard(self, call: Call, fn: Callable[..., None], *args: bytes) -> None:
        """An RPC's exception ends that RPC with INTERNAL, never the connection."""
        try:
            fn(*args)
        except Exception:
            log.exception("RPC on stream %d failed", call.stream_id)
            if not call.finished:
                call.finish(INTERNAL, "internal error")
                self._cancel(call)

    @staticmethod
    def _cancel(call: Call) -> None:
        rpc, call.rpc = call.rpc, None
        if rpc is not None:
            try:
                rpc.cancel()
            except Exception:
                log.exception("RPC cancel on stream %d failed", call.stream_id)
