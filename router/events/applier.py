"""The ordered applier of one replica's KV events: decoded batches -> index writes.

Owns, per replica: the sequence number (gaps, duplicates, restarts), the map from the
engine's opaque block hash to the router's key (so BlockRemoved can be applied and a
BlockStored's parent placed in the chain), the block-size check, and the replica's
``precise`` flag. It refuses to own sockets (``subscriber``) or wire decoding (``decode``).

Router keys are computed from each BlockStored's ``token_ids`` with the same
``chain_keys`` the request path uses, chained from the parent's *router* key (or from
``first_link_seed(lora_name or base_model, salt)`` when the parent is None), so the
two agree by construction; the engine hash is never reproduced.

What happens when knowledge is lost (each path has a test in tests/integration/test_events_zmq.py):
- gap (seq jumps): replay the missing batches from the engine's replay socket; if that
  is unavailable or the engine's buffer no longer holds them, clear the replica and mark
  it cold (``precise`` False, so the gateway records route-time entries with the long
  TTL and re-learns from traffic) until the next batch arrives;
- first batch with seq > 0 (router started after the engine), or a BlockStored whose
  parent we never saw: clear, replay from 0 (everything the engine still buffers); what
  the replay cannot give is missing from the index (an under-count: missed hits, never
  stale ones);
- seq goes backwards with a newer timestamp: the engine restarted: clear, tell the fleet;
  seq goes backwards with an older-or-equal timestamp: a duplicate after a replay, dropped;
- AllBlocksCleared: clear; block size differs from the configured one: loud (error log
  once, metric), the replica drops to approximate mode, its event entries are cleared.

A malformed message is counted and skipped by the caller; a skipped BlockStored later
shows up as an unknown parent (resync), a skipped BlockRemoved as a stale hit that the
gateway's stale-hit correction removes.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from router import metrics
from router.events.blockmap import BlockMap
from router.events.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    EventBatch,
    Message,
    decode_payload,
)
from router.fleet.backend import Backend
from router.hashing.keys import chain_keys, first_link_seed
from router.index.base import BlockIndex
from router.types import BackendId, BlockKey

log = logging.getLogger(__name__)

ReplayFn = Callable[[int], Awaitable[list[tuple[int, bytes]] | None]]
"""Fetch buffered batches with seq >= start from the engine: [(seq, payload)], or None on failure."""

RESYNC_COOLDOWN_S = 30.0
"""At most one full resync (clear + replay from 0) per this long: a lineage rooted before the
engine's replay buffer would otherwise trigger one per event."""
LOST_WRITES_RETRY_S = 1.0
"""While the index is unreachable, one rebuild attempt per second, not one per batch (each replays
up to the engine's whole buffer)."""
_OWN_REPORT_WINDOW_S = 5.0  # the fleet's echo of a restart we reported arrives within milliseconds
DEFAULT_MAP_BLOCKS = 1 << 18
"""Engine-hash map bound when the replica's capacity is unknown (~40 MB); with a known
capacity, 2x it (GPU plus another tier)."""


@dataclass
class ApplierState:
    expected: int | None = None  # next seq; None: nothing applied from this engine process yet
    last_ts: float = float("-inf")
    last_batch_ts: float | None = None  # ts of the batch at seq expected - 1 (continuity check on gaps)
    disabled: str | None = None  # "block_size" or a self-check refusal: events ignored
    last_event_at: float | None = None  # monotonic time of the last applied batch
    last_resync_at: float = float("-inf")
    cold: bool = False
    need_resync: bool = False
    lost_writes: bool = False  # index writes failed: rebuild (clear + replay) once the index answers
    warned: set[str] = field(default_factory=set)


class ReplicaApplier:
    def __init__(
        self,
        backend: Backend,
        index: BlockIndex,
        *,
        block_size: Callable[[], int],
        replay: ReplayFn | None = None,
        record_cpu_blocks: bool = False,
        fleet: Any = None,
        map_blocks: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.id: BackendId = backend.id
        self.index = index
        self._block_size = block_size
        self._replay = replay
        self._fleet = fleet
        cap = backend.capacity_blocks
        self._blocks = BlockMap(map_blocks or (2 * cap if cap else DEFAULT_MAP_BLOCKS),
                                record_cpu_blocks=record_cpu_blocks)
        self._clock = clock
        self._wall = wall
        self.state = ApplierState()
        self._reported_restart_at = float("-inf")
        self._group: int | None = None  # the KV-cache group followed (hybrid models), once seen
        # labelled children resolved once: .labels() costs more than applying a small event
        self._m_events = {t: metrics.KV_EVENTS.labels(self.id, t)
                          for t in ("BlockStored", "BlockRemoved", "AllBlocksCleared", "unknown")}
        self._m_precise = metrics.PRECISE_MODE.labels(self.id)
        self._set_precise(False)
        self.observers: list[Callable[[BlockStored, list[BlockKey]], None]] = []
        """Called with each applied BlockStored and its router keys (the start-up self-check listens)."""

    # ---- entry points (called in order by one worker task per replica) ----------------------

    async def apply(self, msg: Message) -> None:
        st = self.state
        seq = msg.seq
        if st.disabled is not None and st.disabled != "block_size":
            return  # refused by the self-check: this replica's events are not used
        if st.expected is not None and seq < st.expected:
            if msg.batch.ts <= st.last_ts:
                return  # a batch we already applied (live copy of a replayed one)
            await self._restarted(f"sequence went back from {st.expected - 1} to {seq}")
        if st.expected is None:
            if st.lost_writes:
                if self._clock() - st.last_resync_at < LOST_WRITES_RETRY_S:
                    return  # the index is away: drop; the resync after it comes back replays this batch
                await self._resync(upto=seq, reason="index writes were lost")
                st.lost_writes = False
            elif seq != 0:
                await self._resync(upto=seq, reason=f"first batch seen has seq {seq}")
        elif seq > st.expected:
            metrics.KV_GAPS.labels(self.id).inc()
            await self._fill_gap(st.expected, seq)
        else:
            st.cold = False
        lag = self._wall() - msg.batch.ts
        metrics.KV_EVENT_LAG.observe(max(lag, 0.0))
        await self._apply_batch(msg.batch, seq)
        if st.need_resync:  # a BlockStored had an unknown parent: rebuild, this batch included
            st.need_resync = False
            await self._resync(upto=seq + 1, reason="BlockStored with an unknown parent")

    async def bootstrap(self) -> None:
        """Before the first live batch: learn what the engine holds from its replay buffer.

        An engine that never published (empty buffer) holds nothing: precise at once. One whose
        buffer reaches back to seq 0 is rebuilt exactly. Otherwise (no replay socket, no answer,
        buffer truncated) the first live batch decides, as in ``apply``.
        """
        if self._replay is None or self.state.expected is not None or self.state.disabled is not None:
            return
        batches = await self._replay(0)
        if batches is None:
            return
        if not batches:
            self.state.expected = 0
            self._set_precise(True)
            return
        if batches[0][0] != 0:
            return  # truncated: the first live batch's resync clears and replays what is there
        await self._clear()
        await self._replay_range(0, batches[-1][0] + 1, need_start=True)

    async def on_fleet_restart(self) -> None:
        """The fleet saw the engine restart by other means (metrics counters went back)."""
        if self._clock() - self._reported_restart_at < _OWN_REPORT_WINDOW_S:
            return  # the fleet is echoing the restart we reported: already handled
        log.info("kv events: fleet reports %s restarted: clearing its entries", self.id)
        await self._forget_engine()

    async def _forget_engine(self) -> None:
        await self._clear()
        self.state.expected = None
        self.state.last_ts = float("-inf")
        self.state.last_batch_ts = None

    def silenced(self) -> None:
        """The watchdog saw no events while the engine served: not precise until the next batch."""
        self.state.cold = True
        self._set_precise(False)

    def lost_writes(self) -> None:
        """Index writes failed midway: forget the engine's state; the next batch resyncs from replay."""
        self._blocks.clear()
        self.state.expected = None
        self.state.cold = True
        self.state.lost_writes = True
        self._set_precise(False)

    def disable(self, reason: str) -> None:
        """Refuse precise mode for this replica (self-check failed): events are ignored from now."""
        self.state.disabled = reason
        self._set_precise(False)

    async def stop(self) -> None:
        self._set_precise(False)

    @property
    def tracked_blocks(self) -> int:
        return len(self._blocks)

    # ---- sequence handling -----------------------------------------------------------------

    async def _fill_gap(self, start: int, stop: int) -> None:
        log.warning("kv events: gap on %s: expected seq %d, got %d; replaying", self.id, start, stop)
        # Fetch from the last batch we applied too: if the engine's copy of it differs, the engine
        # restarted while we were not listening and its new sequence already passed ours.
        anchor = start - 1 if start > 0 and self.state.last_batch_ts is not None else start
        batches = await self._fetch(anchor)
        if batches is not None and anchor < start and batches and batches[0][0] == anchor \
                and _batch_ts(batches[0][1]) != self.state.last_batch_ts:
            await self._restarted(f"replay holds another engine process's batch {anchor}")
            await self._resync(upto=stop, reason="engine restarted during a gap")
            return
        if batches is not None and await self._apply_replayed(batches, start, stop, need_start=True):
            return
        log.warning("kv events: replay failed for %s: clearing its entries, cold until new events", self.id)
        await self._clear()
        self.state.cold = True
        self._set_precise(False)

    async def _resync(self, upto: int, reason: str) -> None:
        """Forget this replica, then rebuild from what the engine still buffers (seq 0 .. upto-1)."""
        st = self.state
        log.info("kv events: resync of %s (%s)", self.id, reason)
        st.last_resync_at = self._clock()
        await self._clear()
        if await self._replay_range(0, upto, need_start=False):
            st.cold = False  # rebuilt from seq 0: exact again
        else:
            st.cold = True
            self._set_precise(False)

    async def _fetch(self, start: int) -> list[tuple[int, bytes]] | None:
        if self._replay is None:
            metrics.KV_REPLAYS.labels(self.id, "unavailable").inc()
            return None
        batches = await self._replay(start)
        if batches is None:
            metrics.KV_REPLAYS.labels(self.id, "failed").inc()
        return batches

    async def _replay_range(self, start: int, stop: int, *, need_start: bool) -> bool:
        """Apply buffered batches with start <= seq < stop; True if none was missing."""
        batches = await self._fetch(start)
        return batches is not None and await self._apply_replayed(batches, start, stop, need_start=need_start)

    async def _apply_replayed(self, batches: list[tuple[int, bytes]], start: int, stop: int, *,
                              need_start: bool) -> bool:
        wanted = [(s, p) for s, p in batches if start <= s < stop]
        complete = [s for s, _ in wanted] == list(range(start, stop))
        if need_start and not complete:
            metrics.KV_REPLAYS.labels(self.id, "failed").inc()
            return False
        for s, payload in wanted:
            try:
                batch = decode_payload(payload)
            except DecodeError:
                metrics.KV_DECODE_ERRORS.labels(self.id).inc()
                continue
            await self._apply_batch(batch, s)
        metrics.KV_REPLAYS.labels(self.id, "ok" if complete else "partial").inc()
        return complete

    async def _restarted(self, why: str) -> None:
        log.warning("kv events: %s restarted (%s): clearing its entries", self.id, why)
        await self._forget_engine()
        self._reported_restart_at = self._clock()
        mark = getattr(self._fleet, "mark_restarted", None)
        if mark is None:
            metrics.BACKEND_RESTARTS.labels(self.id).inc()
            self.backend.generation += 1
            return
        try:
            result = mark(self.id)
            if inspect.isawaitable(result):
                await result
        except Exception:  # the fleet's bookkeeping must not stop event ingestion
            log.exception("kv events: fleet.mark_restarted(%s) failed", self.id)

    # ---- applying --------------------------------------------------------------------------

    async def _apply_batch(self, batch: EventBatch, seq: int) -> None:
        st = self.state
        for event in batch.events:
            if st.disabled is not None and st.disabled != "block_size":
                break
            if isinstance(event, BlockStored):
                await self._stored(event, seq)
                self._m_events["BlockStored"].inc()
            elif isinstance(event, BlockRemoved):
                await self._removed(event)
                self._m_events["BlockRemoved"].inc()
            elif isinstance(event, AllBlocksCleared):
                await self._clear()
                self._m_events["AllBlocksCleared"].inc()
            else:
                self._m_events["unknown"].inc()
        st.expected = seq + 1
        st.last_ts = max(st.last_ts, batch.ts)
        st.last_batch_ts = batch.ts
        st.last_event_at = self._clock()
        if st.disabled is None and not st.cold and not self.backend.precise:
            self._set_precise(True)

    async def _stored(self, ev: BlockStored, seq: int) -> None:
        st = self.state
        expected = self._block_size()
        if ev.block_size != expected:
            await self._block_size_mismatch(ev.block_size, expected)
            return
        if st.disabled == "block_size":  # the configured size was corrected since: start over
            log.warning("kv events: block size of %s now matches (%d): precise again", self.id, expected)
            st.disabled = None
            await self._resync(upto=seq, reason="block size corrected")
        if not self._follows_group(ev.group_idx, ev.kind):
            return
        if ev.lora_id is not None and ev.lora_name is None:
            # An adapter's blocks without its name (vLLM before lora_name): keyed as the base
            # model they would match base-model requests, so they are left out (missed hits only).
            self._warn_once("lora_id", "kv events: %s sends LoRA blocks without lora_name (old vLLM): "
                            "those blocks are not indexed", self.id)
            return
        if ev.parent_block_hash is None:
            namespace = ev.lora_name or self._base_model()
            if namespace is None:
                self._warn_once("namespace", "kv events: %s has no known base model yet: skipping blocks", self.id)
                return
            parent_key = first_link_seed(namespace, ev.salt)
        else:
            known = self._blocks.key(ev.parent_block_hash)
            if known is None:
                self._unknown_parent()
                return
            parent_key = known
        keys = chain_keys(ev.token_ids, ev.block_size, parent_key)
        held = self._blocks.store(ev.block_hashes, keys, ev.medium, self._clock())
        if held:
            await self.index.record(self.id, held, ttl_s=None)
        forgotten = self._blocks.trim()
        if forgotten:
            await self.index.remove(self.id, forgotten)
        for observer in self.observers:
            observer(ev, keys)

    async def _removed(self, ev: BlockRemoved) -> None:
        if ev.group_idx is not None and self._group is not None and ev.group_idx != self._group:
            return
        gone, ages = self._blocks.remove(ev.block_hashes, ev.medium, self._clock())
        for age in ages:
            metrics.BLOCK_RETENTION.observe(age)
        if gone:
            await self.index.remove(self.id, gone)

    def _unknown_parent(self) -> None:
        st = self.state
        metrics.KV_GAPS.labels(self.id).inc()
        if self._clock() - st.last_resync_at < RESYNC_COOLDOWN_S:
            self._warn_once("parent", "kv events: %s: BlockStored with an unknown parent: blocks skipped", self.id)
            return
        st.need_resync = True

    async def _block_size_mismatch(self, got: int, expected: int) -> None:
        metrics.BLOCK_SIZE_MISMATCH.labels(self.id).inc()
        if self.state.disabled == "block_size":
            return
        log.error("kv events: %s stores blocks of %d tokens but the router is configured for %d: its keys can "
                  "never match; precise mode OFF for this replica (fix block_size in the config)",
                  self.id, got, expected)
        self.state.disabled = "block_size"
        self._set_precise(False)
        await self._clear()

    async def _clear(self) -> None:
        self._blocks.clear()
        await self.index.clear(self.id)

    # ---- helpers ---------------------------------------------------------------------------

    def _follows_group(self, group: int | None, kind: str | None) -> bool:
        """Hybrid models announce each KV-cache group's blocks. Only the first full-attention group
        says which prefixes are cached: a sliding-window group drops early blocks that full
        attention keeps, and applying its removals would hide the whole prefix."""
        if kind is not None and kind != "full_attention":
            return False
        if group is None:
            return True
        if self._group is None:
            self._group = group
        return group == self._group

    def _base_model(self) -> str | None:
        if self.backend.base_model:
            return self.backend.base_model
        if len(self.backend.models) == 1:
            return next(iter(self.backend.models))
        return None

    def _set_precise(self, value: bool) -> None:
        self.backend.precise = value
        self._m_precise.set(1 if value else 0)

    def _warn_once(self, what: str, msg: str, *args: object) -> None:
        if what not in self.state.warned:
            self.state.warned.add(what)
            log.warning(msg, *args)


def _batch_ts(payload: bytes) -> float | None:
    try:
        return decode_payload(payload).ts
    except DecodeError:
        return None
