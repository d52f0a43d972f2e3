"""Errors EPP answers itself, rendered in the client API's own error envelope."""

from __future__ import annotations

import json

from epp.api.types import ErrorStyle

# Machine-readable reason, sent in REASON_HEADER (ours) and, for drops, in llm-d's header too.
REASON_HEADER = "x-epp-error-reason"
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"

_OPENAI_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
# Reasons that are drops in llm-d's vocabulary (the request was valid but not served).
_DROP_REASONS = {"rejected-no-endpoints", "rejected-saturated", "rejected-ttl-expired", "rejected-shutting-down"}


class EppError(Exception):
    """A request EPP will not route. ``reason`` is a stable kebab-case code for machines."""

    def __init__(self, status: int, reason: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.param = param

    def __repr__(self) -> str:
        return f"EppError({self.status}, {self.reason!r}, {self.message!r})"


def bad_request(reason: str, message: str, param: str | None = None) -> EppError:
    return EppError(400, reason, message, param)


def error_body(err: EppError, style: ErrorStyle, request_id: str | None = None) -> bytes:
    """The error in the API's envelope, with the request's id beside it (Anthropic's ``request_id``; for the
    OpenAI style ``requestId``, as OpenAI-compatible gateways put it) so a client can quote it."""
    if style is ErrorStyle.ANTHROPIC:
        doc: dict = {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(err.status, "api_error"),
                                                "message": err.message}}
        if request_id:
            doc["request_id"] = request_id
    else:
        doc = {"error": {"message": err.message, "type": _OPENAI_TYPES.get(err.status, "internal_error"),
                         "param": err.param, "code": err.reason}}
        if request_id:
            doc["requestId"] = request_id
    return json.dumps(doc).encode()


def error_headers(err: EppError) -> dict[str, str]:
    headers = {"content-type": "application/json", REASON_HEADER: err.reason}
    if err.reason in _DROP_REASONS:
        headers[DROPPED_REASON_HEADER] = err.reason
    return headers
