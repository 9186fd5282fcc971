"""EventIngest: owns every KV-event task of one router process (precise mode).

Per replica with events configured it runs: a SUB socket task (connect mode) or a share
of the one bound SUB (bind mode), a bounded queue, and one worker task that decodes and
applies that replica's messages strictly in order (``ReplicaApplier``). Around them: a
watchdog (an engine that serves requests but stopped sending events loses precise mode)
and a follower that drops replicas the fleet removed and picks up the ones it added (from the
config file or from discovery, whose entries carry their event endpoints).

Who ingests when several routers share one Redis index: by default (``index.events_election``)
one router, elected with a Redis lease (``router.events.leader``): it ingests every engine's
events and publishes which replicas are precise; the others only follow those flags, and
take over within the lease's expiry when it dies. Without Redis, or with the election off,
every router ingests every engine it is configured for: writes are idempotent (record
refreshes the same keys, remove and clear of absent keys are no-ops), so N routers converge
on the same index, at the price of N-fold writes.

Nothing starts at import or construction; ``start()``/``stop()`` are called by the app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import zmq.asyncio

from router import metrics
from router.config import BackendConfig, RouterConfig
from router.events.applier import ReplicaApplier
from router.events.decode import DecodeError, decode_message
from router.events.leader import IngesterElection, IngestLease
from router.events.selfcheck import SelfCheckResult, check_replica
from router.events.subscriber import EventSocket, Frames, ReplayClient
from router.fleet.backend import Backend
from router.hashing.tokenizer import ModelTokenizer
from router.index.base import BlockIndex, IndexUnavailable
from router.index.connection import connect
from router.types import BackendId

log = logging.getLogger(__name__)

QUEUE_MESSAGES = 10_000
"""Per-replica backlog (vLLM's replay buffer size): beyond it a connected SUB waits (ZMQ buffers),
the shared bound SUB drops and the gap is replayed (see EventSocket)."""
WATCHDOG_INTERVAL_S = 1.0
FOLLOW_INTERVAL_S = 2.0
LEASE_CALL_MS = 500.0
"""Deadline of each lease call: off the request path, and well under the lease's renew interval."""
SELFCHECK_WAIT_S = 60.0
"""How long the self-check waits for a replica to turn healthy with a known model before giving up."""

Control = Callable[[], Coroutine[Any, Any, None]]
Inbox = asyncio.Queue[Frames | Control]  # a replica's messages, and control steps kept in order with them


@dataclass
class _Replica:
    cfg: BackendConfig
    applier: ReplicaApplier
    queue: Inbox
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    socket: EventSocket | None = None
    busy_since: float | None = None


class EventIngest:
    def __init__(self, config: RouterConfig, index: BlockIndex, fleet: Any, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.index = index
        self.fleet = fleet
        self._clock = clock
        self._ctx: zmq.asyncio.Context | None = None
        self._replicas: dict[BackendId, _Replica] = {}
        self._by_topic: dict[bytes, _Replica] = {}
        self._bound: EventSocket | None = None
        self._tasks: list[asyncio.Task[None]] = []  # election (or nothing): lives from start to stop
        self._ingest_tasks: list[asyncio.Task[None]] = []  # sockets, watchdog, follower: while ingesting
        self._lease: IngestLease | None = None
        self._unrouted_warned: set[bytes] = set()
        self._http: httpx.AsyncClient | None = None
        self._tokenizers: dict[str, ModelTokenizer] = {}
        self.selfchecks: dict[BackendId, SelfCheckResult] = {}
        """The start-up self-check's verdict per replica (absent: not run or not finished)."""

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.index.mode == "approximate":
            log.info("kv events: index.mode is approximate: not ingesting events")
            return
        if self.config.index.mode == "precise":
            for cfg in self.config.backends:
                if cfg.kv_events is None and cfg.kv_topic is None:
                    log.warning("kv events: index.mode is precise but %s has no kv_events/kv_topic: "
                                "it is routed in approximate mode", cfg.url)
        self._ctx = zmq.asyncio.Context()
        if self.config.index.selfcheck and self.config.tokenizer is not None:
            self._http = httpx.AsyncClient(timeout=10.0)
        if hasattr(self.fleet, "on_restart"):
            self.fleet.on_restart(self._fleet_restart)
        if hasattr(self.fleet, "on_removed"):
            self.fleet.on_removed(self._fleet_removed)  # at once; the follower's poll is the fallback
        if self.config.redis_url is not None and self.config.index.events_election:
            client, _ = connect(self.config.redis_url, deadline_ms=LEASE_CALL_MS,
                                cluster=True if self.config.index.cluster else None)
            self._lease = IngestLease(client, namespace=self.config.index.namespace,
                                      ttl_s=self.config.index.events_lease_s)
            election = IngesterElection(self._lease, start=self._start_ingesting, stop=self._stop_ingesting,
                                        ingesting=lambda: self.ingesting, flags=self._precise_flags,
                                        follow=self._follow_precise, call_timeout_s=LEASE_CALL_MS / 1000,
                                        clock=self._clock)
            self._spawn(self._tasks, election.run(), "kv-events-election")
        else:
            await self._start_ingesting()

    async def stop(self, *, release_lease: bool = True) -> None:
        """Stop every task; ``release_lease=False`` leaves the lease to expire (as a crash would)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._lease is not None:
            if release_lease and self.ingesting:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._lease.release(), LEASE_CALL_MS / 1000)
            with contextlib.suppress(Exception):
                await self._lease.close()
            self._lease = None
        await self._stop_ingesting()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)  # never blocks, even if a socket were left open
            self._ctx = None

    @property
    def ingesting(self) -> bool:
        return self._ingest_tasks != []

    async def _start_ingesting(self) -> None:
        assert self._ctx is not None
        if self.config.kv_events_bind:
            self._bound = EventSocket(self._ctx, self.config.kv_events_bind, bind=True,
                                      route=self._route_topic, on_unrouted=self._unrouted)
            self._spawn(self._ingest_tasks, self._bound.run(), "kv-events-bound-sub")
            log.info("kv events: bound SUB on %s", self.config.kv_events_bind)
        for backend in self.fleet.backends():
            cfg = self._config_for(backend.id)
            if cfg is not None:
                self.add_backend(cfg, backend)
        self._spawn(self._ingest_tasks, self._watchdog(), "kv-events-watchdog")
        self._spawn(self._ingest_tasks, self._follow_fleet(), "kv-events-follow-fleet")

    async def _stop_ingesting(self) -> None:
        for rid in list(self._replicas):
            await self.remove_backend(rid)
        for task in self._ingest_tasks:
            task.cancel()
        await asyncio.gather(*self._ingest_tasks, return_exceptions=True)
        self._ingest_tasks.clear()
        if self._bound is not None:
            self._bound.close()
            self._bound = None

    def _precise_flags(self) -> dict[str, bool]:
        return {rid: rep.applier.backend.precise for rid, rep in self._replicas.items()}

    def _follow_precise(self, flags: Mapping[str, bool]) -> None:
        """Copy the ingester's verdicts into this router's Backends (it routes with them)."""
        for backend in self.fleet.backends():
            cfg = self._config_for(backend.id)
            if cfg is None or (cfg.kv_events is None and cfg.kv_topic is None):
                continue
            backend.precise = flags.get(backend.id, False)
            metrics.PRECISE_MODE.labels(backend.id).set(1 if backend.precise else 0)

    def add_backend(self, cfg: BackendConfig, backend: Backend | None = None) -> bool:
        """Start ingesting one replica's events (no-op without an events endpoint); True if started."""
        backend = backend or self.fleet.get(cfg.url)
        if backend is None or self._ctx is None or backend.id in self._replicas:
            return False
        bound_topic = cfg.kv_topic is not None and self.config.kv_events_bind is not None
        if cfg.kv_events is None and not bound_topic:
            return False
        replay = ReplayClient(self._ctx, cfg.kv_replay).fetch if cfg.kv_replay else None
        applier = ReplicaApplier(backend, self.index, block_size=self._block_size_of(cfg, backend),
                                 replay=replay, record_cpu_blocks=self.config.index.record_cpu_blocks,
                                 fleet=self.fleet, clock=self._clock)
        rep = _Replica(cfg, applier, asyncio.Queue(QUEUE_MESSAGES))
        self._replicas[backend.id] = rep
        if cfg.kv_events is not None:
            queue = rep.queue
            rep.socket = EventSocket(self._ctx, cfg.kv_events, bind=False, route=lambda _t: queue)
            self._spawn(rep.tasks, rep.socket.run(), f"kv-events-sub:{backend.id}")
            log.info("kv events: %s: SUB connected to %s (replay %s)", backend.id, cfg.kv_events, cfg.kv_replay)
        else:
            assert cfg.kv_topic is not None
            self._by_topic[cfg.kv_topic.encode()] = rep
            log.info("kv events: %s: topic %r on the bound endpoint (replay %s)", backend.id, cfg.kv_topic,
                     cfg.kv_replay)
        rep.queue.put_nowait(applier.bootstrap)  # first in its queue: before any live batch
        self._spawn(rep.tasks, self._worker(rep), f"kv-events-apply:{backend.id}")
        if self._http is not None:
            self._spawn(rep.tasks, self._selfcheck(rep), f"kv-selfcheck:{backend.id}")
        return True

    async def remove_backend(self, rid: BackendId) -> None:
        rep = self._replicas.pop(rid, None)
        if rep is None:
            return
        self._by_topic = {t: r for t, r in self._by_topic.items() if r is not rep}
        for task in rep.tasks:
            task.cancel()
        await asyncio.gather(*rep.tasks, return_exceptions=True)
        if rep.socket is not None:
            rep.socket.close()
        await rep.applier.stop()

    def applier(self, rid: BackendId) -> ReplicaApplier | None:
        rep = self._replicas.get(rid)
        return rep.applier if rep is not None else None

    def replicas(self) -> list[BackendId]:
        return list(self._replicas)

    # ---- tasks ---------------------------------------------------------------------------------

    async def _worker(self, rep: _Replica) -> None:
        rid = rep.applier.id
        while True:
            item = await rep.queue.get()
            try:
                if callable(item):
                    await item()
                    continue
                try:
                    msg = decode_message(item)
                except DecodeError as exc:
                    metrics.KV_DECODE_ERRORS.labels(rid).inc()
                    log.debug("kv events: %s: skipped a malformed message: %s", rid, exc)
                    continue
                await rep.applier.apply(msg)
            except IndexUnavailable:
                # Writes were lost: what the index holds for this replica is unknown. Forget the
                # engine's state so the next batch resyncs from the replay buffer.
                log.warning("kv events: %s: index unavailable, will resync on the next batch", rid)
                rep.applier.lost_writes()
            except Exception:  # one bad batch must not end the replica's ingestion
                log.exception("kv events: %s: failed to apply a batch", rid)
                rep.applier.lost_writes()

    async def _selfcheck(self, rep: _Replica) -> None:
        assert self._http is not None
        result = await check_replica(rep.applier, self.index, self._http, load_tokenizer=self._tokenizer_for,
                                     block_size=self._block_size_of(rep.cfg, rep.applier.backend),
                                     wait_s=SELFCHECK_WAIT_S)
        if result is not None:
            self.selfchecks[rep.applier.id] = result

    async def _tokenizer_for(self, model: str) -> ModelTokenizer | None:
        model_cfg = self.config.models.get(model)
        directory = (model_cfg.tokenizer if model_cfg is not None else None) or self.config.tokenizer
        if directory is None:
            return None
        if directory not in self._tokenizers:
            try:
                self._tokenizers[directory] = await asyncio.to_thread(ModelTokenizer.from_dir, directory)
            except Exception as exc:  # the gateway reports a bad tokenizer directory at start
                log.warning("selfcheck: cannot load tokenizer %s: %s", directory, exc)
                return None
        return self._tokenizers[directory]

    async def _watchdog(self) -> None:
        silence = self.config.index.events_silence_s
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            now = self._clock()
            for rep in self._replicas.values():
                backend, st = rep.applier.backend, rep.applier.state
                if backend.in_flight + backend.shared_in_flight <= 0:
                    rep.busy_since = None
                    continue
                if rep.busy_since is None:
                    rep.busy_since = now
                last = st.last_event_at if st.last_event_at is not None else float("-inf")
                if backend.precise and now - last > silence and now - rep.busy_since > silence:
                    log.warning("kv events: %s served requests for %.0fs without sending events: precise mode off "
                                "until events resume", backend.id, now - rep.busy_since)
                    rep.applier.silenced()
            # index sizes per replica are exported by the index wrapper (router.index.resilient)

    async def _follow_fleet(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL_S)
            current = {b.id: b for b in self.fleet.backends()}
            for rid in [r for r in self._replicas if r not in current]:
                log.info("kv events: %s left the fleet: stopping its ingestion", rid)
                await self.remove_backend(rid)
            for rid, backend in current.items():
                if rid not in self._replicas:
                    cfg = self._config_for(rid)
                    if cfg is not None:
                        self.add_backend(cfg, backend)

    async def _fleet_removed(self, backend_id: BackendId, *_: Any) -> None:
        if backend_id in self._replicas:
            log.info("kv events: %s left the fleet: stopping its ingestion", backend_id)
            await self.remove_backend(backend_id)
            with contextlib.suppress(IndexUnavailable):  # a batch applied while it was leaving
                await self.index.clear(backend_id)

    async def _fleet_restart(self, backend_id: BackendId, *_: Any) -> None:
        rep = self._replicas.get(backend_id)
        if rep is not None:
            with contextlib.suppress(asyncio.QueueFull):
                rep.queue.put_nowait(rep.applier.on_fleet_restart)  # in order with its messages

    # ---- helpers -------------------------------------------------------------------------------

    def _route_topic(self, topic: bytes) -> Inbox | None:
        rep = self._by_topic.get(topic)
        return rep.queue if rep is not None else None

    def _unrouted(self, topic: bytes) -> None:
        metrics.KV_DECODE_ERRORS.labels("unknown-topic").inc()
        if topic not in self._unrouted_warned and len(self._unrouted_warned) < 64:
            self._unrouted_warned.add(topic)
            log.warning("kv events: message on the bound endpoint with unknown topic %r: no backend has "
                        "this kv_topic", topic[:64])

    def _config_for(self, rid: BackendId) -> BackendConfig | None:
        # The fleet's own entry first: discovery adds replicas (with their event endpoints) that
        # the config file never listed.
        replica = getattr(self.fleet, "replica", None)
        entry = replica(rid) if replica is not None else None
        cfg_of = getattr(entry, "cfg", None)
        if isinstance(cfg_of, BackendConfig):
            return cfg_of
        for cfg in self.config.backends:
            if cfg.url == rid:
                return cfg
        return None

    def _block_size_of(self, cfg: BackendConfig, backend: Backend) -> Callable[[], int]:
        config = self.config
        pinned = "block_size" in config.model_fields_set

        def block_size() -> int:
            # The block size the request path keys this replica's model with (router.pipeline's
            # rule): the model's own, else the one learned from the engine unless the top-level
            # block_size is set explicitly, else the top-level default.
            model = config.models.get(backend.base_model or "")
            if model is not None and model.block_size:
                return model.block_size
            if not pinned and backend.block_size:
                return backend.block_size
            return config.block_size

        return block_size

    @staticmethod
    def _spawn(into: list[asyncio.Task[None]], coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_stop)
        into.append(task)


def _log_stop(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        log.info("kv events: task %s stopped (cancelled by its owner)", task.get_name())
    elif (exc := task.exception()) is not None:
        log.error("kv events: task %s died: %r", task.get_name(), exc, exc_info=exc)
    else:
        log.info("kv events: task %s finished", task.get_name())
