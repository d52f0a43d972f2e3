"""The ext_proc RPC around the state machine (``epp.extproc.servicer`` on the lean gRPC server): whatever the
messages, and whatever fails inside EPP (the scheduler, a plugin, a lifecycle hook) or outside (Envoy
cancelling the stream half way), no exception leaves the RPC, the sequence stays valid and every count
returns to zero."""

from __future__ import annotations

import asyncio

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given
from hypothesis import strategies as st

from epp.extproc.protocol import header_map
from epp.extproc.servicer import PROCESS, ExtProcServicer
from epp.extproc.stream import StreamOptions
from epp.health import HealthServicer
from epp.scheduling.plugins import RequestObserver
from epp.scheduling.registry import register_plugin
from tests.extproc_helpers import NONE, body_msg, headers_msg, response_body_msg, response_headers_msg
from tests.fuzz.counting import count
from tests.fuzz.invariants import check_sequence, inflight, kinds, loop, new_director, running_gauge
from tests.fuzz.strategies import Exchange, exchanges, mutated_sequences


@register_plugin("fuzz-exploding-observer")
class Exploding(RequestObserver):
    needs_response_body = True

    def pre_request(self, request, result):
        raise RuntimeError("boom in pre_request")

    def on_response_headers(self, request, endpoint, response):
        raise RuntimeError("boom in on_response_headers")

    def on_response_body(self, request, endpoint, chunk, eos):
        raise ValueError("boom in on_response_body")

    def on_response_complete(self, request, endpoint, response):
        raise KeyError("boom in on_response_complete")


EXPLODING = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: prefix-cache-scorer
- type: fuzz-exploding-observer
- type: max-score-picker
"""
FAULTS = ["none", "scheduler-raises", "plugin-raises", "hook-raises", "cancel"]


class FakeCall:
    """What the gRPC server gives an RPC: collects what it sends and how it finished."""

    def __init__(self) -> None:
        self.sent: list[pb.ProcessingResponse] = []
        self.finished: tuple[int, str] | None = None
        self.hooks: list = []  # type: ignore[type-arg]

    def send(self, message: bytes) -> None:
        if self.finished is None:
            self.sent.append(pb.ProcessingResponse.FromString(message))

    def finish(self, status: int = 0, message: str = "") -> None:
        if self.finished is None:
            self.finished = (status, message)

    def before_flush(self, fn) -> None:  # type: ignore[no-untyped-def]
        self.hooks.append(fn)

    def flush(self) -> None:
        """The end of a socket read (the connection's one write)."""
        hooks, self.hooks = self.hooks, []
        for fn in hooks:
            fn()


async def _settle(rpc) -> None:  # type: ignore[no-untyped-def]
    """Let a routing step that is under way finish (bounded: scheduling here never waits on anything)."""
    for _ in range(1000):
        if rpc.task is None or rpc.task.done():
            return
        await asyncio.sleep(0)
    raise AssertionError("routing never finished")


@given(exchanges(), st.sampled_from(FAULTS), st.booleans(), st.integers(0, 12), st.data())
def test_process_never_raises_and_always_cleans_up(ex: Exchange, fault: str, mutate: bool, cancel_after: int,
                                                   data: st.DataObject):
    msgs = ex.request + ex.response
    if mutate:
        msgs, _ = data.draw(mutated_sequences(msgs))
    count(f"servicer: Process with fault={fault}")
    director = new_director(EXPLODING if fault == "plugin-raises" else None)
    if fault == "scheduler-raises":
        def schedule(*a, **kw):
            raise RuntimeError("scheduler exploded")
        director.config.scheduler.schedule = schedule
    elif fault == "hook-raises":
        def hook(*a, **kw):
            raise RuntimeError("lifecycle hook exploded")
        director.response_headers = hook
        director.response_body = hook
    servicer = ExtProcServicer(director, StreamOptions())

    async def run() -> list[pb.ProcessingResponse]:
        call = FakeCall()
        rpc = servicer.methods(HealthServicer())[PROCESS](call)  # type: ignore[arg-type]
        for m in msgs:  # all at once, as Envoy may: later messages wait while routing is under way
            rpc.message(m.SerializeToString())
            assert servicer.active_streams == (0 if call.finished else 1)
            if fault == "cancel" and len(call.sent) > cancel_after:
                rpc.cancel()  # what the server does when Envoy resets the stream
                break
        call.flush()  # the read's end
        await _settle(rpc)
        if call.finished is None and fault != "cancel":
            rpc.half_close()  # Envoy's last message
        await _settle(rpc)
        call.flush()
        if fault == "cancel":
            rpc.cancel()
        return call.sent

    out = loop().run_until_complete(run())
    assert servicer.active_streams == 0
    assert inflight(director) == (0, 0)
    assert running_gauge(director) == 0
    # The path the stream used: the first request headers' :path, the last one if repeated (as header_map reads it).
    path = next((header_map(m.request_headers).get(":path", "/") for m in msgs if m.HasField("request_headers")), "/")
    if fault != "cancel":
        check_sequence(out, path)
    if fault == "scheduler-raises" and "immediate_response" in kinds(out):
        codes = [r.immediate_response.status.code for r in out if r.HasField("immediate_response")]
        assert codes[0] in (400, 413, 415, 500, 503), codes


# -- the RPC's end -------------------------------------------------------------------------------------


def _consumed(msgs: list[pb.ProcessingRequest]) -> tuple[list[str], int]:
    """Run Process; return the response kinds and how many request messages it read."""
    seen = 0

    async def run() -> list[pb.ProcessingResponse]:
        nonlocal seen
        call = FakeCall()
        rpc = ExtProcServicer(new_director(), StreamOptions()).methods(HealthServicer())[PROCESS](call)  # type: ignore[arg-type]
        for m in msgs:
            if call.finished is not None:
                break
            seen += 1
            rpc.message(m.SerializeToString())
            call.flush()  # one read each
            await _settle(rpc)
        if call.finished is None:
            rpc.half_close()
        return call.sent

    return kinds(loop().run_until_complete(run())), seen


def test_process_ends_the_rpc_itself_once_everything_is_answered():
    """The RPC ends with OK once everything is answered, instead of waiting for Envoy to end the stream."""
    body = b'{"model": "m", "prompt": "hi"}'
    junk = [response_body_msg(b"late", eos=True)] * 3
    full = [headers_msg(), body_msg(body), response_headers_msg(), response_body_msg(b"{}", eos=True), *junk]
    ks, seen = _consumed(full)
    assert ks == ["request_headers", "request_body", "response_headers", "response_body"] and seen == 4
    ks, seen = _consumed([headers_msg(), body_msg(b"{broken"), *junk])  # immediate response: over at once
    assert ks == ["immediate_response"] and seen == 2
    # Without response bodies the end of the response is only known when Envoy closes: read to the end.
    ignored = [body_msg(b"x")] * 3
    ks, seen = _consumed([headers_msg(response_body_mode=NONE), body_msg(body), response_headers_msg(), *ignored])
    assert ks == ["request_headers", "request_body", "response_headers"] and seen == 6
