"""vLLM KV-event wire format -> plain event records (pure; no sockets, no index).

Owns the adapter step of the events path: a ZMQ message of three frames
``[topic, seq (8-byte big-endian unsigned), payload (msgpack)]`` becomes a ``Message``
holding an ``EventBatch`` of ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``.

Decoded defensively, because the format has changed under other routers' feet:
- the envelope is a msgpack array ``[ts, events, dp_rank]`` or ``[ts, events]`` (older
  vLLM), or a map ``{"ts", "events", "data_parallel_rank"}``;
- an event is a map tagged by ``"type"`` (vLLM since mid-2026, fields equal to their
  default left out) or a positional array ``["BlockStored", field1, ...]`` whose length
  grows with the version; unknown fields and trailing positions are ignored;
- a block hash is an unsigned 64-bit int (may exceed 2**63) or the digest as bytes; both
  are kept as opaque hashable ids (the router never reproduces the engine's hash).

Anything else raises ``DecodeError`` and nothing but it: the subscriber counts the
message and skips it. Event types we do not know become ``UnknownEvent`` (ignored, not
an error: a new event type must not stop decoding of the ones we know).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta

EngineHash = int | bytes
"""An engine's block hash as sent: opaque, used only as a dict key."""

END_SEQ = 2**64 - 1
"""Replay end marker: seq -1 as 8 bytes 0xFF, read unsigned."""

_decoder = msgspec.msgpack.Decoder()


class DecodeError(ValueError):
    """A KV-event message or payload that does not match the wire format."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[EngineHash, ...]
    parent_block_hash: EngineHash | None
    token_ids: Sequence[int]
    """uint32 ids, exactly ``len(block_hashes) * block_size`` of them."""
    block_size: int
    medium: str | None = None
    lora_name: str | None = None
    salt: str | None = None
    """The ``cache_salt`` found in block 0's extra keys (None if absent)."""
    lora_id: int | None = None
    """Deprecated by vLLM for ``lora_name``; set alone (old versions), the adapter is unnamed."""
    group_idx: int | None = None
    """KV-cache group of a hybrid model (None: the only one)."""
    kind: str | None = None
    """``kv_cache_spec_kind`` of that group: "full_attention", "sliding_window", ... (None: not said)."""


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[EngineHash, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    type: str


Event = BlockStored | BlockRemoved | AllBlocksCleared | UnknownEvent


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[Event, ...]
    dp_rank: int | None = None


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    seq: int
    batch: EventBatch


def decode_seq(frame: bytes) -> int:
    if not isinstance(frame, bytes | bytearray | memoryview) or len(frame) != 8:
        raise DecodeError("sequence frame must be 8 bytes")
    return int.from_bytes(frame, "big", signed=False)


def decode_message(frames: Sequence[bytes]) -> Message:
    """A live message: ``[topic, seq, payload]``."""
    if len(frames) != 3:
        raise DecodeError(f"expected 3 frames, got {len(frames)}")
    topic_b, seq_b, payload = frames
    try:
        topic = bytes(topic_b).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("topic is not utf-8") from exc
    return Message(topic, decode_seq(seq_b), decode_payload(payload))


def decode_payload(payload: bytes) -> EventBatch:
    try:
        return _fast(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, DecodeError):
        # not the current vLLM layout: take the defensive path, which also names the fault
        return decode_payload_defensively(payload)


def decode_payload_defensively(payload: bytes) -> EventBatch:
    """Every layout any vLLM version sent, field by field (slower than the typed fast path)."""
    try:
        raw = _decoder.decode(payload)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise DecodeError(f"payload is not msgpack: {exc}") from exc
    if isinstance(raw, list):
        if len(raw) < 2:
            raise DecodeError("envelope array needs at least [ts, events]")
        ts, events = raw[0], raw[1]
        dp = raw[2] if len(raw) > 2 else None
    elif isinstance(raw, dict):
        ts, events, dp = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    else:
        raise DecodeError(f"envelope must be an array or map, not {type(raw).__name__}")
    if not _is_number(ts):
        raise DecodeError("envelope ts must be a number")
    if not isinstance(events, list):
        raise DecodeError("envelope events must be an array")
    if dp is not None and not _is_int(dp):
        dp = None  # informational only: a bad rank is not worth dropping the batch
    return EventBatch(float(ts), tuple(_event(e) for e in events), dp)


# Positional field order of older vLLM (array_like structs): the tag, then fields in
# declaration order. Later versions only append, so any length >= the first ones works.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                  "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")


def _event(raw: Any) -> Event:
    if isinstance(raw, dict):
        kind = raw.get("type")
        fields = raw
    elif isinstance(raw, list) and raw:
        kind = raw[0]
        names = _STORED_FIELDS if kind == "BlockStored" else _REMOVED_FIELDS
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise DecodeError("event must be a tagged map or a non-empty array")
    if not isinstance(kind, str):
        raise DecodeError("event type must be a string")
    if kind == "BlockStored":
        return _stored(fields)
    if kind == "BlockRemoved":
        return BlockRemoved(_hashes(fields.get("block_hashes")), _medium(fields.get("medium")),
                            _opt_int(fields.get("group_idx")))
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    return UnknownEvent(kind[:64])


def _stored(f: dict[str, Any]) -> BlockStored:
    hashes = _hashes(f.get("block_hashes"))
    parent = f.get("parent_block_hash")
    if parent is not None:
        parent = _hash(parent)
    size = f.get("block_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise DecodeError("BlockStored.block_size must be a positive int")
    raw_tokens = f.get("token_ids")
    if not isinstance(raw_tokens, list):
        raise DecodeError("BlockStored.token_ids must be an array")
    try:  # one C-level pass checks every id is a uint32 (and is what chain_keys hashes)
        tokens = array("I", raw_tokens)
    except (TypeError, OverflowError, ValueError) as exc:
        raise DecodeError("BlockStored.token_ids must be uint32 ids") from exc
    if len(tokens) != len(hashes) * size:
        raise DecodeError(f"BlockStored has {len(tokens)} token ids for {len(hashes)} blocks of {size}")
    lora = f.get("lora_name")
    if lora is not None and not isinstance(lora, str):
        raise DecodeError("BlockStored.lora_name must be a string")
    lora_id = f.get("lora_id")
    if not (lora_id is None or (isinstance(lora_id, int) and not isinstance(lora_id, bool))):
        lora_id = None  # informational only (the name is what keys use)
    kind = f.get("kv_cache_spec_kind")
    return BlockStored(hashes, parent, tokens, size, _medium(f.get("medium")), lora,
                       _salt(f.get("extra_keys"), lora), lora_id, _opt_int(f.get("group_idx")),
                       kind if isinstance(kind, str) else None)


def _salt(extra: Any, lora: str | None) -> str | None:
    """The cache salt from block 0's extra keys.

    vLLM puts, per block, multimodal ids, the LoRA name and (block 0 only) the cache salt, in
    that order; the salt is therefore the last string on block 0 that is not the LoRA name.
    """
    if not isinstance(extra, list) or not extra:
        return None
    first = extra[0]
    if isinstance(first, str):
        return first if first != lora else None
    if not isinstance(first, list):
        return None
    strings = [x for x in first if isinstance(x, str) and x != lora]
    return strings[-1] if strings else None


def _hashes(raw: Any) -> tuple[EngineHash, ...]:
    if not isinstance(raw, list):
        raise DecodeError("block_hashes must be an array")
    return tuple(_hash(h) for h in raw)


def _hash(h: Any) -> EngineHash:
    if _is_int(h):
        if h < 0:
            return int(h) + 2**64  # a signed encoder's view of the same 64 bits
        return int(h)
    if isinstance(h, bytes):
        return h
    raise DecodeError(f"block hash must be an int or bytes, not {type(h).__name__}")


def _medium(m: Any) -> str | None:
    if m is None or isinstance(m, str):
        return m
    raise DecodeError("medium must be a string")


def _opt_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# ---- fast path: vLLM 0.32's exact layout, validated in C by msgspec ------------------------------
# Array envelope, map-tagged events, non-negative int or bytes hashes. Anything else (positional
# events, map envelopes, new event types, signed hashes) fails validation here and is decoded by
# the defensive path above; the two agree on every input (tests/unit/test_events_decode.py).

_U32 = Annotated[int, Meta(ge=0, lt=2**32)]
_WireHash = Annotated[int, Meta(ge=0)] | bytes


class _WStored(msgspec.Struct, tag="BlockStored", tag_field="type", gc=False):
    block_hashes: list[_WireHash]
    token_ids: list[_U32]
    block_size: Annotated[int, Meta(gt=0)]
    parent_block_hash: _WireHash | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    lora_id: int | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class _WRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type", gc=False):
    block_hashes: list[_WireHash]
    medium: str | None = None
    group_idx: int | None = None


class _WCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type", gc=False):
    pass


class _WBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_WStored | _WRemoved | _WCleared]
    data_parallel_rank: int | None = None


_fast_decoder = msgspec.msgpack.Decoder(_WBatch)


def _fast(payload: bytes) -> EventBatch:
    wire = _fast_decoder.decode(payload)
    events: list[Event] = []
    for ev in wire.events:
        if type(ev) is _WStored:
            if len(ev.token_ids) != len(ev.block_hashes) * ev.block_size:
                raise DecodeError("token count")
            events.append(BlockStored(tuple(ev.block_hashes), ev.parent_block_hash, ev.token_ids, ev.block_size,
                                      ev.medium, ev.lora_name, _salt(ev.extra_keys, ev.lora_name), ev.lora_id,
                                      ev.group_idx, ev.kv_cache_spec_kind))
        elif type(ev) is _WRemoved:
            events.append(BlockRemoved(tuple(ev.block_hashes), ev.medium, ev.group_idx))
        else:
            events.append(AllBlocksCleared())
    return EventBatch(wire.ts, tuple(events), wire.data_parallel_rank)
