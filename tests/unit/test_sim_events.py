"""KV-event encoding of the simulated engine, decoded with plain msgpack as any subscriber would."""

from __future__ import annotations

import msgspec

from loadtest.engine.cache import Cleared, Removed, Stored, as_int, chain_digests
from loadtest.engine.engine import SIM_MODEL_DIR, Engine, EngineConfig, Vocabulary
from loadtest.engine.events import Encoder
from loadtest.engine.timing import TimingConfig

D = chain_digests(list(range(8)), 4, salt="s")


def decode(payload: bytes) -> list[object]:
    batch = msgspec.msgpack.decode(payload)
    assert isinstance(batch, list) and len(batch) == 3
    ts, events, dp_rank = batch
    assert isinstance(ts, float) and dp_rank == 0
    assert isinstance(events, list)
    return events


def test_map_events_with_int_hashes_omit_defaults() -> None:
    enc = Encoder(4)
    stored, removed, cleared = decode(
        enc.batch([Stored(D, None, list(range(8)), None, "s"), Removed(D[1]), Cleared()])
    )
    assert stored == {
        "type": "BlockStored",
        "block_hashes": [as_int(D[0]), as_int(D[1])],
        "parent_block_hash": None,
        "token_ids": list(range(8)),
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "extra_keys": [["s"], None],
    }
    assert all(0 <= h < 2**64 for h in stored["block_hashes"])  # type: ignore[index]
    assert removed == {"type": "BlockRemoved", "block_hashes": [as_int(D[1])], "medium": "GPU"}
    assert cleared == {"type": "AllBlocksCleared"}


def test_lora_name_and_parent_are_carried() -> None:
    (stored,) = decode(Encoder(4).batch([Stored([D[1]], D[0], [4, 5, 6, 7], "ad1", None)]))
    assert isinstance(stored, dict)
    assert stored["lora_name"] == "ad1" and stored["parent_block_hash"] == as_int(D[0])
    assert stored["extra_keys"] == [["ad1"]]  # vLLM hashes the LoRA name into every block


def test_lora_and_salt_on_block_zero_in_vllm_order() -> None:
    (stored,) = decode(Encoder(4).batch([Stored(D, None, list(range(8)), "ad1", "s")]))
    assert isinstance(stored, dict)
    assert stored["extra_keys"] == [["ad1", "s"], ["ad1"]]


def test_positional_events_with_bytes_hashes() -> None:
    enc = Encoder(4, int_hashes=False, positional=True)
    stored, removed, cleared = decode(
        enc.batch([Stored(D, None, list(range(8)), None, None), Removed(D[0]), Cleared()])
    )
    # msgspec writes every field of an array-like struct (omit_defaults applies to maps only), as vLLM did
    assert stored == ["BlockStored", D, None, list(range(8)), 4, None, "GPU", None, [None, None]]
    assert removed == ["BlockRemoved", [D[0]], "GPU"]
    assert cleared == ["AllBlocksCleared"]
    assert int.from_bytes(D[0][-8:], "big") == as_int(D[0])  # the bytes form's last 8 bytes are the int form


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[object]] = []
        self.encoder = Encoder(4)
        self.seq = 0

    def publish(self, events: list[object]) -> None:
        self.batches.append([type(e).__name__ for e in events])

    def restart(self) -> None:
        self.batches.append(["<restart>"])


async def test_reset_sends_cleared_with_the_next_step_and_restart_empties() -> None:
    sink = Sink()
    engine = Engine(
        EngineConfig(block_size=4, cache_blocks=32, timing=TimingConfig(zero=True)),
        Vocabulary(SIM_MODEL_DIR),
        sink,  # type: ignore[arg-type]
    )
    run = engine.start(list(range(9)), 2)
    await run.prefill()
    await run.next_token()
    run.close(True)
    assert sink.batches == [["Stored"]]
    assert engine.reset_prefix_cache()
    assert sink.batches == [["Stored"]]  # nothing at reset time
    run = engine.start(list(range(9)), 1)
    assert await run.prefill() == 0
    run.close(True)
    assert sink.batches[1] == ["Cleared", "Stored"]
    assert engine.stats.requests_ok == 2
    engine.restart()
    assert len(engine.cache) == 0 and engine.stats.requests == 0
    assert sink.batches[-1] == ["<restart>"]
