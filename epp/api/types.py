"""What the request parsers produce: one typed view of an inference request, whatever its API."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ApiKind(StrEnum):
    COMPLETIONS = "completions"
    CHAT_COMPLETIONS = "chat-completions"
    RESPONSES = "responses"
    EMBEDDINGS = "embeddings"
    MESSAGES = "messages"  # Anthropic
    COUNT_TOKENS = "messages-count-tokens"  # Anthropic, routed without response processing
    GENERATE = "generate"  # vLLM /inference/v1/generate (token ids in, token ids out)
    OTHER = "other"  # any other path: routed by load alone, body forwarded untouched


class ErrorStyle(StrEnum):
    """Which error envelope a client of this API understands."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


@dataclass(slots=True)
class ParsedBody:
    """The API-specific facts a parser extracts from a request body.

    ``prompt_text`` / ``prompt_token_ids`` are what prefix-affinity plugins hash; a parser sets
    whichever the request really carries (token ids when the client sent ids).
    """

    api: ApiKind
    model: str = ""
    stream: bool = False
    prompt_text: str | None = None
    prompt_token_ids: list[int] | None = None
    max_output_tokens: int | None = None
    cache_salt: str | None = None
    payload: dict[str, Any] | None = None  # the decoded JSON object, None for non-JSON bodies
    skip_response: bool = False  # no usage to learn from the response (e.g. count_tokens)

    @property
    def error_style(self) -> ErrorStyle:
        return ErrorStyle.ANTHROPIC if self.api in (ApiKind.MESSAGES, ApiKind.COUNT_TOKENS) else ErrorStyle.OPENAI


@dataclass(slots=True)
class Usage:
    """Token usage reported by a model server, merged field by field across SSE events."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None

    def merge(self, other: Usage) -> None:
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            value = getattr(other, name)
            if value is not None:
                setattr(self, name, value)

    @property
    def empty(self) -> bool:
        return self.prompt_tokens is None and self.completion_tokens is None and self.cached_tokens is None


@dataclass(slots=True)
class InferenceRequest:
    """A request as the scheduler and plugins see it."""

    request_id: str
    path: str
    method: str
    headers: dict[str, str]  # lower-cased names
    body: ParsedBody
    raw_body: bytes
    target_model: str = ""  # model after rewrite; equals body.model when nothing rewrote it
    objective: str | None = None
    fairness_id: str = "default-flow"
    priority: int = 0
    received_at: float = 0.0  # time.monotonic() when the request headers arrived
    path_model: str | None = None  # the served model a /<model>/ path prefix selected (epp.admission.models)
    attributes: dict[str, Any] = field(default_factory=dict)  # plugin scratch space for this request
    response_headers: dict[str, str] = field(default_factory=dict)  # plugins' additions to the client's response

    @property
    def model(self) -> str:
        return self.body.model

    @property
    def api(self) -> ApiKind:
        return self.body.api
