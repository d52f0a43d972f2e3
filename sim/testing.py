"""Helpers for tests that drive the simulator (ours and other components')."""

from __future__ import annotations

import json
from typing import Any


def parse_sse(text: str) -> list[tuple[str | None, Any]]:
    """Split an SSE body into (event name or None, decoded data) pairs; `[DONE]` stays a string."""
    out: list[tuple[str | None, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event = None
        data_lines = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data_lines.append(line[5:].lstrip())
        data = "\n".join(data_lines)
        out.append((event, data if data == "[DONE]" else json.loads(data)))
    return out


def chat_body(text: str, max_tokens: int | None = 8, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}], "stream": stream, **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body
