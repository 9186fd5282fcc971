"""Stopping a background task: the idiom every owner of one repeats, written once."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has stopped (None: nothing to do). Its cancellation is
    swallowed; an error it had already finished with is raised, as awaiting it would."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
