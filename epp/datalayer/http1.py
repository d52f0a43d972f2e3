"""A lean HTTP/1.1 GET client for the metrics scrapes: one keep-alive connection per endpoint, one request at a
time, parsed in the event loop's own protocol callbacks.

Why not aiohttp (which the rest of EPP uses): a scrape is one small GET every 50 ms per endpoint, and aiohttp's
client machinery (request and response objects, the connector's bookkeeping, a stream reader per response) cost
about 220 µs of CPU per scrape in ``bench/scrape_bench.py``, several times what parsing the page costs, and with
a hundred endpoints a third of a core. Here a request is one write and the answer is parsed where it is read.

Scope: what a Prometheus endpoint answers (vLLM's, SGLang's, Triton's): a status line, headers, then a body
framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the connection's close. No redirects, no
compression (we do not ask for it), no request body. TLS through ``ssl.SSLContext``. A response the client
cannot frame is an ``HttpError``; a connection that closed or reset before the status line is ``Unanswered``
(the server did not speak HTTP at all: the scraper counts those towards ``unreachable``).
"""

from __future__ import annotations

import asyncio
import ssl

MAX_HEAD = 64 << 10  # status line and headers
MAX_BODY = 64 << 20  # a metrics page; vLLM's is ~25 KB, with many LoRA adapters a few MB


class HttpError(Exception):
    """The server answered something this client cannot read as an HTTP/1.1 response."""


class Unanswered(ConnectionError):
    """The connection ended before the server sent a status line."""


class _Connection(asyncio.Protocol):
    """One connection; ``request`` sends a GET and resolves with ``(status, body)`` when the body is complete."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._buf = bytearray()
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._body_at = -1  # where the body starts in _buf, once the head is read
        self._length = -1  # Content-Length; -1: chunked (_chunked) or until close
        self._chunked = False
        self._keep_alive = True

    # -- asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        w = self.waiter
        if w is None or w.done():
            return
        try:
            done = self._parse()
        except HttpError as e:
            w.set_exception(e)
            self.close()
            return
        if done is not None:
            w.set_result(done)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is None or w.done():
            return
        if self._body_at >= 0 and self._length < 0 and not self._chunked:  # the body ran until close
            w.set_result((self._status, bytes(self._buf[self._body_at:])))
        elif self._body_at < 0 and not self._buf:
            w.set_exception(Unanswered(f"connection closed without an answer{f': {exc}' if exc else ''}"))
        else:
            w.set_exception(HttpError("connection closed before the response was complete"))

    # -- requests -----------------------------------------------------------------------------------------

    def request(self, head: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None and not self.closed
        self._buf.clear()
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(head)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- parsing ------------------------------------------------------------------------------------------

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self._buf
        if self._body_at < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise HttpError("response head too large")
                return None
            self._read_head(bytes(buf[:end]).decode("latin-1"))
            self._body_at = end + 4
        if self._chunked:
            return self._dechunk()
        if self._length >= 0:
            if len(buf) - self._body_at < self._length:
                return None
            body = bytes(buf[self._body_at:self._body_at + self._length])
            return self._done(body)
        if len(buf) - self._body_at > MAX_BODY:
            raise HttpError("response body too large")
        return None  # until the server closes

    def _read_head(self, head: str) -> None:
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
        self._status = int(parts[1])
        self._keep_alive = parts[0] != "HTTP/1.0"
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError("malformed header line")
            name = name.strip().lower()
            value = value.strip()
            if name == "content-length":
                if not value.isdigit() or int(value) > MAX_BODY:
                    raise HttpError(f"bad Content-Length {value[:20]!r}")
                self._length = int(value)
            elif name == "transfer-encoding":
                self._chunked = value.lower().endswith("chunked")
            elif name == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                if "close" in tokens:
                    self._keep_alive = False
                elif "keep-alive" in tokens:
                    self._keep_alive = True
        if self._chunked:
            self._length = -1
        elif self._length < 0:
            self._keep_alive = False  # framed by the close

    def _dechunk(self) -> tuple[int, bytes] | None:
        buf = self._buf
        pos = self._body_at
        pieces: list[bytes] = []
        total = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError("bad chunk size") from None
            if size == 0:
                end = buf.find(b"\r\n\r\n", eol)  # optional trailers, then the empty line
                if end < 0 and buf[eol:eol + 4] != b"\r\n\r\n":
                    return None
                return self._done(b"".join(pieces))
            if len(buf) < eol + 2 + size + 2:
                return None
            pieces.append(bytes(buf[eol + 2:eol + 2 + size]))
            pos = eol + 2 + size + 2
            total += size
            if total > MAX_BODY:
                raise HttpError("response body too large")

    def _done(self, body: bytes) -> tuple[int, bytes]:
        if not self._keep_alive:
            self.close()
        return self._status, body


class Http1Client:
    """GETs over one kept-alive connection per key (an endpoint). A request on a connection the server had
    already closed (its keep-alive timeout) is sent again once on a new connection."""

    def __init__(self, accept: str, ssl_context: ssl.SSLContext | None = None) -> None:
        self.accept = accept
        self.ssl = ssl_context
        self._connections: dict[object, _Connection] = {}

    async def get(self, key: object, host: str, port: int, path: str) -> tuple[int, bytes]:
        """``host`` as a name or a bare IP address (an IPv6 one without brackets)."""
        conn = self._connections.get(key)
        reused = conn is not None and not conn.closed
        if not reused:
            conn = await self._connect(key, host, port)
        assert conn is not None
        head = f"GET {path} HTTP/1.1\r\nHost: {_host_header(host, port)}\r\nAccept: {self.accept}\r\n\r\n".encode()
        try:
            try:
                return await conn.request(head)
            except Unanswered:
                if not reused:
                    raise
            conn = await self._connect(key, host, port)
            return await conn.request(head)
        except BaseException:  # a timeout, a cancel or an unreadable answer: what follows on it is not ours
            self.drop(key)
            raise

    async def _connect(self, key: object, host: str, port: int) -> _Connection:
        old = self._connections.pop(key, None)
        if old is not None:
            old.close()
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, host, port, ssl=self.ssl,
                                               server_hostname="" if self.ssl is not None else None)
        self._connections[key] = conn
        return conn

    def drop(self, key: object) -> None:
        """Close the connection kept for ``key`` (an endpoint that left, or a request that timed out: what it
        still receives belongs to the abandoned request)."""
        conn = self._connections.pop(key, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
