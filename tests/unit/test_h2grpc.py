"""The lean gRPC server (``epp.extproc.h2grpc``) against independent HTTP/2 peers: grpcio's client (C-core)
for the gRPC semantics, and raw sockets for the protocol's edges. Envoy itself drives it in every
end-to-end test."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import grpc
import hpack
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp import tls
from epp.extproc import h2grpc
from epp.extproc.servicer import ExtProcServicer
from epp.extproc.stream import StreamOptions
from epp.health import HealthServicer
from tests.extproc_helpers import body_msg, headers_msg, make_director, response_body_msg, response_headers_msg

HOST = "127.0.0.1"
EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"


class Running:
    """The server on its own event loop in a thread, so blocking grpcio clients can talk to it."""

    def __init__(self, server: h2grpc.Server) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.call(server.start(HOST, 0))

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=20)

    def stop(self, grace: float = 0.0) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _servicer(max_message: int = 4 << 20, context=None) -> tuple[ExtProcServicer, h2grpc.Server]:  # type: ignore[no-untyped-def]
    servicer = ExtProcServicer(make_director([("a", 0, 0.0), ("b", 0, 0.0)]), StreamOptions())
    return servicer, h2grpc.Server(servicer.methods(HealthServicer(lambda: True)), max_message, context)


@pytest.fixture
def running() -> Iterator[tuple[ExtProcServicer, Running]]:
    servicer, server = _servicer(max_message=1 << 20)
    r = Running(server)
    try:
        yield servicer, r
    finally:
        r.stop()


def _stub(port: int) -> tuple[grpc.Channel, pb_grpc.ExternalProcessorStub]:
    ch = grpc.insecure_channel(f"{HOST}:{port}")
    return ch, pb_grpc.ExternalProcessorStub(ch)


def test_health_check_answers_on_the_ext_proc_port(running):
    _, r = running
    with grpc.insecure_channel(f"{HOST}:{r.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(3):  # several RPCs on one connection
            assert stub.Check(health_pb2.HealthCheckRequest(service=EXT_PROC), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        listed = stub.List(health_pb2.HealthListRequest(), timeout=5)
        assert set(listed.statuses) == {"liveness", "readiness", EXT_PROC}
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_an_unknown_method_is_unimplemented(running):
    """(A method of a service that is served, but not this one.)"""
    _, r = running
    with grpc.insecure_channel(f"{HOST}:{r.port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/grpc.health.v1.Health/Nope")(b"", timeout=5)
        assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED


def _exchange(body: bytes, response: bytes) -> list[pb.ProcessingRequest]:
    return [headers_msg("/v1/completions"), body_msg(body), response_headers_msg(200, "application/json"),
            response_body_msg(response, eos=True)]


def test_a_whole_ext_proc_exchange_and_large_bodies_cross_flow_control(running):
    """A 600 KB prompt comes back as the routed body in 62 KB pieces: far more than HTTP/2's default 64 KiB
    window and 16 KiB frames, so the server must split frames and wait for the client's window updates."""
    servicer, r = running
    prompt = "word " * 120_000
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 1}).encode()
    answer = json.dumps({"choices": [{"text": "x"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
    ch, stub = _stub(r.port)
    with ch:
        out = list(stub.Process(iter(_exchange(body, answer)), timeout=20))
    kinds = [m.WhichOneof("response") for m in out]
    assert kinds[0] == "request_headers" and kinds[-2:] == ["response_headers", "response_body"]
    echoed = b"".join(m.request_body.response.body_mutation.streamed_response.body for m in out
                      if m.HasField("request_body"))
    assert echoed == body and len(echoed) > 500_000
    assert out[-1].response_body.response.body_mutation.streamed_response.end_of_stream
    assert servicer.active_streams == 0


def test_a_refused_body_leaves_the_connection_serving(running):
    """A body EPP refuses keeps its error, and the error its traceback: the connection's read buffer must still
    move on (it is handed out as views) and serve the next request."""
    _, r = running
    ch, stub = _stub(r.port)
    with ch:
        refused = list(stub.Process(iter([headers_msg("/v1/completions"), body_msg(b"{not json")]), timeout=20))
        assert refused[-1].immediate_response.status.code == 400
        body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 1}).encode()
        assert len(list(stub.Process(iter(_exchange(body, b"{}")), timeout=20))) == 4


def test_many_concurrent_streams_on_one_connection(running):
    servicer, r = running
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 1}).encode()
    ch, stub = _stub(r.port)
    results: list[int] = []

    def one() -> None:
        results.append(len(list(stub.Process(iter(_exchange(body, b"{}")), timeout=20))))

    with ch:
        threads = [threading.Thread(target=one) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert results == [4] * 24
    assert servicer.active_streams == 0


def test_a_finished_stream_leaves_no_cyclic_garbage(running):
    """Each request's objects (its RPC, stream, request, decision) are freed when its stream ends, by reference
    counting: cyclic garbage would pile up for the collector, whose full passes pause routing and streaming."""
    _, r = running
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 1}).encode()
    ch, stub = _stub(r.port)
    ours = ("Call", "_ProcessRpc", "ExtProcStream", "InferenceRequest")
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with ch:
            for _ in range(20):
                assert len(list(stub.Process(iter(_exchange(body, b"{}")), timeout=20))) == 4
        r.call(asyncio.sleep(0.05))  # the server's loop has run every callback of those streams
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if type(o).__name__ in ours]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def test_a_message_over_the_limit_is_refused_and_the_connection_lives_on(running):
    _, r = running
    huge = body_msg(b"x" * (2 << 20))  # the server takes 1 MiB messages
    ch, stub = _stub(r.port)
    with ch:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Process(iter([headers_msg(), huge]), timeout=10))
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_compressed_messages_are_refused(running):
    _, r = running
    ch, stub = _stub(r.port)
    with ch:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Process(iter([headers_msg()]), timeout=10, compression=grpc.Compression.Gzip))
        assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_a_client_that_cancels_mid_stream_leaves_nothing_open(running):
    servicer, r = running
    gate = threading.Event()
    def requests() -> Iterator[pb.ProcessingRequest]:
        yield headers_msg("/v1/completions")
        yield body_msg(HI_BODY)
        gate.wait(10)  # hold the stream open

    ch, stub = _stub(r.port)
    with ch:
        call = stub.Process(requests(), timeout=20)
        first = next(call)
        assert first.HasField("request_headers")
        assert servicer.active_streams == 1
        call.cancel()
        gate.set()
    for _ in range(200):
        if servicer.active_streams == 0:
            break
        threading.Event().wait(0.01)
    assert servicer.active_streams == 0


HI_BODY = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 1}).encode()


def _held_exchange(gate: threading.Event) -> Callable[[], Iterator[pb.ProcessingRequest]]:
    """A completions exchange whose response half waits for ``gate``: a stream kept open across a close."""
    def requests() -> Iterator[pb.ProcessingRequest]:
        yield headers_msg("/v1/completions")
        yield body_msg(HI_BODY)
        gate.wait(10)
        yield response_headers_msg()
        yield response_body_msg(b"{}", eos=True)

    return requests


def test_stop_lets_streams_in_flight_finish(running):
    """GOAWAY on stop: a stream already open completes; the grace period bounds the wait."""
    _, r = running
    gate = threading.Event()
    requests = _held_exchange(gate)

    ch, stub = _stub(r.port)
    with ch:
        call = stub.Process(requests(), timeout=20)
        assert next(call).HasField("request_headers")
        stopping = asyncio.run_coroutine_threadsafe(r.server.stop(10.0), r.loop)
        gate.set()
        rest = list(call)
        stopping.result(timeout=15)
    assert [m.WhichOneof("response") for m in rest][-1] == "response_body"


def test_tls_with_alpn_h2(tmp_path):
    key, cert = tls.self_signed("epp")
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.crt").write_bytes(cert)
    context, _ = tls.server_tls(str(tmp_path))
    _, server = _servicer(context=context)
    r = Running(server)
    try:
        creds = grpc.ssl_channel_credentials(cert)
        with grpc.secure_channel(f"{HOST}:{r.port}", creds, [("grpc.ssl_target_name_override", "epp")]) as ch:
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with socket.create_connection((HOST, r.port), timeout=5) as s:  # plaintext to the TLS port: refused
            s.sendall(h2grpc.PREFACE)
            s.settimeout(5)
            assert s.recv(1024)[:1] in (b"", b"\x15")  # closed, or a TLS alert
    finally:
        r.stop()


# -- the protocol's edges, from a raw socket ------------------------------------------------------------


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while len(data) - pos >= 9:
        hi, lo, ftype, flags, sid = struct.unpack_from(">BHBBL", data, pos)
        n = (hi << 16) | lo
        out.append((ftype, flags, sid, data[pos + 9: pos + 9 + n]))
        pos += 9 + n
    return out


def _read_frames(s: socket.socket, want: int) -> list[tuple[int, int, int, bytes]]:
    data = b""
    for _ in range(50):
        frames = _frames(data)
        if len(frames) >= want:
            return frames
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return _frames(data)


def test_ping_is_answered_and_a_bad_preface_closes_the_connection(running):
    _, r = running
    with socket.create_connection((HOST, r.port), timeout=5) as s:
        s.sendall(h2grpc.PREFACE + h2grpc._frame(h2grpc.SETTINGS, 0, 0) +
                  h2grpc._frame(h2grpc.PING, 0, 0, b"12345678"))
        frames = _read_frames(s, 4)  # our SETTINGS, WINDOW_UPDATE, SETTINGS ACK, PING ACK
        assert (h2grpc.PING, h2grpc.ACK, 0, b"12345678") in frames
        assert any(f[0] == h2grpc.SETTINGS and f[1] == h2grpc.ACK for f in frames)
    with socket.create_connection((HOST, r.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        frames = _read_frames(s, 3)
        assert any(f[0] == h2grpc.GOAWAY and struct.unpack(">L", f[3][4:8])[0] == h2grpc.PROTOCOL_ERROR
                   for f in frames)


# -- connections spread over more connections and renewed (--workers, epp.workers) ------------------------------

PROCESS = f"/{EXT_PROC}/Process"


def _open_stream(s: socket.socket, encoder: hpack.Encoder, stream_id: int) -> None:
    """A Process stream left open (no message yet): the server holds it as a call."""
    block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", PROCESS), (":authority", "epp"),
                            ("content-type", "application/grpc"), ("te", "trailers")])
    s.sendall(h2grpc._frame(h2grpc.HEADERS, h2grpc.END_HEADERS, stream_id, block))


def _until_ping_ack(s: socket.socket, payload: bytes = b"syncsync") -> list[tuple[int, int, int, bytes]]:
    """Every frame the server sends before it answers our PING: what it made of everything we sent before it."""
    s.sendall(h2grpc._frame(h2grpc.PING, 0, 0, payload))
    data = b""
    while True:
        frames = _frames(data)
        if (h2grpc.PING, h2grpc.ACK, 0, payload) in frames:
            return frames
        chunk = s.recv(65536)
        assert chunk, f"connection closed; frames: {frames}"
        data += chunk


def _refused(frames: list[tuple[int, int, int, bytes]]) -> list[int]:
    return [sid for ftype, _, sid, payload in frames
            if ftype == h2grpc.RST_STREAM and struct.unpack(">L", payload)[0] == h2grpc.REFUSED_STREAM]


def _settings(frames: list[tuple[int, int, int, bytes]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for ftype, flags, _, payload in frames:
        if ftype == h2grpc.SETTINGS and not flags & h2grpc.ACK:
            out.update(struct.unpack_from(">HL", payload, i) for i in range(0, len(payload), 6))
    return out


def _limited(**kw) -> tuple[ExtProcServicer, Running]:  # type: ignore[no-untyped-def]
    servicer = ExtProcServicer(make_director([("a", 0, 0.0)]), StreamOptions())
    return servicer, Running(h2grpc.Server(servicer.methods(HealthServicer(lambda: True)), **kw))


def test_max_concurrent_streams_is_advertised_and_enforced_once_the_client_has_it():
    """Envoy's pool opens another connection past SETTINGS_MAX_CONCURRENT_STREAMS (that is how --workers gets
    connections to spread). Streams a client opens before it has our SETTINGS are served: Envoy does not retry a
    refused ext_proc stream, and its first flight on a new connection carries every stream waiting for one."""
    _, r = _limited(max_concurrent_streams=2)
    try:
        with socket.create_connection((HOST, r.port), timeout=5) as s:
            s.sendall(h2grpc.PREFACE + h2grpc._frame(h2grpc.SETTINGS, 0, 0))
            enc = hpack.Encoder()
            for sid in (1, 3, 5):  # before our SETTINGS are acknowledged: over the limit, still served
                _open_stream(s, enc, sid)
            frames = _until_ping_ack(s)
            assert _settings(frames)[0x3] == 2 and _refused(frames) == []
            s.sendall(h2grpc._frame(h2grpc.SETTINGS, h2grpc.ACK, 0))
            _open_stream(s, enc, 7)
            assert _refused(_until_ping_ack(s)) == [7]
            for sid in (1, 3, 5):  # the client ends its streams: room again, for two
                s.sendall(h2grpc._frame(h2grpc.RST_STREAM, 0, sid, struct.pack(">L", h2grpc.CANCEL)))
            for sid in (9, 11, 13):
                _open_stream(s, enc, sid)
            assert _refused(_until_ping_ack(s)) == [13]
        assert r.server.streams_refused == 2
    finally:
        r.stop()


def test_no_stream_limit_is_advertised_by_default(running):
    _, r = running
    with socket.create_connection((HOST, r.port), timeout=5) as s:
        s.sendall(h2grpc.PREFACE + h2grpc._frame(h2grpc.SETTINGS, 0, 0))
        assert 0x3 not in _settings(_until_ping_ack(s))


def test_an_aged_connection_goes_away_in_two_steps_and_serves_what_crossed_the_first():
    """--grpc-max-connection-age: GOAWAY(max id) + PING first; a stream the client opened before it read that is
    served (one GOAWAY naming the last stream refused such streams: Envoy answered their requests with 500); on the
    PING's ACK, GOAWAY(last stream) and later streams are refused; the connection closes when its streams end."""
    _, r = _limited(max_connection_age=0.2)
    try:
        with socket.create_connection((HOST, r.port), timeout=5) as s:
            s.sendall(h2grpc.PREFACE + h2grpc._frame(h2grpc.SETTINGS, 0, 0))
            data = b""
            while not any(f[0] == h2grpc.PING for f in _frames(data)):
                chunk = s.recv(65536)
                assert chunk
                data += chunk
            goaways = [f[3] for f in _frames(data) if f[0] == h2grpc.GOAWAY]
            assert goaways == [struct.pack(">LL", h2grpc.MAX_STREAM_ID, h2grpc.NO_ERROR)]
            assert r.server.connections_aged == 1
            enc = hpack.Encoder()
            _open_stream(s, enc, 1)  # crossed the first GOAWAY
            frames = _until_ping_ack(s)
            assert _refused(frames) == []
            s.sendall(h2grpc._frame(h2grpc.PING, h2grpc.ACK, 0, h2grpc.GOAWAY_PING))
            _open_stream(s, enc, 3)
            frames = _until_ping_ack(s)
            assert [f[3][:8] for f in frames if f[0] == h2grpc.GOAWAY] == [struct.pack(">LL", 1, h2grpc.NO_ERROR)]
            assert _refused(frames) == [3]
            s.sendall(h2grpc._frame(h2grpc.RST_STREAM, 0, 1, struct.pack(">L", h2grpc.CANCEL)))
            while s.recv(65536):  # its last stream over: closed by the server
                pass
    finally:
        r.stop()


def test_an_aged_connection_lets_its_stream_finish_and_the_client_moves_on():
    """grpcio's client through an age of 0.3 s: the stream open across it completes, the next call goes over a new
    connection, nothing fails."""
    servicer, r = _limited(max_connection_age=0.3)
    gate = threading.Event()
    requests = _held_exchange(gate)

    try:
        ch, stub = _stub(r.port)
        with ch:
            call = stub.Process(requests(), timeout=20)
            assert next(call).HasField("request_headers")
            threading.Event().wait(0.6)  # past the age: told to go away, the stream still open
            assert r.server.connections_aged >= 1
            gate.set()
            assert [m.WhichOneof("response") for m in call][-1] == "response_body"
            assert len(list(stub.Process(iter(_exchange(HI_BODY, b"{}")), timeout=20))) == 4
        assert r.server.connections_total >= 2 and servicer.active_streams == 0
    finally:
        r.stop()


def test_a_stream_past_half_its_receive_window_gets_it_back(running):
    """Only streams that used half their window are given it back (the server no longer walks every open stream
    on every read to find them): 9 MiB of request body on one stream earns that stream a WINDOW_UPDATE."""
    _, r = running
    encoder = hpack.Encoder()
    messages = [headers_msg().SerializeToString()] + [body_msg(b"x" * (900 << 10), eos=False).SerializeToString()
                                                      for _ in range(10)]
    data = b"".join(struct.pack(">BI", 0, len(m)) + m for m in messages)
    assert len(data) > h2grpc.RECV_WINDOW // 2
    with socket.create_connection((HOST, r.port), timeout=10) as s:
        s.sendall(h2grpc.PREFACE + h2grpc._frame(h2grpc.SETTINGS, 0, 0))
        _open_stream(s, encoder, 1)
        _open_stream(s, encoder, 3)  # another open stream, idle: nothing to give back
        for pos in range(0, len(data), 16384):
            s.sendall(h2grpc._frame(h2grpc.DATA, 0, 1, data[pos: pos + 16384]))
        updates = [(sid, struct.unpack(">L", p)[0]) for t, _, sid, p in _until_ping_ack(s)
                   if t == h2grpc.WINDOW_UPDATE and sid]
    assert updates and {sid for sid, _ in updates} == {1}
    assert sum(n for _, n in updates) >= h2grpc.RECV_WINDOW // 2
