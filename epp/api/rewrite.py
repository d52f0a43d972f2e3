"""Model-name rewrite: the request's ``model`` becomes the target, responses get the client's name back.

Requests are re-serialised compactly from the decoded payload (key order kept). Responses are edited
as bytes, the way GIE does it: ``"model":"<target>"`` and ``"model": "<target>"`` become the same with
the client-facing name, streaming, so a pattern split across chunks is still found while everything
that cannot be the start of a pattern is passed on at once.
"""

from __future__ import annotations

import json
from typing import Any

from epp.api.errors import bad_request


def rewrite_request_model(payload: dict[str, Any], target: str) -> bytes:
    """The request body with ``model`` set to ``target``; ``payload`` itself is left unchanged.

    Raises ``EppError`` 400 ``invalid-json`` for a number JSON cannot carry: ``1e999`` decodes to
    infinity, which would be re-encoded as ``Infinity``, and the model server would get invalid JSON."""
    rewritten = {**payload, "model": target}
    try:
        try:
            return json.dumps(rewritten, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        except UnicodeEncodeError:
            # A lone surrogate (legal as a \ud800 escape in JSON) has no UTF-8 form: escape everything.
            return json.dumps(rewritten, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise bad_request("invalid-json", "request body has a number out of range (e.g. 1e999)") from None


def _json_string_forms(value: str) -> list[bytes]:
    """The ways a JSON encoder may spell ``value`` as a string literal (raw UTF-8 or \\u escapes)."""
    raw = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return list(dict.fromkeys((raw, json.dumps(value).encode())))


class ModelNameRestorer:
    """Rewrites the target model name back to the original in a response body, chunk by chunk.

    ``feed`` returns the bytes that are final now; at most ``len(longest pattern) - 1`` bytes are held
    back, and only when they could begin a pattern. ``flush`` returns whatever is still held at the end
    of the body. The output equals a one-shot leftmost, non-overlapping replacement of the whole body.
    """

    def __init__(self, target: str, original: str) -> None:
        self._held = b""
        self._replacements: dict[bytes, bytes] = {}
        if target != original:
            original_literal = json.dumps(original, ensure_ascii=False).encode("utf-8", "surrogatepass")
            for literal in _json_string_forms(target):
                for separator in (b":", b": "):
                    self._replacements[b'"model"' + separator + literal] = \
                        b'"model"' + separator + original_literal
        self._patterns = tuple(self._replacements)
        self._max_hold = max((len(pattern) for pattern in self._patterns), default=1) - 1

    @property
    def active(self) -> bool:
        """False when target and original are equal: nothing to rewrite."""
        return bool(self._patterns)

    def feed(self, chunk: bytes) -> bytes:
        if not self._patterns:
            return chunk
        data = self._held + chunk if self._held else chunk
        out, self._held = self._rewrite(data)
        return out

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def _rewrite(self, data: bytes) -> tuple[bytes, bytes]:
        pieces: list[bytes] = []
        done = 0  # data[:done] is already in pieces
        position = data.find(b'"model"')
        while position >= 0:
            pattern = next((p for p in self._patterns if data.startswith(p, position)), None)
            if pattern is None:
                position = data.find(b'"model"', position + 1)
                continue
            pieces.append(data[done:position])
            pieces.append(self._replacements[pattern])
            done = position + len(pattern)
            position = data.find(b'"model"', done)
        hold_from = self._partial_match_start(data, done)
        pieces.append(data[done:hold_from])
        return b"".join(pieces), data[hold_from:]

    def _partial_match_start(self, data: bytes, start: int) -> int:
        """Where the longest tail of ``data[start:]`` that is a proper prefix of a pattern begins."""
        quote = data.find(b'"', max(start, len(data) - self._max_hold))
        while quote >= 0:
            tail = data[quote:]
            if any(pattern.startswith(tail) for pattern in self._patterns):
                return quote
            quote = data.find(b'"', quote + 1)
        return len(data)
