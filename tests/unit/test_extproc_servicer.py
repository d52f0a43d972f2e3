"""The ext_proc RPC over a stand-in ``Call``: what it sends, in what order, within one socket read and across
reads (``epp.extproc.servicer``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.extproc.protocol import MAX_CHUNK
from epp.extproc.servicer import ExtProcServicer, _ProcessRpc
from epp.extproc.stream import StreamOptions
from tests.extproc_helpers import body_msg, headers_msg, make_director, response_body_msg, response_headers_msg

FINISHED = "finished"


class FakeCall:
    """What h2grpc's ``Call`` offers an RPC; ``flush`` is the end of a socket read (the connection's one write)."""

    def __init__(self) -> None:
        self.sent: list[pb.ProcessingResponse | str] = []
        self.hooks: list[Callable[[], None]] = []

    def send(self, message: bytes) -> None:
        self.sent.append(pb.ProcessingResponse.FromString(message))

    def finish(self, status: int = 0, message: str = "") -> None:
        self.sent.append(FINISHED)

    def before_flush(self, fn: Callable[[], None]) -> None:
        self.hooks.append(fn)

    def flush(self) -> None:
        hooks, self.hooks = self.hooks, []
        for fn in hooks:
            fn()

    def response_bodies(self) -> list[tuple[bytes, bool]]:
        return [(m.response_body.response.body_mutation.streamed_response.body,
                 m.response_body.response.body_mutation.streamed_response.end_of_stream)
                for m in self.sent if isinstance(m, pb.ProcessingResponse) and m.HasField("response_body")]


async def _routed() -> tuple[_ProcessRpc, FakeCall]:
    """An RPC whose request was routed and whose response headers were answered."""
    call = FakeCall()
    rpc = _ProcessRpc(ExtProcServicer(make_director(), StreamOptions()), call)  # type: ignore[arg-type]
    body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 5, "stream": True}).encode()
    for msg in (headers_msg("/v1/completions"), body_msg(body)):
        rpc.message(msg.SerializeToString())
    assert rpc.task is not None
    await rpc.task
    rpc.message(response_headers_msg(200, "text/event-stream").SerializeToString())
    call.flush()
    call.sent.clear()
    return rpc, call


def _chunk(i: int) -> bytes:
    return b'data: {"choices":[{"index":0,"text":"t%d"}]}\n\n' % i


async def test_chunks_of_one_read_are_answered_as_one_message_and_the_stream_ends_after_it():
    rpc, call = await _routed()
    for i in range(3):
        rpc.message(response_body_msg(_chunk(i)).SerializeToString())
    assert call.sent == []  # held until the read is handled
    call.flush()
    assert call.response_bodies() == [(_chunk(0) + _chunk(1) + _chunk(2), False)]
    call.sent.clear()
    rpc.message(response_body_msg(_chunk(3)).SerializeToString())
    rpc.message(response_body_msg(b"data: [DONE]\n\n", eos=True).SerializeToString())
    # the end of stream ends the RPC in the same read: the held data goes before the trailers
    assert len(call.sent) == 2 and call.sent[1] == FINISHED
    assert call.response_bodies() == [(_chunk(3) + b"data: [DONE]\n\n", True)]
    call.flush()
    assert len(call.sent) == 2


async def test_one_chunk_a_read_is_answered_at_each_read():
    rpc, call = await _routed()
    for i in range(3):
        rpc.message(response_body_msg(_chunk(i)).SerializeToString())
        call.flush()
    assert call.response_bodies() == [(_chunk(i), False) for i in range(3)]


async def test_merged_answers_stay_within_the_chunk_limit_and_in_order():
    rpc, call = await _routed()
    big = [bytes([65 + i]) * (MAX_CHUNK // 2 + 10) for i in range(3)]
    for piece in big:
        rpc.message(response_body_msg(piece).SerializeToString())
    call.flush()
    bodies = [b for b, _ in call.response_bodies()]
    assert b"".join(bodies) == b"".join(big) and all(len(b) <= MAX_CHUNK for b in bodies) and len(bodies) == 3


async def test_a_stream_reset_while_an_answer_is_held_sends_nothing_more():
    rpc, call = await _routed()
    rpc.message(response_body_msg(_chunk(0)).SerializeToString())
    rpc.cancel()
    call.flush()
    assert call.response_bodies() == []
    await asyncio.sleep(0)
