"""Logging set-up: text or JSON lines (``--log-format``), verbosity by ``-v`` as GIE's.

GIE's levels: ``-v 2`` the default (info), ``3`` verbose, ``4`` debug (one line per routing decision),
``5`` trace. ``-v 0``/``1`` keep info lines; warnings and errors are always logged.

A call may pass structured fields with ``extra={"fields": {...}}``: JSON lines carry them as keys
(under ``fields``), text lines append them as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from epp.config import Config

VERBOSE = 15  # -v 3
TRACE = 5  # -v 5
logging.addLevelName(VERBOSE, "VERBOSE")
logging.addLevelName(TRACE, "TRACE")


def level_for(verbosity: int) -> int:
    if verbosity >= 5:
        return TRACE
    if verbosity == 4:
        return logging.DEBUG
    if verbosity == 3:
        return VERBOSE
    return logging.INFO


# Control characters in a text line are escaped: a client-chosen value (a model name, a request id) carrying a
# newline must not forge a log line. JSON lines are escaped by the encoder.
_CONTROL = {i: f"\\x{i:02x}" for i in (*range(32), 127, 0x85)} | {0x2028: "\\u2028", 0x2029: "\\u2029"}


def escape_control(text: str) -> str:
    return text.translate(_CONTROL)


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc["fields"] = {k: _jsonable(v) for k, v in fields.items()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # the message, not a traceback appended after it
        record.message = escape_control(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            extra = " ".join(f"{k}={json.dumps(v, separators=(',', ':'), default=str)}"
                             for k, v in fields.items() if v is not None and k != "explanation")
            if "\n" in line:  # keep a traceback last
                head, _, tail = line.partition("\n")
                return f"{head} {extra}\n{tail}"
            return f"{line} {extra}"
        return line


def setup_logging(verbosity: int = Config.verbosity, fmt: str = Config.log_format) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_for(verbosity))
    # Libraries stay at info at most: their debug output is not EPP's decisions.
    for noisy in ("asyncio", "grpc", "aiohttp", "urllib3", "opentelemetry"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, level_for(verbosity)))
