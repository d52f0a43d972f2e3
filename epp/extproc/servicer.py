"""The ext_proc port's RPCs on the lean gRPC server (``epp.extproc.h2grpc``): one ``ExtProcStream`` per
``Process`` stream, and gRPC health (Envoy health-checks the ext_proc cluster on this port, as GIE's Envoy
config does)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from epp.extproc import h2grpc
from epp.extproc.protocol import MAX_CHUNK
from epp.extproc.stream import ExtProcStream, Phase, StreamDirector, StreamOptions
from epp.health import HealthServicer
from epp.pools import PoolSelector

log = logging.getLogger(__name__)

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_LIST = "/grpc.health.v1.Health/List"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


class ExtProcServicer:
    """Counts open streams (the drain waits on them) and makes one ``_ProcessRpc`` per stream."""

    def __init__(self, director: StreamDirector, options: StreamOptions, selector: PoolSelector | None = None) -> None:
        self.director = director
        self.options = options
        self.selector = selector  # several pools: the request's pool from the gateway-set header
        self.active_streams = 0

    def methods(self, health: HealthServicer) -> dict[str, h2grpc.RpcFactory]:
        return {PROCESS: lambda call: _ProcessRpc(self, call),
                HEALTH_CHECK: lambda call: _UnaryRpc(call, health_pb2.HealthCheckRequest,
                                                     lambda req: health_pb2.HealthCheckResponse(
                                                         status=health.answer(req.service))),
                HEALTH_LIST: lambda call: _UnaryRpc(call, health_pb2.HealthListRequest, health.list_statuses),
                HEALTH_WATCH: lambda call: _ServerStreamRpc(call, health_pb2.HealthCheckRequest,
                                                            lambda req: health.Watch(req, None))}


class _ProcessRpc:
    """Messages are handled as they arrive, synchronously, except routing: while ``route()`` is awaited the
    stream's later messages wait in order, and its answers are written when it returns.

    Response-body answers of one socket read are merged: when Envoy is behind (a fast stream, a busy box) one
    read holds several chunks of a stream, and Envoy handles one ext_proc message for them instead of one each
    (full duplex lets the processor re-chunk a body). The answer is held until the read is handled
    (``Call.before_flush``), so nothing waits longer than it did."""

    __slots__ = ("backlog", "call", "closed", "ended", "held", "servicer", "stream", "task")

    def __init__(self, servicer: ExtProcServicer, call: h2grpc.Call) -> None:
        self.servicer = servicer
        self.call = call
        self.stream = ExtProcStream(servicer.director, servicer.options, servicer.selector,
                                    after_answer=asyncio.get_running_loop().call_soon)
        self.backlog: deque[bytes] | None = None  # set while routing
        self.task: asyncio.Task[None] | None = None
        self.ended = False  # the client sent its last message
        self.closed = False
        self.held: pb.ProcessingResponse | None = None  # a response-body answer held for merging
        servicer.active_streams += 1

    def message(self, data: bytes) -> None:
        if self.backlog is not None:
            self.backlog.append(data)
        else:
            self._handle(data)

    def _handle(self, data: bytes) -> None:
        try:
            msg = pb.ProcessingRequest.FromString(data)
        except DecodeError:
            self.call.finish(h2grpc.INTERNAL, "could not decode the ProcessingRequest")
            self._close()
            return
        stream = self.stream
        try:
            out = stream.receive(msg)
            if stream.pending:
                self._send(out)
                self.backlog = deque()
                self.task = asyncio.get_running_loop().create_task(self._route(msg))
                return
        except Exception:
            log.exception("ext_proc stream failed on %s", msg.WhichOneof("request"))
            out = stream.passthrough(msg)
        self._send(out)
        self._finish_if_done()

    async def _route(self, msg: pb.ProcessingRequest) -> None:
        try:
            out = await self.stream.route()
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("ext_proc routing failed")
            out = self.stream.passthrough(msg)
        if self.closed:
            return
        self._send(out)
        self._finish_if_done()
        backlog, self.backlog = self.backlog, None
        while backlog and not self.closed:
            self._handle(backlog.popleft())
        if self.ended and not self.closed:
            self.half_close()
        self.call.flush()

    def _send(self, out: list[pb.ProcessingResponse]) -> None:
        for resp in out:
            if resp.WhichOneof("response") == "response_body":
                piece = resp.response_body.response.body_mutation.streamed_response
                held = self.held
                if held is not None:
                    into = held.response_body.response.body_mutation.streamed_response
                    if len(into.body) + len(piece.body) <= MAX_CHUNK:
                        into.body += piece.body
                        if piece.end_of_stream:
                            into.end_of_stream = True
                        continue
                    self._send_held()
                self.held = resp
                self.call.before_flush(self._send_held)
                continue
            if self.held is not None:
                self._send_held()
            self.call.send(resp.SerializeToString())

    def _send_held(self) -> None:
        held, self.held = self.held, None
        if held is not None:
            self.call.send(held.SerializeToString())

    def _finish(self) -> None:
        self._send_held()
        self.call.finish()
        self._close()

    def _finish_if_done(self) -> None:
        if self.stream.phase is Phase.DONE and not self.closed:
            # Answered in full (immediate response, or the response's end): end the RPC with OK rather than
            # wait for Envoy to end it.
            self._finish()

    def half_close(self) -> None:
        self.ended = True
        if self.backlog is None and not self.closed:  # not routing: the exchange is over
            self._finish()

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()  # scheduling or a flow-control queue lets go of the request
        self.held = None  # the stream is gone: nothing more reaches Envoy
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.servicer.active_streams -= 1
            self.stream.close()


class _UnaryRpc:
    """One request message, one answer, computed synchronously."""

    __slots__ = ("call", "handler", "request", "request_type", "task")

    def __init__(self, call: h2grpc.Call, request_type: type, handler: Callable[[Any], Any]) -> None:
        self.call = call
        self.request_type = request_type
        self.handler = handler
        self.request: bytes | None = None
        self.task: asyncio.Task[None] | None = None

    def message(self, data: bytes) -> None:
        self.request = data

    def half_close(self) -> None:
        if self.request is None:
            self.call.finish(h2grpc.INTERNAL, "no request message")
            return
        try:
            request = self.request_type.FromString(self.request)
        except DecodeError:
            self.call.finish(h2grpc.INTERNAL, "could not decode the request")
            return
        self._respond(request)

    def _respond(self, request: Any) -> None:
        self.call.send(self.handler(request).SerializeToString())
        self.call.finish()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class _ServerStreamRpc(_UnaryRpc):
    """One request message, then the answers the handler's async generator yields, until it ends or the client
    goes."""

    __slots__ = ()

    def _respond(self, request: Any) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(request))

    async def _run(self, request: Any) -> None:
        try:
            async for resp in self.handler(request):
                self.call.send(resp.SerializeToString())
                self.call.flush()
        except asyncio.CancelledError:
            return
        self.call.finish()
        self.call.flush()
