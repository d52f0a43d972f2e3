"""vLLM's token-in/token-out API: POST /inference/v1/generate.

The request carries the exact token ids, so prefix matching uses them as they are.
"""

from __future__ import annotations

from typing import Any

from epp.api.fields import common_fields, invalid, is_token_ids, json_type, optional_count, optional_object
from epp.api.types import ApiKind, ParsedBody


def parse_generate(payload: dict[str, Any]) -> ParsedBody:
    parsed = common_fields(payload, ApiKind.GENERATE)
    token_ids = payload.get("token_ids")
    if token_ids is None:
        raise invalid("token_ids", "'token_ids' is required")
    if not isinstance(token_ids, list) or not is_token_ids(token_ids):
        got = json_type(token_ids) if not isinstance(token_ids, list) else "an invalid array"
        raise invalid("token_ids", "'token_ids' must be a non-empty array of integers in [0, 2^32), "
                      f"got {got}")
    parsed.prompt_token_ids = token_ids
    sampling = optional_object(payload, "sampling_params")
    if sampling is not None:
        parsed.max_output_tokens = optional_count(sampling, "max_tokens", "sampling_params.max_tokens")
    return parsed
