"""The ext_proc state machine under generated exchanges: well-formed ones with random chunking, bodies and
headers; mutated ones (dropped, duplicated, reordered, inserted, truncated messages; responses before
requests; duplicate end-of-stream); random message soups; protobuf bytes with damage; interleaved
streams. Invariants: a valid ProcessingResponse sequence, never an exception, in-flight counts never
negative and back to 0 once the stream is closed."""

from __future__ import annotations

import json

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from epp.api.rewrite import ModelNameRestorer
from epp.extproc.stream import ExtProcStream, Phase, StreamOptions
from tests.fuzz.counting import count
from tests.fuzz.invariants import Driven, check_sequence, inflight, kinds, new_director, run_stream, streamed
from tests.fuzz.strategies import Exchange, exchanges, mutated_bytes, mutated_sequences, random_message


def _not_json(name: str) -> None:
    raise AssertionError(f"EPP forwarded {name}, which is not JSON")


OPTIONS = [StreamOptions(), StreamOptions(max_body_bytes=200, max_json_depth=8)]


@given(exchanges(), st.sampled_from(OPTIONS))
def test_well_formed_exchanges_get_a_valid_answer(ex: Exchange, options: StreamOptions):
    count("stream: well-formed exchanges")
    director = new_director()
    driven = Driven(ExtProcStream(director, options))
    driven.feed(ex.request)
    stream = driven.stream
    ks = kinds(driven.out)
    check_sequence(driven.out, stream.path)  # extra headers may repeat :path
    if stream.phase is not Phase.RESPONSE:  # EPP answered itself: Envoy sends nothing more
        assert ks == ["immediate_response"], ks
        driven.close()
        return
    # Routed: the headers response first, then the whole (possibly rewritten) body, EoS on its end.
    assert ks[0] == "request_headers", ks
    sent = b"".join(streamed(r, "request_body").body for r in driven.out if r.HasField("request_body"))
    if ex.header_only:
        assert ks == ["request_headers"], ks
    else:
        pieces = [streamed(r, "request_body") for r in driven.out if r.HasField("request_body")]
        assert pieces and pieces[-1].end_of_stream is not ex.trailers
        assert (ks[-1] == "request_trailers") is ex.trailers
        if stream._restorer is None:
            assert sent == ex.body
        else:
            # still strict JSON, carrying the target EPP chose (extra random headers may also ask for a rewrite)
            assert json.loads(sent, parse_constant=_not_json)["model"] == stream.request.target_model
    assert inflight(director)[0] == 1
    # The response side, answered one for one.
    n_request_side = len(driven.out)
    driven.feed(ex.response)
    answer = driven.out[n_request_side:]
    aks = kinds(answer)
    check_sequence(driven.out, stream.path)  # extra headers may repeat :path
    assert aks[0] == "response_headers" and aks.count("response_headers") == 1, aks
    got = b"".join(streamed(r, "response_body").body for r in answer if r.HasField("response_body"))
    raw = b"".join(ex.response_chunks)
    if stream._restorer is None:
        assert got == raw
    else:
        one_shot = ModelNameRestorer(stream.request.target_model, stream.request.model)
        assert got == one_shot.feed(raw) + one_shot.flush()
    if ex.response[-1].HasField("response_trailers"):
        assert aks[-1] == "response_trailers"
    if ex.response_eos and "response_body" in aks:
        last = [r for r in answer if r.HasField("response_body")][-1]
        assert streamed(last, "response_body").end_of_stream
    if ex.response_eos or ex.response[-1].HasField("response_trailers"):
        assert inflight(director) == (0, 0)  # the response ended: released before the stream closes
    driven.close()


@given(exchanges(), st.data())
def test_mutated_exchanges_never_break_the_stream(ex: Exchange, data: st.DataObject):
    msgs, _how = data.draw(mutated_sequences(ex.request + ex.response))
    count("stream: mutated exchanges")
    run_stream(new_director(), msgs, path=ex.path)


@given(st.lists(random_message(), max_size=12))
def test_random_message_soup(msgs: list[pb.ProcessingRequest]):
    count("stream: random message soups")
    run_stream(new_director(), msgs)


@given(exchanges(), st.data())
def test_damaged_protobuf_bytes(ex: Exchange, data: st.DataObject):
    """Serialized messages with byte damage: whatever still decodes is fed in."""
    msgs = []
    for msg in ex.request + ex.response:
        raw = msg.SerializeToString()
        if data.draw(st.integers(0, 2)) == 0:
            raw = data.draw(mutated_bytes(raw))
        try:
            msgs.append(pb.ProcessingRequest.FromString(raw))
        except DecodeError:
            continue
    count("stream: damaged protobuf messages")
    run_stream(new_director(), msgs, path=ex.path)


@given(st.lists(exchanges(), min_size=2, max_size=5), st.data())
def test_interleaved_streams_share_the_pool_correctly(exs: list[Exchange], data: st.DataObject):
    """Several streams on one director, messages interleaved, closed in any order (some early)."""
    count("stream: interleaved stream sets")
    director = new_director()
    driven = [Driven(ExtProcStream(director)) for _ in exs]
    queues = [list(ex.request + ex.response) for ex in exs]
    open_ = set(range(len(exs)))
    for _ in range(sum(map(len, queues)) + len(exs)):
        if not open_:
            break
        i = data.draw(st.sampled_from(sorted(open_)))
        if queues[i] and data.draw(st.integers(0, 9)):
            msg = queues[i].pop(0)
            driven[i].stream.receive(msg)
            if driven[i].stream.pending:
                driven[i].out += _route(driven[i].stream)
        else:  # finished, or the client went away early
            driven[i].stream.close()
            open_.discard(i)
        live = sum(1 for j, d in enumerate(driven) if d.stream.decision is not None and not d.stream._completed)
        assert inflight(director)[0] == live
    for d in driven:
        d.stream.close()
    assert inflight(director) == (0, 0)


def _route(stream: ExtProcStream) -> list[pb.ProcessingResponse]:
    from tests.fuzz.invariants import loop

    return loop().run_until_complete(stream.route())
