"""Decoding vLLM's KV-cache event messages (as vLLM's ``vllm/distributed/kv_events.py`` publishes them).

A ZMQ message is ``[topic, seq (8-byte big-endian), msgpack payload]``; the payload is an ``EventBatch``
``[ts, events, data_parallel_rank?]``. Each event is either the legacy positional array
``[tag, field1, ...]`` (trailing defaults omitted) or the tagged map ``{"type": tag, field: ...}``
(vLLM >= 0.26). Block hashes are 64-bit integers (possibly negative when a sender wrote int64) or byte
digests, of which vLLM's int form keeps the last 8 bytes big-endian: both normalise to that integer.

Anything malformed raises ``BadEvent(reason)``; a bad event inside a batch is dropped on its own
(``decode_batch`` returns it among the rejects) so one unknown tag does not cost its neighbours.

``engine="sglang"`` reads SGLang's events as llm-d's SGLang adapter does: the same wire format, but its schema
ends at ``medium`` (``BlockStored``: hashes, parent, token ids, block size, lora id, medium; ``BlockRemoved``:
hashes, medium), so later positions or keys (vLLM's ``lora_name``, ``extra_keys``, attention kind) are not read,
and a batch carries its data-parallel rank.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

import msgpack

MASK64 = (1 << 64) - 1
MAX_TOKEN_ID = (1 << 32) - 1  # what array("I") holds: _token_ids checks with it
_INTS = frozenset({int})  # type(True) is bool: never a token id or hash
MAX_PAYLOAD = 64 << 20  # bytes: a batch bigger than this is not one engine step's events

_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                  "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
_SGLANG_STORED_FIELDS = _STORED_FIELDS[:6]
_SGLANG_REMOVED_FIELDS = _REMOVED_FIELDS[:2]
ENGINES = ("vllm", "sglang")
# Attention kinds whose blocks hold a whole prefix (llm-d indexes only these for hybrid models).
_PREFIX_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})


class BadEvent(ValueError):
    """A message or event that cannot be used; ``reason`` labels the drop counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True)
class BlockStored:
    hashes: list[int]
    parent: int | None
    tokens: list[int]
    block_size: int
    lora: str | None
    medium: str
    salt: str | None  # cache_salt from block 0's extra keys (vLLM folds it into the first block's hash)


@dataclass(slots=True)
class BlockRemoved:
    hashes: list[int]
    medium: str


@dataclass(slots=True)
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


def engine_hash(value: Any) -> int:
    if isinstance(value, bool):
        raise BadEvent("wrong-type", "hash is a bool")
    if isinstance(value, int):
        return value & MASK64
    if isinstance(value, bytes | bytearray):
        if not value:
            raise BadEvent("wrong-type", "empty hash")
        return int.from_bytes(value[-8:], "big")
    raise BadEvent("wrong-type", f"hash is {type(value).__name__}")


def _hash_list(value: Any) -> list[int]:
    if not isinstance(value, list):
        raise BadEvent("wrong-type", "block_hashes is not a list")
    if value and _INTS.issuperset(map(type, value)) and min(value) >= 0 and max(value) <= MASK64:
        return value  # vLLM's default form, already our integers: no call per hash
    return [engine_hash(h) for h in value]


def _token_ids(value: Any) -> list[int]:
    """Token ids, checked in C (this runs on the ingestion thread for every token of every stored block, with
    the GIL the request path needs): exact ints (not bools) that fit 32 bits unsigned."""
    if isinstance(value, list) and _INTS.issuperset(map(type, value)):
        try:
            array("I", value)
            return value
        except OverflowError:
            pass
    raise BadEvent("wrong-type", "token_ids is not a list of token ids")


def _opt_str(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise BadEvent("wrong-type", f"{name} is {type(value).__name__}")


def _medium(value: Any) -> str:
    m = _opt_str(value, "medium")
    return m.lower() if m else "gpu"


def _fields(event: Any, names: tuple[str, ...], only_names: bool = False) -> dict[str, Any]:
    if isinstance(event, dict):
        return {k: event[k] for k in names if k in event} if only_names else event
    return dict(zip(names, event[1:], strict=False))


def decode_event(event: Any, engine: str = "vllm") -> Event | None:
    """One event; None for events that carry nothing for a prefix index (other attention kinds)."""
    if isinstance(event, list) and event:
        tag = event[0]
    elif isinstance(event, dict):
        tag = event.get("type")
    else:
        raise BadEvent("wrong-type", f"event is {type(event).__name__}")
    sglang = engine == "sglang"
    if tag == "BlockStored":
        if sglang and isinstance(event, list) and len(event) < 7:
            raise BadEvent("wrong-type", f"SGLang BlockStored has {len(event)} fields, not at least 7")
        f = _fields(event, _SGLANG_STORED_FIELDS if sglang else _STORED_FIELDS, sglang)
        kind = f.get("kv_cache_spec_kind")
        if kind is not None and kind not in _PREFIX_KINDS:
            return None
        tokens = _token_ids(f.get("token_ids"))
        size = f.get("block_size")
        if type(size) is not int or size <= 0:
            raise BadEvent("wrong-type", "block_size is not a positive integer")
        parent = f.get("parent_block_hash")
        lora = _opt_str(f.get("lora_name"), "lora_name")
        lora_id = f.get("lora_id")
        if lora is None and type(lora_id) is int and lora_id > 0:
            lora = f"lora-id:{lora_id}"  # no name: never matches a request, but never a base-model block either
        return BlockStored(_hash_list(f.get("block_hashes")), None if parent is None else engine_hash(parent),
                           tokens, size, lora, _medium(f.get("medium")), _salt(f.get("extra_keys"), lora))
    if tag == "BlockRemoved":
        if sglang and isinstance(event, list) and len(event) < 3:
            raise BadEvent("wrong-type", f"SGLang BlockRemoved has {len(event)} fields, not at least 3")
        f = _fields(event, _SGLANG_REMOVED_FIELDS if sglang else _REMOVED_FIELDS, sglang)
        return BlockRemoved(_hash_list(f.get("block_hashes")), _medium(f.get("medium")))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise BadEvent("unknown-tag", repr(tag)[:40])


def _salt(extra: Any, lora: str | None) -> str | None:
    """vLLM's block-0 extra keys are ``(lora_name?, mm..., cache_salt?)``: the salt is the last string that
    is not the LoRA name."""
    if not isinstance(extra, list) or not extra or not isinstance(extra[0], list):
        return None
    for key in reversed(extra[0]):
        if isinstance(key, str) and key != lora:
            return key
    return None


def decode_batch(payload: bytes, engine: str = "vllm") -> tuple[list[Event], list[BadEvent]]:
    """The events of one message payload and the rejects among them; raises BadEvent when the payload as a
    whole is unusable."""
    if len(payload) > MAX_PAYLOAD:
        raise BadEvent("too-large")
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # truncated, extra data, invalid utf-8, ...
        raise BadEvent("malformed", type(e).__name__) from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise BadEvent("wrong-type", "batch is not [ts, events, ...]")
    if engine == "sglang" and len(batch) < 3:
        raise BadEvent("wrong-type", "SGLang batch is not [ts, events, data_parallel_rank]")
    events: list[Event] = []
    rejects: list[BadEvent] = []
    for raw in batch[1]:
        try:
            ev = decode_event(raw, engine)
        except BadEvent as e:
            rejects.append(e)
            continue
        if ev is not None:
            events.append(ev)
    return events, rejects


def parse_topic(topic: bytes) -> tuple[str, str] | None:
    """``kv@<pod>@<model>`` -> (pod, model); None for any other topic (vLLM's default is empty)."""
    parts = topic.decode("utf-8", "replace").split("@")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "kv" else None
