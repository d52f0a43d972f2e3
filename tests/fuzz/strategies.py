"""Hypothesis strategies: JSON values, request bodies per API (valid and broken), random chunkings, and
whole ext_proc exchanges as Envoy would send them, plus mutations of them Envoy would never send."""

from __future__ import annotations

import contextlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import strategies as st

from tests.extproc_helpers import FDS, NONE

POOL = ["192.168.1.1:8000", "192.168.1.2:8000", "192.168.1.3:8000"]

# -- JSON ------------------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=25)
texts = st.text(max_size=200)  # includes lone surrogates, NULs, RTL marks, ...
models = st.text(min_size=1, max_size=30) | st.sampled_from(["demo-model", "m", "llama/3-8b"])
token_ids = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50)
roles = st.sampled_from(["user", "system", "assistant", "tool", "developer"]) | st.text(max_size=8)


def _content_parts() -> st.SearchStrategy[Any]:
    text_part = st.fixed_dictionaries({"type": st.just("text"), "text": texts})
    image = st.fixed_dictionaries({"type": st.just("image_url"),
                                   "image_url": st.fixed_dictionaries({"url": st.text(max_size=60)})})
    other = st.fixed_dictionaries({"type": st.text(max_size=10)}, optional={"data": json_values})
    return st.lists(text_part | image | other, max_size=4)


chat_messages = st.lists(st.fixed_dictionaries(
    {"role": roles}, optional={"content": texts | _content_parts() | st.none(), "name": st.text(max_size=8),
                               "tool_calls": st.lists(json_values, max_size=2)}), min_size=1, max_size=8)
anthropic_blocks = st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts})
    | st.fixed_dictionaries({"type": st.just("tool_use"), "name": st.text(max_size=8), "input": json_values})
    | st.fixed_dictionaries({"type": st.just("tool_result"), "content": texts})
    | st.fixed_dictionaries({"type": st.just("image"), "source": json_values}), max_size=4)


def _common() -> dict[str, st.SearchStrategy[Any]]:
    return {"stream": st.booleans(), "max_tokens": st.integers(0, 4096), "temperature": st.floats(0, 2),
            "cache_salt": st.text(max_size=10), "user": st.text(max_size=10)}


API_BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "/v1/chat/completions": st.fixed_dictionaries({"model": models, "messages": chat_messages},
                                                  optional={**_common(), "tools": st.lists(json_values, max_size=2),
                                                            "max_completion_tokens": st.integers(0, 9999)}),
    "/v1/completions": st.fixed_dictionaries(
        {"model": models, "prompt": texts | st.lists(texts, min_size=1, max_size=4) | token_ids
         | st.lists(token_ids, min_size=1, max_size=3)}, optional=_common()),
    "/v1/embeddings": st.fixed_dictionaries({"model": models, "input": texts.filter(bool) | token_ids
                                             | st.lists(texts, min_size=1, max_size=3)}),
    "/v1/responses": st.fixed_dictionaries(
        {"model": models, "input": texts | st.lists(st.fixed_dictionaries(
            {"role": roles.filter(bool), "content": texts}), min_size=1, max_size=4)},
        optional={"instructions": texts, "max_output_tokens": st.integers(0, 999), "stream": st.booleans()}),
    "/v1/messages": st.fixed_dictionaries(
        {"model": models, "max_tokens": st.integers(1, 4096), "messages": st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant"]), "content": texts | anthropic_blocks}),
            min_size=1, max_size=6)}, optional={"system": texts, "stream": st.booleans()}),
    "/v1/messages/count_tokens": st.fixed_dictionaries(
        {"model": models, "messages": st.lists(st.fixed_dictionaries(
            {"role": st.just("user"), "content": texts}), min_size=1, max_size=3)}),
    "/inference/v1/generate": st.fixed_dictionaries(
        {"model": models, "token_ids": token_ids},
        optional={"sampling_params": st.fixed_dictionaries({}, optional={"max_tokens": st.integers(0, 999)})}),
    "/v1/score": st.dictionaries(st.text(max_size=10), json_values, max_size=4),  # OTHER: routed by load
    "/tokenize": st.fixed_dictionaries({"model": models, "prompt": texts}),
}
paths = st.sampled_from(sorted(API_BODIES)) | st.sampled_from(
    ["/", "/v1/models", "/x/v1/chat/completions?x=1", "//v1//completions//", "/v1/audio/transcriptions"]) \
    | st.text(max_size=40).map(lambda s: "/" + s)


def _set_path(doc: Any, path: list[Any], value: Any) -> Any:
    if not path:
        return value
    head, *rest = path
    if isinstance(doc, dict) and head in doc:
        return {**doc, head: _set_path(doc[head], rest, value)}
    if isinstance(doc, list) and isinstance(head, int) and head < len(doc):
        return [*doc[:head], _set_path(doc[head], rest, value), *doc[head + 1:]]
    return doc


def _paths_in(doc: Any, prefix: tuple[Any, ...] = ()) -> list[list[Any]]:
    out = [list(prefix)] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths_in(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths_in(v, (*prefix, i))
    return out


@st.composite
def wrong_typed(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with one value (anywhere in the tree) replaced by an arbitrary JSON value, or a key removed."""
    places = _paths_in(doc)
    if not places:
        return doc
    where = draw(st.sampled_from(places))
    if draw(st.booleans()):
        return _set_path(doc, where, draw(json_values))
    parent_path, key = where[:-1], where[-1]
    parent = doc
    for step in parent_path:
        parent = parent[step]
    if isinstance(parent, dict):
        trimmed = {k: v for k, v in parent.items() if k != key}
        return _set_path(doc, parent_path, trimmed) if parent_path else trimmed
    return doc


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """Byte-level damage: truncation, flipped/inserted/deleted bytes, a duplicated slice."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "duplicate", "prefix-bom", "nul"]))
    if not data:
        return draw(st.binary(max_size=20))
    i = draw(st.integers(0, len(data) - 1))
    if kind == "truncate":
        return data[:i]
    if kind == "flip":
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if kind == "insert":
        return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    if kind == "delete":
        return data[:i] + data[i + draw(st.integers(1, 8)):]
    if kind == "duplicate":
        j = draw(st.integers(i, len(data)))
        return data[:j] + data[i:j] + data[j:]
    if kind == "prefix-bom":
        return b"\xef\xbb\xbf" + data
    return data[:i] + b"\x00" + data[i:]


def dump(doc: Any, compact: bool) -> bytes:
    text = json.dumps(doc, separators=(",", ":") if compact else None, ensure_ascii=compact)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def request_bodies(draw: st.DrawFn, path: str) -> tuple[bytes, str]:
    """(body, kind): a valid body for ``path``'s API, or one broken on purpose in a chosen way."""
    base = API_BODIES.get(path.split("?")[0])
    doc = draw(base) if base is not None else draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
    kind = draw(st.sampled_from(["valid"] * 5 + ["wrong-type", "bytes", "random", "deep", "not-object",
                                                 "empty", "huge-number", "non-utf8", "inf-number"]))
    if kind == "valid":
        return dump(doc, draw(st.booleans())), kind
    if kind == "wrong-type":
        return dump(draw(wrong_typed(doc)), True), kind
    if kind == "bytes":
        return draw(mutated_bytes(dump(doc, True))), kind
    if kind == "random":
        return draw(st.binary(max_size=300)), kind
    if kind == "deep":
        depth = draw(st.integers(60, 3000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return b'{"model":"m","x":' + opener * depth + b"1" + closer * depth + b"}", kind
    if kind == "not-object":
        return dump(draw(json_values.filter(lambda v: not isinstance(v, dict))), True), kind
    if kind == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n\t ", b"{}"])), kind
    if kind == "inf-number":  # decodes to float("inf"): must never be re-encoded as the non-JSON "Infinity"
        return dump(doc, True)[:-1] + b',"temperature":' + draw(st.sampled_from([b"1e999", b"-1e400"])) + b"}", kind
    if kind == "huge-number":
        return b'{"model":"m","max_tokens":' + b"9" * draw(st.integers(4000, 20000)) + b',"prompt":"x"}', kind
    return b'{"model":"m","prompt":"' + draw(st.binary(min_size=1, max_size=20)).replace(b'"', b"") + b'\xff"}', kind


@st.composite
def chunked(draw: st.DrawFn, data: bytes, max_pieces: int = 12) -> list[bytes]:
    """``data`` cut at random points (empty pieces allowed, as Envoy sends a 0-byte EoS chunk)."""
    if not data:
        return draw(st.sampled_from([[], [b""], [b"", b""]]))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=max_pieces - 1)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- ext_proc messages -----------------------------------------------------------------------------


def header_map_of(pairs: list[tuple[str, bytes]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in pairs])


header_names = st.sampled_from(["x-request-id", "content-type", "content-length", "x-gateway-destination-endpoint",
                                "x-gateway-destination-endpoint-subset", "x-gateway-destination-endpoint-served",
                                "x-gateway-model-name-rewrite", "x-llm-d-model-name-rewrite",
                                "x-gateway-inference-objective", "x-gateway-inference-fairness-id", ":path",
                                ":method", ":status", "content-encoding"]) | st.text(min_size=1, max_size=20)
header_values = (st.binary(max_size=60) | st.sampled_from([b"", b"0", b"-1", b"18446744073709551616", b"\xb2",
                                                           "²".encode(), b"9" * 5000, b"application/json",
                                                           b"text/plain", b"multipart/form-data; boundary=x"])
                 | st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")))
extra_headers = st.lists(st.tuples(header_names, header_values), max_size=6)
subset_values = (st.lists(st.sampled_from([*POOL, "192.168.1.1", "10.0.0.1:80", "", " ", "[::1]:80"]), max_size=4)
                 | st.sampled_from([",".join(POOL[:2]), "garbage", ""]) | json_values)


def with_metadata(msg: pb.ProcessingRequest, namespace: str, values: dict[str, Any]) -> pb.ProcessingRequest:
    with contextlib.suppress(ValueError, TypeError):  # values a protobuf Struct cannot hold (huge ints, ...)
        msg.metadata_context.filter_metadata[namespace].update(values)
    return msg


@dataclass
class Exchange:
    """One HTTP request's ext_proc messages, request side and response side, and what they mean."""

    request: list[pb.ProcessingRequest]
    response: list[pb.ProcessingRequest]
    path: str
    body: bytes
    body_kind: str
    header_only: bool = False
    trailers: bool = False  # the request body ends with trailers, not an EoS chunk
    response_eos: bool = True  # the response ends with an EoS chunk (else trailers, or nothing)
    response_chunks: list[bytes] = field(default_factory=list)
    rewrite: str | None = None
    notes: list[str] = field(default_factory=list)


sse_event = st.builds(lambda d: b"data: " + json.dumps(d).encode() + b"\n\n",
                      st.fixed_dictionaries({"id": st.text(max_size=5)}, optional={
                          "model": st.sampled_from(["demo-model", "target-x"]),
                          "usage": st.fixed_dictionaries({}, optional={"prompt_tokens": st.integers(-5, 10**6),
                                                                       "completion_tokens": json_values})}))
response_bodies = (st.lists(sse_event, max_size=6).map(lambda evs: b"".join(evs) + b"data: [DONE]\n\n")
                   | json_values.map(lambda v: dump({"model": "target-x", "usage": v, "x": 1}, True))
                   | st.binary(max_size=200))


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    """A well-formed exchange as Envoy 1.40 sends it in FULL_DUPLEX_STREAMED (request side first)."""
    path = draw(paths)
    body, kind = draw(request_bodies(path))
    header_only = draw(st.integers(0, 9)) == 0
    headers: list[tuple[str, bytes]] = [(":path", path.encode("utf-8", "surrogatepass")), (":method", b"POST"),
                                        (":authority", b"gw")]
    if draw(st.booleans()):
        headers.append(("content-type", draw(st.sampled_from(
            [b"application/json", b"application/json; charset=utf-8", b"text/plain", b"application/octet-stream",
             b"multipart/form-data; boundary=xyz", b"application/x-www-form-urlencoded", b""]))))
    if draw(st.booleans()):
        headers.append(("content-length", str(len(body)).encode()))
    rewrite = draw(st.none() | st.sampled_from(["target-x", "demo-model"]))
    if rewrite:
        headers.append(("x-gateway-model-name-rewrite", rewrite.encode()))
    headers += draw(extra_headers)
    if draw(st.integers(0, 19)) == 0:  # huge headers (Envoy's default limit is 60 KiB; ours must not care)
        headers += [(f"x-big-{i}", b"v" * draw(st.integers(0, 8000))) for i in range(draw(st.integers(1, 40)))]
    first = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map_of(headers),
                                                                end_of_stream=header_only))
    first.protocol_config.request_body_mode = FDS  # Envoy sends its processing modes on the first message
    first.protocol_config.response_body_mode = draw(st.sampled_from([FDS, FDS, NONE]))
    if draw(st.integers(0, 3)) == 0:
        with_metadata(first, "envoy.lb.subset_hint", {"x-gateway-destination-endpoint-subset": draw(subset_values)})
    request = [first]
    trailers = False
    if not header_only:
        pieces = draw(chunked(body))
        trailers = draw(st.integers(0, 7)) == 0
        for i, piece in enumerate(pieces):
            request.append(pb.ProcessingRequest(request_body=pb.HttpBody(
                body=piece, end_of_stream=(i == len(pieces) - 1) and not trailers)))
        if not pieces and not trailers:
            request.append(pb.ProcessingRequest(request_body=pb.HttpBody(end_of_stream=True)))
        if trailers:
            request.append(pb.ProcessingRequest(request_trailers=pb.HttpTrailers(
                trailers=header_map_of([("x-trailer", b"1")]))))
        if draw(st.integers(0, 3)) == 0:  # the subset hint may come on the last body message too
            with_metadata(request[-1], "envoy.lb.subset_hint",
                          {"x-gateway-destination-endpoint-subset": draw(subset_values)})
    # Response side (sent by Envoy only if the request was routed upstream).
    status = draw(st.sampled_from([b"200", b"200", b"500", b"429", b"", b"abc", "²".encode(), b"9" * 5000]))
    ctype = draw(st.sampled_from([b"text/event-stream", b"application/json", b"", b"text/plain"]))
    rbody = draw(response_bodies)
    rchunks = draw(chunked(rbody))
    response_end = draw(st.sampled_from(["eos", "eos", "eos", "trailers", "headers-eos", "none"]))
    resp_headers = pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=header_map_of([(":status", status), ("content-type", ctype)]),
        end_of_stream=response_end == "headers-eos"))
    if draw(st.booleans()):
        with_metadata(resp_headers, "envoy.lb", {"x-gateway-destination-endpoint-served":
                                                 draw(st.sampled_from(POOL) | st.text(max_size=20))})
    response = [resp_headers]
    if response_end != "headers-eos":
        for i, piece in enumerate(rchunks):
            response.append(pb.ProcessingRequest(response_body=pb.HttpBody(
                body=piece, end_of_stream=response_end == "eos" and i == len(rchunks) - 1)))
        if response_end == "eos" and not rchunks:
            response.append(pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True)))
        if response_end == "trailers":
            response.append(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    return Exchange(request=request, response=response, path=path, body=body, body_kind=kind,
                    header_only=header_only, trailers=trailers, response_eos=response_end in ("eos", "headers-eos"),
                    response_chunks=rchunks if response_end != "headers-eos" else [], rewrite=rewrite)


def random_message() -> st.SearchStrategy[pb.ProcessingRequest]:
    """Any single ProcessingRequest, including ones that make no sense where they land."""
    hdrs = st.builds(lambda pairs, eos: pb.HttpHeaders(headers=header_map_of(pairs), end_of_stream=eos),
                     st.lists(st.tuples(header_names, header_values), max_size=5), st.booleans())
    body = st.builds(lambda b, eos: pb.HttpBody(body=b, end_of_stream=eos), st.binary(max_size=100), st.booleans())
    trailers = st.builds(lambda pairs: pb.HttpTrailers(trailers=header_map_of(pairs)),
                         st.lists(st.tuples(header_names, header_values), max_size=2))
    return st.one_of(
        hdrs.map(lambda h: pb.ProcessingRequest(request_headers=h)),
        body.map(lambda b: pb.ProcessingRequest(request_body=b)),
        trailers.map(lambda t: pb.ProcessingRequest(request_trailers=t)),
        hdrs.map(lambda h: pb.ProcessingRequest(response_headers=h)),
        body.map(lambda b: pb.ProcessingRequest(response_body=b)),
        trailers.map(lambda t: pb.ProcessingRequest(response_trailers=t)),
        st.just(pb.ProcessingRequest()),  # no oneof set at all
        st.builds(lambda mode: _protocol_only(mode), st.sampled_from([FDS, NONE, 0, 1, 2, 99])),
    )


def _protocol_only(mode: int) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest()
    msg.protocol_config.response_body_mode = mode
    return msg


@st.composite
def mutated_sequences(draw: st.DrawFn, msgs: list[pb.ProcessingRequest]) -> tuple[list[pb.ProcessingRequest], str]:
    """Sequences Envoy would not send: dropped, duplicated, swapped, inserted or truncated messages."""
    out = list(msgs)
    applied = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["drop", "duplicate", "swap", "insert", "truncate", "response-first",
                                     "duplicate-eos", "reverse"]))
        applied.append(kind)
        n = len(out)
        if kind == "drop" and n:
            del out[draw(st.integers(0, n - 1))]
        elif kind == "duplicate" and n:
            i = draw(st.integers(0, n - 1))
            out.insert(i, out[i])
        elif kind == "swap" and n >= 2:
            i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
            out[i], out[j] = out[j], out[i]
        elif kind == "insert":
            out.insert(draw(st.integers(0, n)), draw(random_message()))
        elif kind == "truncate" and n:
            out = out[:draw(st.integers(0, n - 1))]
        elif kind == "response-first":
            def is_response(m: pb.ProcessingRequest) -> bool:
                return (m.WhichOneof("request") or "").startswith("response")
            out = [m for m in out if is_response(m)] + [m for m in out if not is_response(m)]
        elif kind == "duplicate-eos":
            eos = [m for m in out if m.WhichOneof("request") in ("request_body", "response_body")
                   and getattr(m, m.WhichOneof("request")).end_of_stream]
            if eos:
                out.insert(draw(st.integers(0, n)), draw(st.sampled_from(eos)))
        elif kind == "reverse":
            out.reverse()
    return out, "+".join(applied)
