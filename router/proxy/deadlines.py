"""Deadlines for many in-flight requests on one periodic timer, not a timer each.

Arming and cancelling a timer costs about 2 µs in uvloop and ``asyncio.timeout`` about
4.7 µs (``python -m loadtest.bench.timers``): per request the first-byte deadline, and per
streamed chunk the idle deadline twice (armed before the read, disarmed while the client
takes it). Here a deadline is an attribute of a ``Watch``; one sweep every ``TICK_S``
cancels the tasks whose deadline has passed, and stops while nothing is watched. The
router's timeouts are seconds to minutes: enforcing them up to ``TICK_S`` late is nothing.

Semantics are ``asyncio.timeout``'s: the watched block sees ``CancelledError`` at its
current ``await``, and leaves as ``TimeoutError`` unless someone else cancelled it too.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

TICK_S = 0.05
"""How often deadlines are checked (while any is armed)."""


class Watch:
    """One task's deadline (``at``, the loop's clock; None: none now)."""

    __slots__ = ("_cancelling", "_owner", "at", "expired", "task")

    def __init__(self, owner: Deadlines, at: float | None) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline needs a task")
        self._owner = owner
        self.task = task
        self.at = at
        self.expired = False
        self._cancelling = task.cancelling()

    def __enter__(self) -> Watch:
        self._owner._add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._owner._watches.discard(self)
        if self.expired and self.task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


class Deadlines:
    def __init__(self, tick_s: float = TICK_S) -> None:
        self.tick_s = tick_s
        self._watches: set[Watch] = set()
        self._timer: asyncio.TimerHandle | None = None

    def within(self, seconds: float | None) -> Watch:
        """``with deadlines.within(s):`` - the block is cancelled (-> TimeoutError) after ``s``
        seconds (None: not yet; set ``watch.at`` later, on ``deadlines.now()``'s clock)."""
        return Watch(self, None if seconds is None else self.now() + seconds)

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def _add(self, watch: Watch) -> None:
        self._watches.add(watch)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.tick_s, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = self.now()
        for watch in self._watches:
            at = watch.at
            if at is not None and at <= now and not watch.expired:
                watch.expired = True
                watch.task.cancel()
        if self._watches:
            self._timer = asyncio.get_running_loop().call_later(self.tick_s, self._sweep)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
