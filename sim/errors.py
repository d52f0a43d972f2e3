"""Errors in vLLM's own envelopes.

OpenAI-style paths answer `{"error": {"message", "type", "param", "code"}}` where `type` is vLLM's
exception-class name and `code` is the HTTP status as an int (vLLM's ErrorInfo). Anthropic paths answer
`{"type": "error", "error": {"type", "message"}}` with Anthropic's error type names.
"""

from __future__ import annotations

import json
from http import HTTPStatus

_VLLM_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "BadRequestError",
    415: "BadRequestError",
    422: "UnprocessableEntityError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 err_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:
        return "Error"


def openai_error_body(err: ApiError) -> dict:
    etype = err.err_type or _VLLM_TYPES.get(err.status) or _phrase(err.status)
    return {"error": {"message": err.message, "type": etype, "param": err.param, "code": err.status}}


def anthropic_error_body(err: ApiError) -> dict:
    etype = _ANTHROPIC_TYPES.get(err.status, "api_error")
    return {"type": "error", "error": {"type": etype, "message": err.message}}


def error_bytes(err: ApiError, anthropic: bool) -> bytes:
    return json.dumps(anthropic_error_body(err) if anthropic else openai_error_body(err)).encode()


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model")
