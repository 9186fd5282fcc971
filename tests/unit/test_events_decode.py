"""The pure KV-event decoder: every encoding of the spec decodes, and garbage raises only DecodeError."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.events.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    EventBatch,
    UnknownEvent,
    decode_message,
    decode_payload,
    decode_payload_defensively,
)

u64 = st.integers(min_value=0, max_value=2**64 - 1)
hashes = st.one_of(u64, st.binary(min_size=32, max_size=32))
media = st.sampled_from([None, "GPU", "CPU", "disk"])
names = st.one_of(st.none(), st.text(min_size=1, max_size=12))
json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(),
              st.text(max_size=8), st.binary(max_size=8)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def stored(draw: Any) -> tuple[Any, Any, BlockStored]:
    """(map encoding, positional encoding, expected record)."""
    bs = draw(st.integers(min_value=1, max_value=8))
    hs = draw(st.lists(hashes, min_size=0, max_size=4))
    toks = draw(st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=len(hs) * bs,
                         max_size=len(hs) * bs))
    parent = draw(st.one_of(st.none(), hashes))
    medium, lora = draw(media), draw(names)
    salt = draw(st.one_of(st.none(), st.text(min_size=1, max_size=8).filter(lambda s: s != lora)))
    extra = None
    if hs and (salt is not None or lora is not None):
        block0 = [x for x in (lora, salt) if x is not None]
        extra = [block0] + [[lora] if lora else None for _ in hs[1:]]
    as_map = {"type": "BlockStored", "block_hashes": hs, "parent_block_hash": parent, "token_ids": toks,
              "block_size": bs, "lora_id": None, "medium": medium, "lora_name": lora,
              "future_field": draw(json_like)}
    if extra is not None:
        as_map["extra_keys"] = extra
    length = draw(st.integers(min_value=7, max_value=11))  # any version's length
    positional = ["BlockStored", hs, parent, toks, bs, None, medium, lora, extra, 0, "full_attention"][:length]
    if length < 8:
        lora_seen, salt_seen = None, None  # fields the older version did not have
    else:
        lora_seen, salt_seen = lora, (salt if length >= 9 and extra is not None else None)
    expected_map = BlockStored(tuple(hs), parent, toks, bs, medium, lora, salt if extra is not None else None)
    expected_pos = BlockStored(tuple(hs), parent, toks, bs, medium, lora_seen, salt_seen)
    return as_map, positional, (expected_map, expected_pos)


def same(a: BlockStored, b: BlockStored) -> bool:
    return (a.block_hashes, a.parent_block_hash, list(a.token_ids), a.block_size, a.medium, a.lora_name,
            a.salt) == (b.block_hashes, b.parent_block_hash, list(b.token_ids), b.block_size, b.medium,
                        b.lora_name, b.salt)


@given(stored(), st.floats(min_value=0, max_value=2e9), st.sampled_from(["array3", "array2", "map"]))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_encoding_of_block_stored_decodes(ev: Any, ts: float, envelope: str) -> None:
    as_map, positional, (expected_map, expected_pos) = ev
    events = [as_map, positional]
    if envelope == "array3":
        payload = msgspec.msgpack.encode([ts, events, 0])
    elif envelope == "array2":
        payload = msgspec.msgpack.encode([ts, events])
    else:
        payload = msgspec.msgpack.encode({"ts": ts, "events": events, "data_parallel_rank": 1})
    batch = decode_payload(payload)
    assert batch.ts == ts
    got_map, got_pos = batch.events
    fast_only = decode_payload(msgspec.msgpack.encode([ts, [as_map], 0])).events[0]
    defensive = decode_payload_defensively(msgspec.msgpack.encode([ts, [as_map], 0])).events[0]
    assert isinstance(fast_only, BlockStored) and isinstance(defensive, BlockStored)
    assert same(fast_only, defensive)  # the typed fast path and the defensive path agree
    assert isinstance(got_map, BlockStored) and isinstance(got_pos, BlockStored)
    assert same(got_map, expected_map)
    assert same(got_pos, expected_pos)


@given(st.lists(hashes, max_size=5), media)
@settings(deadline=None)
def test_removed_and_cleared_both_encodings(hs: list[Any], medium: str | None) -> None:
    payload = msgspec.msgpack.encode([1.5, [
        {"type": "BlockRemoved", "block_hashes": hs, "medium": medium, "group_idx": 0},
        ["BlockRemoved", hs, medium],
        {"type": "AllBlocksCleared"}, ["AllBlocksCleared"],
        {"type": "SomethingNew", "x": 1},
    ], 0])
    batch = decode_payload(payload)
    assert batch.events == (BlockRemoved(tuple(hs), medium, 0), BlockRemoved(tuple(hs), medium),
                            AllBlocksCleared(), AllBlocksCleared(), UnknownEvent("SomethingNew"))


def test_hashes_above_2_63_and_signed_view_are_the_same_id() -> None:
    big = 2**64 - 5
    payload = msgspec.msgpack.encode([0.0, [["BlockRemoved", [big, -5], None]]])
    (ev,) = decode_payload(payload).events
    assert isinstance(ev, BlockRemoved) and ev.block_hashes == (big, big)


@given(st.binary(max_size=200))
@settings(max_examples=250, deadline=None)
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        assert isinstance(decode_payload(data), EventBatch)
    except DecodeError:
        pass


@given(json_like)
@settings(max_examples=250, deadline=None)
def test_random_msgpack_raises_only_decode_error(value: Any) -> None:
    for decode in (decode_payload, decode_payload_defensively):
        try:
            decode(msgspec.msgpack.encode(value))
        except DecodeError:
            pass


@given(st.lists(st.one_of(json_like, st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared"])),
                max_size=9), st.sampled_from(["BlockStored", "BlockRemoved"]))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mangled_events_raise_only_decode_error(fields: list[Any], kind: str) -> None:
    for event in ([kind, *fields], {"type": kind, **{str(i): f for i, f in enumerate(fields)}}):
        try:
            decode_payload(msgspec.msgpack.encode([0.0, [event], 0]))
        except DecodeError:
            pass


@given(st.lists(st.binary(max_size=12), max_size=5))
@settings(deadline=None)
def test_random_frames_raise_only_decode_error(frames: list[bytes]) -> None:
    try:
        decode_message(frames)
    except DecodeError:
        pass


@pytest.mark.parametrize("payload", [
    [0.0, [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [1, 2, 3],
             "block_size": 2}]],  # token count != blocks * block size
    [0.0, [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [-1, 2],
             "block_size": 2}]],  # not a uint32
    [0.0, [{"type": "BlockStored", "block_hashes": [1.5], "parent_block_hash": None, "token_ids": [1, 2],
             "block_size": 2}]],  # hash of the wrong type
    [0.0, [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [1, 2],
             "block_size": 0}]],
    ["soon", []], [0.0], 7, [0.0, {}],
])
def test_malformed_payloads_are_typed_errors(payload: Any) -> None:
    with pytest.raises(DecodeError):
        decode_payload(msgspec.msgpack.encode(payload))


def test_seq_frame_is_unsigned_big_endian() -> None:
    msg = decode_message([b"kv", b"\xff" * 7 + b"\xfe", msgspec.msgpack.encode([0.0, []])])
    assert msg.seq == 2**64 - 2 and msg.topic == "kv"
