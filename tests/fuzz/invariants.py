"""What every ProcessingResponse sequence EPP sends on one stream must satisfy, and a driver that feeds a
stream the way the servicer does while checking the in-flight bookkeeping after every message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client import CollectorRegistry

from epp.api.parsing import api_for_path
from epp.api.types import ErrorStyle, ParsedBody
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.director import Director
from epp.extproc.stream import ExtProcStream, Phase, StreamOptions
from epp.observability.metrics import EppMetrics
from epp.scheduling.config import load_config
from tests.fuzz.strategies import POOL

DEST = "x-gateway-destination-endpoint"
PROTECTED = ("x-gateway-destination-endpoint", "x-gateway-destination-endpoint-subset",
             "x-gateway-destination-endpoint-served")
ERROR_STATUSES = {400, 413, 415, 429, 500, 503}
_LOOP: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
    return _LOOP


def new_director(config: str | None = None) -> Director:
    pool = EndpointPool()
    pool.sync([EndpointSpec(f"p{i}", hp.split(":")[0], int(hp.split(":")[1])) for i, hp in enumerate(POOL)])
    return Director(pool, load_config(config, pool), metrics=EppMetrics(pool, CollectorRegistry()))


def inflight(director: Director) -> tuple[int, int]:
    eps = director.pool.endpoints
    return sum(e.inflight_requests for e in eps), sum(e.inflight_tokens for e in eps)


def running_gauge(director: Director) -> float:
    assert director.metrics is not None
    return sum(s.value for m in director.metrics.running.collect() for s in m.samples)


class Driven:
    """The responses of one stream, and where each message's responses start."""

    def __init__(self, stream: ExtProcStream) -> None:
        self.stream = stream
        self.out: list[pb.ProcessingResponse] = []

    def feed(self, msgs: Iterable[pb.ProcessingRequest]) -> None:
        director = self.stream.director
        for msg in msgs:
            self.out += self.stream.receive(msg)
            if self.stream.pending:
                self.out += loop().run_until_complete(self.stream.route())
            n, tokens = inflight(director)
            assert n >= 0 and tokens >= 0, (n, tokens)
            routed = self.stream.decision is not None
            # One routed, unfinished request counts once on its endpoint; anything else counts nothing.
            expected = 1 if routed and not self.stream._completed else 0
            assert n == expected, (n, expected, self.stream.phase)

    def close(self) -> None:
        self.stream.close()
        self.stream.close()  # closing twice must be harmless
        assert inflight(self.stream.director) == (0, 0)
        assert running_gauge(self.stream.director) == 0


def kinds(out: list[pb.ProcessingResponse]) -> list[str]:
    return [r.WhichOneof("response") for r in out]


def streamed(resp: pb.ProcessingResponse, kind: str) -> pb.StreamedBodyResponse:
    return getattr(resp, kind).response.body_mutation.streamed_response


def check_sequence(out: list[pb.ProcessingResponse], path: str) -> None:
    """Invariants for any input, however broken: what Envoy 1.40 accepts in FULL_DUPLEX_STREAMED."""
    ks = kinds(out)
    assert None not in ks, ks
    # At most one immediate response, and nothing after it: it ends the exchange.
    if "immediate_response" in ks:
        assert ks.count("immediate_response") == 1, ks
        assert ks[-1] == "immediate_response", ks
        check_immediate(out[-1], path)
    # At most one request-headers response, before every request body or trailers response.
    assert ks.count("request_headers") <= 1, ks
    first_req_body = next((i for i, k in enumerate(ks) if k in ("request_body", "request_trailers")), None)
    if first_req_body is not None:
        assert "request_headers" in ks and ks.index("request_headers") < first_req_body, ks
    # The streamed request body: EoS on at most one piece, the last one; trailers only after it.
    req_bodies = [streamed(r, "request_body") for r in out if r.HasField("request_body")]
    eos_at = [i for i, b in enumerate(req_bodies) if b.end_of_stream]
    assert len(eos_at) <= 1 and (not eos_at or eos_at[0] == len(req_bodies) - 1), eos_at
    assert all(len(b.body) <= 62_000 for b in req_bodies)
    assert ks.count("request_trailers") <= 1, ks  # one answer to Envoy's one trailers message
    # The streamed response body (the answers to one read's chunks merged): pieces within the limit.
    assert all(len(streamed(r, "response_body").body) <= 62_000 for r in out if r.HasField("response_body"))
    if "request_headers" in ks:
        check_pick(out[ks.index("request_headers")])


def check_pick(resp: pb.ProcessingResponse) -> None:
    """Route safety: the destination is always EPP's own pick among discovered endpoints, never a client value."""
    common = resp.request_headers.response
    sets = {h.header.key: h for h in common.header_mutation.set_headers}
    assert DEST in sets, sets.keys()
    value = sets[DEST].header.raw_value.decode()
    assert value and all(hp in POOL for hp in value.split(",")), value
    assert sets[DEST].append_action == sets[DEST].OVERWRITE_IF_EXISTS_OR_ADD
    md = resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST].string_value
    assert md == value
    assert common.clear_route_cache
    for name in common.header_mutation.remove_headers:
        assert name in PROTECTED[1:], name


def check_immediate(resp: pb.ProcessingResponse, path: str) -> None:
    ir = resp.immediate_response
    assert ir.status.code in ERROR_STATUSES, ir.status.code
    headers = {h.header.key: h.header.raw_value.decode() for h in ir.headers.set_headers}
    assert headers["content-type"] == "application/json" and headers["x-epp-error-reason"]
    doc = json.loads(ir.body)
    if ParsedBody(api_for_path(path)).error_style is ErrorStyle.ANTHROPIC:
        assert doc["type"] == "error" and doc["error"]["type"] and doc["error"]["message"], doc
    else:
        assert doc["error"]["message"] and doc["error"]["code"] == headers["x-epp-error-reason"], doc


def run_stream(director: Director, msgs: Iterable[pb.ProcessingRequest], options: StreamOptions | None = None,
               path: str = "/") -> tuple[ExtProcStream, list[pb.ProcessingResponse]]:
    """Feed everything, close, check the generic invariants."""
    driven = Driven(ExtProcStream(director, options))
    driven.feed(msgs)
    driven.close()
    check_sequence(driven.out, driven.stream.path or path)
    return driven.stream, driven.out


def is_done_with_error(stream: ExtProcStream) -> bool:
    return stream.phase is Phase.DONE and stream.error is not None
