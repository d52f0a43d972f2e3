"""Every parser EPP runs on input it does not control, fed generated and damaged input.

Complements the per-module fuzz cases in tests/unit (parsers, usage, rewrite, promtext) with the whole
request entry point (body x path x Content-Type x Content-Encoding x limits), exact JSON depth, random SSE
streams under random chunking, the response model-name restorer against a reference, ext_proc header
and metadata decoding, subset hints, static endpoint files and Prometheus pages.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from epp.api.answer import AnswerCollector
from epp.api.errors import EppError, error_body, error_headers
from epp.api.parsing import api_for_path, decode_json_object, nesting_exceeds, parse_request
from epp.api.rewrite import ModelNameRestorer
from epp.api.types import ApiKind, ErrorStyle, ParsedBody
from epp.api.usage import UsageExtractor
from epp.datalayer import promtext
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.datalayer.static import DiscoveryError, parse_endpoint_list, parse_endpoints_file
from epp.director import filter_subset
from epp.extproc import protocol as p
from epp.extproc.stream import ExtProcStream, StreamOptions
from tests.extproc_helpers import body_msg, headers_msg
from tests.fuzz.counting import count
from tests.fuzz.invariants import new_director, run_stream
from tests.fuzz.strategies import API_BODIES, chunked, dump, header_map_of, json_values, paths, request_bodies

CONTENT_TYPES = st.none() | st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "application/vnd.api+json", "text/json", "text/plain",
     "multipart/form-data; boundary=xyz", "multipart/form-data", "application/x-www-form-urlencoded",
     "application/octet-stream", "", ";;;", "APPLICATION/JSON"]) | st.text(max_size=30)
ENCODINGS = st.none() | st.sampled_from(["", "identity", "gzip", "br", "deflate, gzip"]) | st.text(max_size=10)


@given(st.data(), paths, CONTENT_TYPES, ENCODINGS, st.integers(1, 80))
def test_request_entry_point_answers_a_parse_or_a_4xx(data: st.DataObject, path: str, ctype: str | None,
                                                      encoding: str | None, depth: int):
    body, kind = data.draw(request_bodies(path))
    count("parsers: parse_request (path x body x content-type x encoding)")
    try:
        parsed = parse_request(path, body, ctype, depth, content_encoding=encoding)
    except EppError as e:
        assert e.status in (400, 415) and re.fullmatch(r"[a-z0-9-]+", e.reason), e
        assert api_for_path(path) is not ApiKind.OTHER  # bodies on paths EPP does not own are never refused
        if e.status == 415:  # only for a body that is not JSON and was declared as something else
            assert kind != "valid"
        json.loads(error_body(e, ErrorStyle.OPENAI))
    else:
        assert isinstance(parsed, ParsedBody)
        if parsed.api is not ApiKind.OTHER:
            assert isinstance(parsed.model, str) and parsed.model.strip()


@given(json_values, st.integers(1, 12))
def test_json_depth_limit_is_exact(value: Any, max_depth: int):
    count("parsers: JSON depth limit")
    doc = {"model": "m", "v": value}
    body = json.dumps(doc).encode("utf-8", "surrogatepass")

    def depth(v: Any) -> int:
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        return 0

    try:
        decode_json_object(body, max_depth)
    except EppError as e:
        assert e.reason == "json-too-deep" and depth(doc) > max_depth, (e, depth(doc))
    else:
        assert depth(doc) <= max_depth
    assert nesting_exceeds(doc, max_depth) is (depth(doc) > max_depth)


@given(st.sampled_from(sorted(API_BODIES)), st.data())
def test_limits_refuse_with_413_and_never_crash(path: str, data: st.DataObject):
    """Message-count and prompt-length limits, at tiny values so generated bodies cross them."""
    doc = data.draw(API_BODIES[path])
    options = StreamOptions(max_messages=data.draw(st.integers(0, 3)), max_prompt_chars=data.draw(st.integers(0, 50)),
                            max_prompt_tokens=data.draw(st.integers(0, 10)))
    count("parsers: request limits")
    body = dump(doc, True)
    stream, _ = run_stream(new_director(), [headers_msg(path), body_msg(body)], options, path)
    if stream.error is None:
        return
    if stream.error.status == 413:
        parsed = parse_request(path, body, None)
        items = (parsed.payload or {}).get("input" if parsed.api is ApiKind.RESPONSES else "messages")
        over = [options.max_messages and isinstance(items, list) and len(items) > options.max_messages,
                options.max_prompt_chars and len(parsed.prompt_text or "") > options.max_prompt_chars,
                options.max_prompt_tokens and len(parsed.prompt_token_ids or []) > options.max_prompt_tokens]
        assert any(over), (stream.error, options)


# -- responses ------------------------------------------------------------------------------------

usage_objects = st.fixed_dictionaries({}, optional={
    "prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6),
    "input_tokens": st.integers(0, 999), "output_tokens": st.integers(0, 999),
    "prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": st.integers(0, 99)}),
    "cache_read_input_tokens": st.integers(0, 99)})
events = st.fixed_dictionaries({"id": st.text(max_size=6)}, optional={
    "usage": usage_objects | st.none(), "choices": st.lists(json_values, max_size=2),
    "message": st.fixed_dictionaries({"usage": usage_objects}),
    "text": st.text(alphabet="ab\n\r:{}\"usage", max_size=30)})


@given(st.lists(events, max_size=8), st.sampled_from([b"\n", b"\r\n", b"\r"]), st.booleans(), st.data())
def test_sse_usage_is_the_same_whatever_the_chunking(evs: list[dict], eol: bytes, named: bool, data: st.DataObject):
    lines = []
    for ev in evs:
        if named:
            lines.append(b"event: x")
        lines.append(b"data: " + json.dumps(ev).encode())
        lines.append(b"")
    body = eol.join([*lines, b"data: [DONE]", b"", b""])
    count("parsers: SSE usage under random chunking")

    def run(chunks: list[bytes]) -> Any:
        u = UsageExtractor(ApiKind.CHAT_COMPLETIONS)
        for c in chunks:
            u.feed(c, "text/event-stream")
        return u.finish()

    assert run(data.draw(chunked(body, 30))) == run([body])


@given(st.lists(events | json_values, max_size=8), st.sampled_from([ApiKind.CHAT_COMPLETIONS, ApiKind.MESSAGES]),
       st.booleans(), st.data())
def test_answers_read_whatever_the_body_and_its_chunking(evs: list[Any], api: ApiKind, sse: bool,
                                                          data: st.DataObject):
    """Any body, cut anywhere, gives text or None (never raises), the same whatever the chunking."""
    body = (b"".join(b"data: " + json.dumps(ev).encode() + b"\n\n" for ev in evs) if sse
            else json.dumps(evs[0] if evs else {}).encode())
    count("parsers: conversation answers under random chunking")

    def run(chunks: list[bytes]) -> str | None:
        c = AnswerCollector(api)
        for chunk in chunks:
            c.feed(chunk)
        out = c.text()
        assert out is None or isinstance(out, str)
        return out

    assert run(data.draw(chunked(body, 30))) == run([body])


@given(st.text(max_size=12), st.text(max_size=12), st.lists(st.sampled_from(
    ['"model":', '"model": ', '"model" :', '"x"', "{", "}", ",", " "]) | st.text(max_size=6), max_size=20), st.data())
def test_model_name_restorer_matches_a_one_shot_reference(target: str, original: str, parts: list[str],
                                                          data: st.DataObject):
    pieces = []
    for part in parts:
        pieces.append(part)
        if data.draw(st.booleans()):
            pieces.append(json.dumps(target, ensure_ascii=data.draw(st.booleans())))
    raw = "".join(pieces).encode("utf-8", "surrogatepass")
    count("parsers: model-name restorer vs reference")
    restorer = ModelNameRestorer(target, original)
    got = b"".join(restorer.feed(c) for c in data.draw(chunked(raw, 20))) + restorer.flush()
    # Reference: leftmost, longest-first, non-overlapping replacement over the whole body at once.
    one = ModelNameRestorer(target, original)
    table = one._replacements
    if not table:
        assert got == raw
        return
    pattern = re.compile(b"|".join(re.escape(k) for k in sorted(table, key=len, reverse=True)))
    assert got == pattern.sub(lambda m: table[m.group(0)], raw)


# -- ext_proc plumbing -------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=40)), max_size=10),
       st.lists(st.text(max_size=30), max_size=3))
def test_header_map_and_first_header_never_raise(pairs: list[tuple[str, bytes]], names: list[str]):
    count("plumbing: header maps")
    headers = p.header_map(pb.HttpHeaders(headers=header_map_of(pairs)))
    assert all(k == k.lower() for k in headers)
    p.first_header(headers, names)


struct_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
                             | st.text(max_size=20), lambda c: st.lists(c, max_size=4)
                             | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=12)


@given(st.dictionaries(st.sampled_from([p.SUBSET_NAMESPACE, p.LB_NAMESPACE, "other"]),
                       st.dictionaries(st.sampled_from([p.SUBSET_KEY, p.SERVED_KEY, "x"]), struct_values, max_size=3),
                       max_size=3))
def test_metadata_of_any_shape_is_read_safely(namespaces: dict[str, dict[str, Any]]):
    count("plumbing: metadata contexts")
    msg = pb.ProcessingRequest()
    for ns, values in namespaces.items():
        s = struct_pb2.Struct()
        s.update(values)
        msg.metadata_context.filter_metadata[ns].CopyFrom(s)
    for ns in (p.SUBSET_NAMESPACE, p.LB_NAMESPACE):
        for key in (p.SUBSET_KEY, p.SERVED_KEY):
            v = p.metadata_value(msg.metadata_context, ns, key)
            assert v is None or isinstance(v, str) or all(isinstance(x, str) for x in v)
    stream = ExtProcStream(new_director())
    stream.receive(msg)
    stream.close()


@given(st.lists(st.text(max_size=25) | st.sampled_from(["192.168.1.1", "192.168.1.1:8000", "[::1]:80", ":", ""]),
                max_size=6))
def test_subset_filter_only_narrows(subset: list[str]):
    count("plumbing: subset hints")
    pool = EndpointPool()
    pool.sync([EndpointSpec(f"p{i}", f"192.168.1.{i + 1}", 8000) for i in range(3)])
    got = filter_subset(pool.endpoints, subset)
    assert set(got) <= set(pool.endpoints)


@given(st.text(max_size=80), st.integers(100, 599), st.text(max_size=20), st.none() | st.text(max_size=10))
def test_error_envelopes_are_always_valid_json(message: str, status: int, reason: str, param: str | None):
    count("plumbing: error envelopes")
    err = EppError(status, reason, message, param)
    for style in ErrorStyle:
        json.loads(error_body(err, style))
    assert error_headers(err)["content-type"] == "application/json"


# -- what operators and model servers feed EPP ------------------------------------------------------

yaml_docs = json_values.map(lambda v: yaml.safe_dump({"endpoints": v} if not isinstance(v, dict) else v))


@given(yaml_docs | st.text(max_size=120) | st.lists(
    st.sampled_from(["10.0.0.1:8000", "[::1]:80", "a:b", "h:0", "h:70000", "host:8000", ":", "[::1", " x:1"]),
    max_size=5).map(lambda xs: "endpoints:\n" + "".join(f"- {x!r}\n" for x in xs)))
def test_static_endpoint_files_load_or_are_refused_cleanly(text: str):
    count("operators: static endpoint files")
    try:
        specs = parse_endpoints_file(text)
    except (DiscoveryError, yaml.YAMLError):
        return
    assert all(0 < s.port < 65536 for s in specs)


@given(st.text(max_size=80))
def test_static_endpoint_flags_load_or_are_refused_cleanly(text: str):
    count("operators: --static-endpoints values")
    try:
        specs = parse_endpoint_list(text)
    except DiscoveryError:
        return
    assert all(0 < s.port < 65536 for s in specs)


prom_lines = st.lists(st.sampled_from([
    "vllm:num_requests_running{model_name=\"m\"} 3", "vllm:num_requests_waiting 1e3", "vllm:kv_cache_usage_perc NaN",
    "# HELP vllm:x y", "# TYPE vllm:num_requests_running gauge", "vllm:num_requests_running{model_name= 3 oops",
    "\x00{not prometheus}", "vllm:num_requests_waiting{a=\"\\\"\"} +Inf 123", "vllm:num_requests_waiting",
    "vllm:num_requests_running{} -1", "vllm:num_requests_running{a=\"b\",} 2 17"]) | st.text(max_size=40),
    max_size=12)


@given(prom_lines, st.booleans(), st.booleans())
def test_prometheus_pages_parse_or_report_errors(lines: list[str], suffixes: bool, grouped: bool):
    count("model servers: Prometheus pages")
    page = "\n".join(lines)
    result = promtext.parse(page, ["vllm:num_requests_running", "vllm:num_requests_waiting",
                                   "vllm:kv_cache_usage_perc"], suffixes=suffixes, grouped=grouped)
    assert result.errors >= 0
    promtext.parse(page.encode("utf-8", "surrogatepass"), ["vllm:num_requests_running"])
