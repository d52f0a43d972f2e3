"""epp.datalayer.http1 against real servers on loopback: aiohttp's (what the simulator and many exporters run)
and raw asyncio servers for the framings and faults aiohttp does not produce on demand."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from epp.datalayer.http1 import Http1Client, HttpError, Unanswered

PAGE = "# HELP vllm:num_requests_running x\nvllm:num_requests_running 3\n" * 200


@pytest.fixture
async def aiohttp_server() -> AsyncIterator[tuple[int, list[str]]]:
    peers: list[str] = []

    async def metrics(req: web.Request) -> web.Response:
        peers.append(str(req.transport.get_extra_info("peername")))  # type: ignore[union-attr]
        if req.query.get("status"):
            return web.Response(status=int(req.query["status"]), text="no")
        return web.Response(text=PAGE, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    yield sock.getsockname()[1], peers
    await runner.cleanup()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def test_content_length_pages_reuse_one_connection(aiohttp_server) -> None:
    port, peers = aiohttp_server
    client = Http1Client("text/plain")
    for _ in range(5):
        status, body = await client.get("ep", "127.0.0.1", port, "/metrics")
        assert status == 200 and body.decode() == PAGE
    assert await client.get("ep", "127.0.0.1", port, "/metrics?status=500") == (500, b"no")
    assert len(set(peers)) == 1 and len(peers) == 6  # kept alive
    client.close()


async def test_chunked_with_trailers_and_close_delimited_bodies(raw_server) -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):  # two requests on one connection
            await _read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)  # the rest in a later read
            writer.write(b"6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")
        await reader.read()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        writer.close()

    client = Http1Client("*/*")
    port = await raw_server(chunked)
    assert await client.get("a", "127.0.0.1", port, "/m") == (200, b"hello world")
    assert await client.get("a", "127.0.0.1", port, "/m") == (200, b"hello world")
    port = await raw_server(until_close)
    assert await client.get("b", "127.0.0.1", port, "/m") == (200, b"all of it")
    assert await client.get("b", "127.0.0.1", port, "/m") == (200, b"all of it")  # reconnects
    client.close()


async def test_a_keep_alive_connection_the_server_closed_is_retried_once(raw_server) -> None:
    connections = 0

    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await _read_head(reader)  # the next request crossed the server's keep-alive timeout: closed unanswered
        writer.close()

    port = await raw_server(one_per_connection)
    client = Http1Client("*/*")
    assert await client.get("a", "127.0.0.1", port, "/m") == (200, b"ok")
    assert await client.get("a", "127.0.0.1", port, "/m") == (200, b"ok")
    assert connections == 2
    client.close()


async def test_faults_are_told_apart(raw_server) -> None:
    async def silent_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        writer.close()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        await asyncio.sleep(10)

    client = Http1Client("*/*")
    with pytest.raises(Unanswered):
        await client.get("a", "127.0.0.1", await raw_server(silent_close), "/m")
    with pytest.raises(HttpError, match="status line"):
        await client.get("b", "127.0.0.1", await raw_server(garbage), "/m")
    with pytest.raises(HttpError, match="before the response was complete"):
        await client.get("c", "127.0.0.1", await raw_server(truncated), "/m")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await client.get("d", "127.0.0.1", await raw_server(hang), "/m")
    assert "d" not in client._connections  # its late answer must not be read as the next one's
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(ConnectionRefusedError):
        await client.get("e", "127.0.0.1", port, "/m")
    client.close()


async def test_tls_without_verification_as_gie_scrapes(tmp_path) -> None:
    """``--model-server-metrics-scheme https``: GIE skips verification (insecureSkipVerify), so a pod's
    self-signed certificate is accepted."""
    import ssl

    from epp.tls import self_signed, ssl_context

    key, cert = self_signed("pod")
    server_ctx = ssl_context(key, cert)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nTLS")
        await writer.drain()
        await reader.read()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client = Http1Client("*/*", client_ctx)
    try:
        port = server.sockets[0].getsockname()[1]
        assert await client.get("a", "127.0.0.1", port, "/metrics") == (200, b"TLS")
    finally:
        client.close()
        server.close()
        await server.wait_closed()
