"""The thin grpc.aio layer: pumps ext_proc messages through one ``ExtProcStream`` per gRPC stream."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.director import Director
from epp.extproc.stream import ExtProcStream, Phase, StreamOptions
from epp.pools import PoolSelector

log = logging.getLogger(__name__)


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, director: Director, options: StreamOptions, selector: PoolSelector | None = None) -> None:
        self.director = director
        self.options = options
        self.selector = selector  # several pools: the request's pool from the gateway-set header
        self.active_streams = 0

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        stream = ExtProcStream(self.director, self.options, self.selector)
        self.active_streams += 1
        try:
            async for msg in request_iterator:
                try:
                    out = stream.receive(msg)
                    if stream.pending:
                        out += await stream.route()
                except Exception:
                    log.exception("ext_proc stream failed on %s", msg.WhichOneof("request"))
                    out = stream.passthrough(msg)
                for resp in out:
                    yield resp
                if stream.phase is Phase.DONE:
                    # Answered in full (immediate response, or the response's end): end the RPC ourselves
                    # with OK rather than wait for Envoy to reset it. A reset (client cancel) leaks native
                    # memory in grpc.aio's server, about 140 bytes per RPC (grpc/grpc#43360).
                    return
        finally:
            self.active_streams -= 1
            stream.close()
