"""One request's path: prepare (tokens, keys), gather (index lookup + fleet snapshot),
decide (scheduler; wait in the admission queue when every replica is at its cap),
dispatch (proxy, with the prompt's keys recorded for the chosen replica), relay, feedback.

All I/O for a decision happens in ``gather``; the scheduler decides synchronously from
that frozen snapshot. What happens after the answer (cached tokens -> index, stale-hit
correction, lost savings, metrics, the decision log line) is ``router.feedback``.

The pipeline owns no HTTP: ``router.api`` parses and renders, ``router.proxy`` moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.admission import AdmissionQueue
from router.config import RouterConfig
from router.errors import NoHealthyBackend, NotFound, RouterError, UpstreamTimeout
from router.feedback import Feedback, requests_child
from router.fleet.registry import Fleet
from router.index.base import BlockIndex, IndexUnavailable
from router.index.peers import Peers
from router.index.resilient import ResilientIndex
from router.logs import log_decision
from router.metrics import (
    DECISIONS,
    STAGE_SECONDS,
    STREAM_ERRORS,
)
from router.proxy.client import TimedOut, UpstreamFailure
from router.proxy.forward import Forwarder, Opened
from router.proxy.sse import SseTap, error_event, usage_of_body
from router.request.model import RoutingRequest
from router.request.prompt import EncodedPrompt, PromptEncoder
from router.scheduling import Scheduler
from router.scheduling.filters import Saturated
from router.scheduling.model import Candidate, Decision, RouteRequest
from router.scheduling.shortlist import shortlist
from router.tenancy import Tenancy
from router.types import BackendId

_lookup_stage = STAGE_SECONDS.labels("lookup")
_decisions = functools.cache(DECISIONS.labels)  # reasons x arms: a handful of children, looked up once
_score_stage = STAGE_SECONDS.labels("score")
PATHS = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(slots=True)
class Gathered:
    enc: EncodedPrompt
    matched: Mapping[BackendId, int]
    candidates: list[Candidate]
    index_available: bool
    route: RouteRequest


@dataclass(slots=True)
class Routed:
    """One request from its decision to the end of its answer."""

    req: RoutingRequest
    request_id: str
    gathered: Gathered
    decision: Decision
    arm: str
    started: float
    deadline: float
    body: bytes
    strip_usage: bool
    outcome: str = "ok"
    status: int = 0
    cached: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    def __init__(self, config: RouterConfig, index: BlockIndex, fleet: Fleet, scheduler: Scheduler,
                 encoder: PromptEncoder, forwarder: Forwarder, rng: random.Random | None = None,
                 peers: Peers | None = None) -> None:
        self.config = config
        self.index = index
        self.fleet = fleet
        self.scheduler = scheduler
        self.encoder = encoder
        self.forwarder = forwarder
        self._rng = rng or random.Random()
        self.feedback = Feedback(config, index, fleet, peers)
        resilient = index if isinstance(index, ResilientIndex) else None
        self._local = resilient.local if resilient is not None else None
        """The in-process index, looked up without a coroutine (see ResilientIndex.local)."""
        self._observe_lookup = resilient.observe_lookup if resilient is not None else lambda _s: None
        self.tenancy = Tenancy(config.auth)
        self._block_pinned = "block_size" in config.model_fields_set
        self.admission = AdmissionQueue(config.admission) if config.admission.max_concurrency_per_backend else None
        if self.admission is not None:
            forwarder.on_release = self.admission.notify

    # --- prepare and gather -------------------------------------------------------------
    def check_model(self, model: str) -> None:
        backends = self.fleet.backends()
        if any(model in b.models for b in backends):
            return
        if not any(b.models for b in backends):  # nothing discovered yet: not the client's fault
            raise NoHealthyBackend("no replica has answered yet", retry_after=self._retry_after())
        raise NotFound(f"model '{model}' is not served by any replica", param="model")

    def block_size(self, model: str) -> int:
        m = self.config.models.get(model)
        if m is not None and m.block_size is not None:
            return m.block_size
        if not self._block_pinned:
            for b in self.fleet.backends():
                if b.block_size is not None and model in b.models:
                    return int(b.block_size)
        return self.config.block_size

    async def gather(self, req: RoutingRequest, session: str | None = None) -> Gathered:
        enc = await self.encoder.encode(req, self.block_size(req.model))
        t0 = time.perf_counter()
        available = True
        matched: Mapping[BackendId, int] = {}
        if enc.keys:
            if self._local is not None:
                matched = self._local.lookup_now(enc.keys)
                self._observe_lookup(time.perf_counter() - t0)
            else:
                try:
                    matched = await self.index.lookup(enc.keys)
                except IndexUnavailable:
                    available = False  # counted and logged by the index's metrics wrapper
        candidates = self.fleet.candidates(req.model, matched)
        _lookup_stage.observe(time.perf_counter() - t0)
        route = RouteRequest(model=req.model, keys=tuple(enc.keys), prompt_tokens=enc.prompt_tokens,
                             block_size=enc.block_size, cacheable_blocks=enc.cacheable_blocks,
                             session=session, index_available=available)
        return Gathered(enc, matched, candidates, available, route)

    def decide(self, g: Gathered, policy: str | None = None) -> Decision:
        t0 = time.perf_counter()
        candidates = g.candidates
        if (policy or self.scheduler.policy) == "cache_aware":
            # The baselines need every replica (rendezvous order, turns); cache_aware's pick
            # is always among the holders or the lightest (router.scheduling.shortlist).
            candidates = shortlist(candidates)
        try:
            decision: Decision = self.scheduler.decide(g.route, candidates, policy=policy)
        except NoHealthyBackend as exc:
            if exc.retry_after is None:
                exc.retry_after = self._retry_after()
            raise
        _score_stage.observe(time.perf_counter() - t0)
        return decision

    async def _queue(self, g: Gathered, policy: str | None) -> Decision:
        """Every replica is at its cap: wait in the bounded queue for a slot (429 when the
        queue is full, 503 past its deadline), re-deciding on a fresh snapshot each wake-up."""
        assert self.admission is not None
        deadline = self.admission.enter()
        try:
            while True:
                await self.admission.wait(deadline)
                g.candidates = self.fleet.candidates(g.route.model, g.matched)
                with contextlib.suppress(Saturated):
                    return self.decide(g, policy)
        finally:
            self.admission.leave()

    def _retry_after(self) -> float:
        return max(1.0, self.config.health.interval_s)

    # --- route and dispatch -------------------------------------------------------------
    async def route(self, req: RoutingRequest, request_id: str, session: str | None) -> Routed:
        started = time.monotonic()
        self.check_model(req.model)
        exp = self.config.experiment
        arm, policy = "main", None
        if exp.baseline_fraction > 0 and self._rng.random() < exp.baseline_fraction:
            arm, policy = "baseline", exp.baseline_policy
        g = await self.gather(req, session)
        try:
            try:
                decision = self.decide(g, policy)
            except Saturated:
                if self.admission is None:
                    raise
                decision = await self._queue(g, policy)
        except RouterError as exc:
            outcome = "no_backend" if isinstance(exc, NoHealthyBackend) else "rejected"
            requests_child("none", req.model, arm, outcome).inc()
            log_decision(self.config.log_decisions, request_id, req.model, g.enc, g.index_available, None,
                         arm, outcome, exc.status, started)
            raise
        _decisions(decision.reason, arm).inc()
        strip = req.stream and not req.include_usage
        body = req.raw
        if strip:
            opts = dict(req.body.get("stream_options") or {})
            opts["include_usage"] = True
            body = orjson.dumps({**req.body, "stream_options": opts})
        elif req.edited:
            body = orjson.dumps(req.body)
        return Routed(req, request_id, g, decision, arm, started,
                      started + self.config.timeouts.total_s, body, strip)

    async def dispatch(self, r: Routed) -> Opened:
        d = r.decision
        ranked = [d.backend, *(b for b in d.ranked if b != d.backend)]
        keys = r.gathered.enc.keys

        def sent(backend: BackendId) -> None:
            # The pick's keys are recorded once its request is written, with no await in
            # between on a pooled connection (the h1 client records before connecting
            # otherwise), so no other request is routed without them; the engine reads the
            # request meanwhile (a 32k-token prompt's 2,000 keys take 0.4 ms to record, 1.5 ms new).
            if backend == d.backend:
                self.feedback.record(backend, keys)

        headers = {"content-type": "application/json", "x-request-id": r.request_id}
        try:
            opened = await self.forwarder.open(ranked, PATHS[r.req.kind], r.body, headers,
                                               stream=r.req.stream, deadline=r.deadline,
                                               prefill=functools.partial(self._uncached, r), sent=sent)
        except RouterError as exc:
            r.outcome, r.status = ("timeout" if isinstance(exc, UpstreamTimeout) else "upstream_error"), exc.status
            self.finish(r, None, None)
            raise
        except asyncio.CancelledError:
            r.outcome = "cancelled"
            self.finish(r, None, None)
            raise
        if opened.backend != d.backend:
            self.feedback.record(opened.backend, keys)
        r.status = opened.status
        if opened.status >= 400:
            r.outcome = "client_error" if opened.status < 500 else "upstream_error"
        return opened

    def _uncached(self, r: Routed, backend: BackendId) -> int:
        """Prompt tokens ``backend`` is predicted to prefill (the scheduler's pending-prefill count)."""
        return r.gathered.enc.prompt_tokens - self.feedback.predicted(r, backend)

    def predicted(self, r: Routed, backend: BackendId) -> int:
        return self.feedback.predicted(r, backend)

    def complete(self, r: Routed, opened: Opened) -> None:
        """A non-streaming answer is whole in ``opened.first``."""
        self.finish(r, opened, usage_of_body(opened.first) if opened.status == 200 else None)

    async def relay(self, r: Routed, opened: Opened, start: Callable[[], Awaitable[None]],
                    send: Callable[[bytes], Awaitable[None]], end: Callable[[], Awaitable[None]]) -> None:
        """Start the answer, pass a committed stream to ``send`` chunk by chunk, ``end`` it (also
        cleanly when upstream breaks); then the upstream response is closed and released and the
        feedback recorded, whatever happened, after the client's last byte."""
        tap = SseTap(strip_usage=r.strip_usage)
        ok = False
        try:
            try:
                await start()
                out = tap.feed(opened.first)
                if out:
                    await send(out)
                async for chunk in self.forwarder.rest(opened, r.deadline):
                    out = tap.feed(chunk)
                    if out:
                        await send(out)
                out = tap.flush()
                if out:
                    await send(out)
                if not tap.done:
                    raise UpstreamFailure("stream ended without [DONE]")
                ok = True
            except UpstreamFailure as exc:
                STREAM_ERRORS.labels(opened.backend).inc()
                r.outcome = "timeout" if isinstance(exc, TimedOut) else "upstream_error"
                await send(error_event(f"the replica's stream broke after the first byte ({exc})", "stream_broken"))
            await end()
        except asyncio.CancelledError:
            # A client that leaves right after [DONE] (the openai client does) got everything.
            r.outcome = "ok" if tap.done else "cancelled"
            ok = True  # the client left; the replica did nothing wrong
            raise
        finally:
            try:
                await asyncio.shield(self.forwarder.close(opened, ok=ok))
            finally:  # a cancel landing during the close must not skip the feedback
                self.finish(r, opened, tap.usage)

    # --- feedback -----------------------------------------------------------------------

    def finish(self, r: Routed, opened: Opened | None, usage: Mapping[str, Any] | None) -> None:
        self.feedback.finish(r, opened, usage)

    async def drain(self) -> None:
        """Wait for pending index writes (shutdown)."""
        await self.feedback.drain()
