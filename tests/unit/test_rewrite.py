"""Model rewrite: request re-serialisation and the streaming response restorer."""

from __future__ import annotations

import itertools
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.api.rewrite import ModelNameRestorer, rewrite_request_model

TARGET = "llama-3-8b-lora-v2"
ORIGINAL = "assistant"


def reference(data: bytes, target: str = TARGET, original: str = ORIGINAL) -> bytes:
    """One-shot leftmost, non-overlapping replacement of both spacing forms (and \\u-escaped spellings)."""
    if target == original:
        return data
    literals = dict.fromkeys([json.dumps(target, ensure_ascii=False).encode(), json.dumps(target).encode()])
    pattern = re.compile(b'"model"(: ?)(' + b"|".join(re.escape(lit) for lit in literals) + b")")
    replacement = json.dumps(original, ensure_ascii=False).encode()
    return pattern.sub(lambda m: b'"model"' + m.group(1) + replacement, data)


def restore(chunks: list[bytes], target: str = TARGET, original: str = ORIGINAL) -> tuple[bytes, list[bytes]]:
    restorer = ModelNameRestorer(target, original)
    outputs = [restorer.feed(chunk) for chunk in chunks]
    outputs.append(restorer.flush())
    return b"".join(outputs), outputs


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# ---------------------------------------------------------------------------------------------- request


def test_rewrite_request_model_is_compact_and_keeps_key_order() -> None:
    payload = {"messages": [{"role": "user", "content": "héllo"}], "model": "assistant", "stream": True}
    out = rewrite_request_model(payload, TARGET)
    expected = '{"messages":[{"role":"user","content":"héllo"}],"model":"' + TARGET + '","stream":true}'
    assert out == expected.encode()
    assert payload["model"] == "assistant"  # the caller's payload is untouched


def test_rewrite_request_model_with_a_lone_surrogate_stays_valid_utf8() -> None:
    out = rewrite_request_model({"model": "a", "prompt": "x\ud800é"}, "b")
    assert json.loads(out.decode("utf-8")) == {"model": "b", "prompt": "x\ud800é"}


def test_rewrite_request_model_adds_a_missing_model() -> None:
    assert json.loads(rewrite_request_model({"input": "x"}, "t")) == {"input": "x", "model": "t"}


# --------------------------------------------------------------------------------------------- response

SSE_BODY = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"' + TARGET.encode() + b'","choices":[]}\n\n'
    b'data: {"id": "c1", "model": "' + TARGET.encode()
    + b'", "choices": [{"delta": {"content": "model"}}]}\n\n'
    b'data: {"model":"' + TARGET.encode() + b'-other","note":"\\"model\\":\\"x\\""}\n\n'
    b"data: [DONE]\n\n"
)


def test_restores_both_spacing_forms_and_nothing_else() -> None:
    out, _ = restore([SSE_BODY])
    assert out.count(b'"model":"assistant"') == 1
    assert out.count(b'"model": "assistant"') == 1
    assert b'"model":"' + TARGET.encode() + b'-other"' in out  # a longer name is a different model
    assert out == reference(SSE_BODY)


def test_every_split_point() -> None:
    expected = reference(SSE_BODY)
    for i in range(len(SSE_BODY) + 1):
        out, _ = restore([SSE_BODY[:i], SSE_BODY[i:]])
        assert out == expected, i


def test_every_pair_of_split_points_around_a_pattern() -> None:
    body = b'{"x":1,"model": "' + TARGET.encode() + b'","y":2}'
    expected = reference(body)
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1):
            out, _ = restore([body[:i], body[i:j], body[j:]])
            assert out == expected, (i, j)


def test_byte_by_byte() -> None:
    out, _ = restore([bytes([b]) for b in SSE_BODY])
    assert out == reference(SSE_BODY)


def test_holds_back_only_a_possible_pattern_start() -> None:
    restorer = ModelNameRestorer(TARGET, ORIGINAL)
    assert restorer.feed(b"no quotes here at all") == b"no quotes here at all"
    assert restorer.feed(b'{"id":"x", "mod') == b'{"id":"x", '
    assert restorer.feed(b'e') == b""
    assert restorer.feed(b'rn":1}') == b'"modern":1}'
    assert restorer.feed(b'{"model":"' + TARGET.encode()) == b"{"
    assert restorer.feed(b'"}') == b'"model":"assistant"}'
    assert restorer.feed(b'"') == b""
    assert restorer.flush() == b'"'
    assert restorer.flush() == b""


def test_complete_chunks_are_passed_on_at_once() -> None:
    restorer = ModelNameRestorer(TARGET, ORIGINAL)
    event = b'data: {"model":"' + TARGET.encode() + b'","choices":[]}\n\n'
    assert restorer.feed(event) == event.replace(TARGET.encode(), b"assistant")


def test_same_names_pass_through() -> None:
    restorer = ModelNameRestorer("m", "m")
    assert not restorer.active
    assert restorer.feed(b'{"model":"m') == b'{"model":"m'
    assert restorer.flush() == b""


def test_original_name_is_json_escaped() -> None:
    out, _ = restore([b'{"model":"t"}'], target="t", original='we"ird\\name')
    assert json.loads(out) == {"model": 'we"ird\\name'}


def test_unicode_target_in_both_spellings() -> None:
    target = "modèle-7b"
    body = b'{"model":"' + target.encode() + b'"}{"model":"mod\\u00e8le-7b"}'
    out, _ = restore([body], target=target, original="m")
    assert out == b'{"model":"m"}{"model":"m"}'


_FRAGMENTS = [b'"model":"', b'"model": "', b'"model"', b'"mod', b'"', b":", b" ", b"t", b"tt", b'"x"',
              b"{", b"}", b'"model":"t"', b'"model": "t"', b'"model":"t', b"\\", b"\xc3\xa9", b"model",
              b'"model":"tt"']


@settings(max_examples=500)
@given(data=st.data())
def test_any_chunking_equals_one_shot_replacement(data: st.DataObject) -> None:
    body = b"".join(data.draw(st.lists(st.sampled_from(_FRAGMENTS), max_size=40)))
    target = data.draw(st.sampled_from(["t", "tt", "t:"]))
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=20))
    out, outputs = restore(chunked(body, cuts), target=target, original="ORIG")
    assert out == reference(body, target, "ORIG")
    longest = len(b'"model": ') + len(json.dumps(target))
    assert len(outputs[-1]) < longest  # at most a proper prefix of a pattern is ever held


@settings(max_examples=200)
@given(body=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=10))
def test_arbitrary_bytes_round_trip_when_no_pattern(body: bytes, cuts: list[int]) -> None:
    cuts = [c for c in cuts if c <= len(body)]
    out, _ = restore(chunked(body, cuts))
    assert out == reference(body)
