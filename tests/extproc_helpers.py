"""Build ext_proc messages as Envoy sends them, and drive an ``ExtProcStream`` with them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.director import Director
from epp.extproc.stream import ExtProcStream, StreamOptions
from epp.scheduling.config import GIE_DEFAULT_CONFIG, load_config

FDS = ProcessingMode.BodySendMode.FULL_DUPLEX_STREAMED
NONE = ProcessingMode.BodySendMode.NONE


def headers_msg(path: str = "/v1/completions", headers: Mapping[str, str] | None = None, eos: bool = False,
                method: str = "POST", response_body_mode: int | None = FDS,
                metadata: Mapping[str, Mapping[str, object]] | None = None) -> pb.ProcessingRequest:
    all_headers = {":path": path, ":method": method, ":authority": "gw", **(headers or {})}
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                            for k, v in all_headers.items()]),
        end_of_stream=eos))
    if response_body_mode is not None:
        msg.protocol_config.request_body_mode = FDS
        msg.protocol_config.response_body_mode = response_body_mode
    if metadata:
        for ns, values in metadata.items():
            msg.metadata_context.filter_metadata[ns].update(values)
    return msg


def body_msg(body: bytes, eos: bool = True, metadata: Mapping[str, Mapping[str, object]] | None = None
             ) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=eos))
    if metadata:
        for ns, values in metadata.items():
            msg.metadata_context.filter_metadata[ns].update(values)
    return msg


def response_headers_msg(status: int = 200, content_type: str = "application/json", eos: bool = False,
                         served: str | None = None) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()),
                                            base_pb2.HeaderValue(key="content-type", raw_value=content_type.encode())]),
        end_of_stream=eos))
    if served:
        msg.metadata_context.filter_metadata["envoy.lb"].update({"x-gateway-destination-endpoint-served": served})
    return msg


def response_body_msg(body: bytes, eos: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=eos))


def make_director(specs: Iterable[tuple[str, int, float]] | None = None, config: str | None = None,
                  names: Iterable[str] | None = None) -> Director:
    """A director over a static pool of 192.168.1.<i+1>:8000 endpoints with (queue, kv) metrics, scheduled by
    ``config`` or GIE's default (whose queue and KV scorers these metrics drive)."""
    specs = list(specs if specs is not None else [("a", 0, 0.0)])
    pool = EndpointPool()
    pool.sync([EndpointSpec(name, f"192.168.1.{i + 1}", 8000) for i, (name, _, _) in enumerate(specs)])
    for ep, (_, queue, kv) in zip(pool.endpoints, specs, strict=True):
        ep.metrics.waiting_requests = queue
        ep.metrics.kv_cache_usage = kv
        ep.metrics.updated_at = time.monotonic()  # as if just scraped: stale metrics are not trusted
    return Director(pool, load_config(config or GIE_DEFAULT_CONFIG, pool))


async def drive(stream: ExtProcStream, msgs: Iterable[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    """What the servicer does: feed each message, await the route when one is pending."""
    out: list[pb.ProcessingResponse] = []
    for msg in msgs:
        out += stream.receive(msg)
        if stream.pending:
            out += await stream.route()
    return out


def new_stream(director: Director, **options: object) -> ExtProcStream:
    return ExtProcStream(director, StreamOptions(**options))  # type: ignore[arg-type]


def set_headers(resp: pb.ProcessingResponse) -> dict[str, str]:
    common = resp.request_headers.response if resp.HasField("request_headers") else resp.response_headers.response
    return {h.header.key: (h.header.raw_value or h.header.value.encode()).decode()
            for h in common.header_mutation.set_headers}


def body_of(responses: Iterable[pb.ProcessingResponse], field: str = "request_body") -> bytes:
    return b"".join(getattr(r, field).response.body_mutation.streamed_response.body
                    for r in responses if r.HasField(field))


def immediate(resp: pb.ProcessingResponse) -> tuple[int, dict[str, str], dict]:
    ir = resp.immediate_response
    headers = {h.header.key: h.header.raw_value.decode() for h in ir.headers.set_headers}
    return ir.status.code, headers, json.loads(ir.body)
