"""Forward one request to the ranked replicas: retry before the first byte, then stream.

A replica's answer is *committed* to the client once its first body chunk is in (for
streams) or its whole body is in (non-streaming answers are small and arrive at once).
Until then a connect error, a 5xx, a broken stream or a first-byte timeout moves on to
the next replica in the decision's ranking, at most ``health.max_retries`` times. After
commit nothing is retried: a half-streamed answer cannot be re-sent.

``fleet.acquire`` / ``fleet.release`` bracket every attempt, so in-flight counts and the
passive circuit breaker see each one. Upstream failures leave this package only as
``router.errors.UpstreamError`` (502) or ``UpstreamTimeout`` (504).
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from router.config import RouterConfig
from router.errors import UpstreamError, UpstreamTimeout
from router.fleet.registry import Fleet
from router.metrics import RETRIES, STAGE_SECONDS
from router.proxy.client import StreamBroken, TimedOut, UpstreamClient, UpstreamFailure, UpstreamResponse
from router.proxy.deadlines import Deadlines
from router.types import BackendId

_connect_stage = STAGE_SECONDS.labels("proxy_connect")
"""Pool wait, connect (or reuse), request sent, until the replica's status line and headers."""


class _BadStatus(UpstreamFailure):
    reason = "status"


@dataclass(slots=True)
class Opened:
    """A committed upstream answer: its status, headers and first bytes; the rest to pull."""

    backend: BackendId
    status: int
    headers: list[tuple[bytes, bytes]]
    first: bytes
    response: UpstreamResponse | None
    """Still open (a stream with more to come); None when the body is complete in ``first``."""
    chunks: AsyncIterator[bytes] | None
    attempts: int
    first_byte_at: float
    released: bool = False


class Forwarder:
    def __init__(self, client: UpstreamClient, fleet: Fleet, config: RouterConfig) -> None:
        self.client = client
        self.fleet = fleet
        self.timeouts = config.timeouts
        self.max_retries = config.health.max_retries
        self.on_release: Callable[[], None] | None = None
        """Called after every released slot (admission control wakes its queue)."""
        self.deadlines = Deadlines()

    async def open(self, ranked: Sequence[BackendId], path: str, body: bytes, headers: Mapping[str, str],
                   *, stream: bool, deadline: float, prefill: Callable[[BackendId], int] | None = None,
                   sent: Callable[[BackendId], None] | None = None) -> Opened:
        """Try ``ranked`` in order until one answers; ``deadline`` is the monotonic end of the total timeout.

        ``prefill(backend)``: the prompt tokens that replica is predicted to compute, counted
        as its pending prefill from dispatch to the first byte (``Fleet.first_byte``)."""
        last: UpstreamFailure | None = None
        for attempt, backend in enumerate(ranked[: self.max_retries + 1]):
            if last is not None:
                RETRIES.labels(last.reason).inc()
            if time.monotonic() >= deadline:
                break
            tokens = prefill(backend) if prefill is not None else 0
            self.fleet.acquire(backend, tokens)
            try:
                opened = await self._attempt(backend, path, body, headers, stream, deadline,
                                             None if sent is None else functools.partial(sent, backend))
            except UpstreamFailure as exc:
                self.fleet.first_byte(backend, tokens)
                self._release(backend, False)
                last = exc
                continue
            except BaseException:
                # Cancelled by the client or the server: not the replica's fault.
                self.fleet.first_byte(backend, tokens)
                self._release(backend, True)
                raise
            self.fleet.first_byte(backend, tokens)
            opened.attempts = attempt + 1
            if opened.response is None:
                self.release(opened, ok=opened.status < 500)
            return opened
        if isinstance(last, TimedOut) or time.monotonic() >= deadline:
            raise UpstreamTimeout(f"no replica answered within {self.timeouts.first_byte_s:g}s"
                                  if isinstance(last, TimedOut) else "the request's total timeout passed")
        detail = f": {last}" if last is not None else ""
        raise UpstreamError(f"every replica tried failed before answering{detail}")

    async def _attempt(self, backend: BackendId, path: str, body: bytes, headers: Mapping[str, str],
                       stream: bool, deadline: float, sent: Callable[[], None] | None = None) -> Opened:
        budget = min(self.timeouts.first_byte_s, deadline - time.monotonic())
        resp: UpstreamResponse | None = None
        committed = False
        try:
            with self.deadlines.within(budget):
                t0 = time.perf_counter()
                resp = await self.client.open(backend + path, body, headers, sent=sent)
                _connect_stage.observe(time.perf_counter() - t0)
                if resp.status >= 500:
                    raise _BadStatus(f"{backend} answered {resp.status}")
                if stream and resp.status == 200 and _is_sse(resp.headers):
                    chunks = resp.chunks()
                    first = await anext(chunks, b"")
                    if first:
                        committed = True
                        return Opened(backend, resp.status, resp.headers, first, resp, chunks, 0,
                                      time.monotonic())
                    whole = b"".join([c async for c in chunks])
                else:
                    whole = await resp.read()
                return Opened(backend, resp.status, resp.headers, whole, None, None, 0, time.monotonic())
        except TimeoutError:
            raise TimedOut(f"{backend}: no first byte within {budget:.3g}s") from None
        finally:
            if resp is not None and not committed:
                await resp.aclose()

    async def rest(self, opened: Opened, deadline: float) -> AsyncIterator[bytes]:
        """The chunks after the first, each within the idle timeout and all within the total."""
        chunks = opened.chunks
        if chunks is None:
            return
        idle = self.timeouts.idle_s
        try:
            with self.deadlines.within(None) as watch:
                while True:
                    now = time.monotonic()
                    if now >= deadline:
                        raise TimedOut("total timeout")
                    watch.at = self.deadlines.now() + min(idle, deadline - now)
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        return
                    watch.at = None  # the client's pace is not the upstream's idle time
                    yield chunk
        except TimeoutError:
            raise TimedOut(f"no chunk from {opened.backend} within {idle:g}s") from None

    async def close(self, opened: Opened, *, ok: bool) -> None:
        if opened.response is not None:
            response, opened.response = opened.response, None
            await response.aclose()
        self.release(opened, ok=ok)

    def release(self, opened: Opened, *, ok: bool) -> None:
        if not opened.released:
            opened.released = True
            self._release(opened.backend, ok)

    def _release(self, backend: BackendId, ok: bool) -> None:
        self.fleet.release(backend, ok)
        if self.on_release is not None:
            self.on_release()


def _is_sse(headers: list[tuple[bytes, bytes]]) -> bool:
    """Only an event stream is relayed chunk by chunk; anything else is one JSON answer."""
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)


__all__ = ["Forwarder", "Opened", "StreamBroken", "TimedOut", "UpstreamFailure"]
