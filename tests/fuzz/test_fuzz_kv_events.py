"""The KV-event decoder on arbitrary bytes and arbitrary msgpack values: it returns events or raises BadEvent,
never anything else, and whatever it returns can be applied to the index."""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from epp_plugins.scorers.precise.events import BadEvent, decode_batch
from epp_plugins.scorers.precise.index import BlockIndex, BlockKeys

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                  st.text(max_size=12), st.binary(max_size=40),
                  st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type", "GPU"]))
_values = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=8),
                                                      st.dictionaries(st.one_of(st.text(max_size=10), st.sampled_from(
                                                          ["type", "block_hashes", "token_ids", "block_size",
                                                           "parent_block_hash", "lora_name", "medium"])),
                                                          inner, max_size=6)), max_leaves=40)
_event = st.one_of(
    st.tuples(st.just("BlockStored"), st.lists(st.one_of(st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=32)),
                                               max_size=4),
              st.one_of(st.none(), st.integers(0, 2**64 - 1)), st.lists(st.integers(0, 2**32 - 1), max_size=64),
              st.sampled_from([1, 4, 16, 32])).map(list),
    st.tuples(st.just("BlockRemoved"), st.lists(st.integers(0, 2**64 - 1), max_size=4)).map(list),
    st.just(["AllBlocksCleared"]),
    _values)


def _check(payload: bytes) -> None:
    index = BlockIndex(BlockKeys(16))
    try:
        events, rejects = decode_batch(payload)
    except BadEvent as e:
        assert e.reason
        return
    assert all(isinstance(r, BadEvent) for r in rejects)
    index.apply(index.slot("e"), events)
    index.match([1, 2, 3], {index.slot("e"): "e"})


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(payload: bytes) -> None:
    _check(payload)


@settings(max_examples=400, deadline=None)
@given(st.floats(), st.lists(_event, max_size=6), st.integers(0, 3))
def test_arbitrary_batches(ts: float, events: list, rank: int) -> None:
    payload = msgpack.packb([ts, events, rank], use_bin_type=True)
    _check(payload)
    for cut in (1, len(payload) // 2, len(payload) - 1):  # truncated
        _check(payload[:cut])
