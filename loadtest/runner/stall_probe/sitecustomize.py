"""A stall probe for every Python process of a load test: garbage-collector pauses, event-loop lag
and thread oversleep, each logged with its start on the host's monotonic clock.

Not imported by anything: Python loads it at start-up when this directory is on ``PYTHONPATH``,
and it does nothing unless ``LOADTEST_STALL_PROBE`` names a directory to write to::

    PYTHONPATH=loadtest/runner/stall_probe LOADTEST_STALL_PROBE=/tmp/stalls \\
        ./scripts/demo --workloads hot_prefix --out out/probe
    .venv/bin/python -m loadtest.runner.stalls out/probe /tmp/stalls

One JSON line per event in ``<dir>/<pid>.jsonl``: ``p`` the process (``demo``, ``engines``,
``router:<policy>``), ``k`` the kind (``gc`` with its generation, ``loop``: a callback
scheduled from a watchdog thread ran this late, ``thread``: the watchdog's own 5 ms sleep
overslept, i.e. the interpreter or the CPU was not available; ``stack``: the loop has been
stuck for 40 ms and this is what its thread was running then), ``t`` the start
(``time.perf_counter()``, CLOCK_MONOTONIC: comparable across processes) and ``d`` the duration
in seconds. The watchdog costs a wake-up every 5 ms; leave the probe off for figures.
"""

from __future__ import annotations

import asyncio.runners
import gc
import json
import os
import sys
import threading
import time
import traceback
from typing import Any

_DIR = os.environ.get("LOADTEST_STALL_PROBE")
_GC_MIN_S, _LAG_MIN_S, _TICK_S = 0.003, 0.015, 0.005
_STACK_AFTER_S, _STACK_DEPTH = 0.04, 14


def _process() -> str:
    argv = sys.argv
    if "--policy" in argv:
        return "router:" + argv[argv.index("--policy") + 1]
    if "engine" in argv:
        return "engines"
    return "demo" if any("demo" in a for a in argv) else os.path.basename(argv[0] if argv else "?")


class _Log:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.file: Any = None
        self.lock = threading.Lock()

    def write(self, kind: str, t: float, d: float, **extra: Any) -> None:
        with self.lock:
            if self.file is None:
                self.file = open(f"{self.directory}/{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115
            self.file.write(json.dumps({"p": _process(), "k": kind, "t": t, "d": d, **extra}) + "\n")


def _install(log: _Log) -> None:
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        d = time.perf_counter() - started[0]
        if d >= _GC_MIN_S:
            log.write("gc", started[0], d, gen=info["generation"])

    gc.callbacks.append(on_gc)
    loops: list[Any] = []
    lazy_init = asyncio.runners.Runner._lazy_init  # type: ignore[attr-defined]

    def capture(self: Any) -> None:  # every asyncio.run / uvloop.run / uvicorn goes through a Runner
        lazy_init(self)
        if not loops and threading.current_thread() is threading.main_thread():
            loops.append(self._loop)

    asyncio.runners.Runner._lazy_init = capture  # type: ignore[attr-defined]

    pending: list[float] = []  # send times of callbacks the loop has not run yet
    main = threading.main_thread().ident

    def watchdog() -> None:
        dumped = 0.0
        while True:
            t = time.perf_counter()
            time.sleep(_TICK_S)
            late = time.perf_counter() - t - _TICK_S
            if late >= _LAG_MIN_S:
                log.write("thread", t, late)
            if pending and time.perf_counter() - pending[0] >= _STACK_AFTER_S and dumped != pending[0]:
                # The loop is stuck right now: record what its thread is running (once per stall).
                dumped = pending[0]
                frame = sys._current_frames().get(main or 0)
                if frame is not None:
                    stack = [f"{fs.filename}:{fs.lineno} {fs.name}" for fs in traceback.extract_stack(frame)]
                    log.write("stack", pending[0], time.perf_counter() - pending[0], stack=stack[-_STACK_DEPTH:])
            if loops and not loops[0].is_closed():
                sent = time.perf_counter()
                pending.append(sent)

                def ran(sent: float = sent) -> None:
                    pending.remove(sent)
                    d = time.perf_counter() - sent
                    if d >= _LAG_MIN_S:
                        log.write("loop", sent, d)

                try:
                    loops[0].call_soon_threadsafe(ran)
                except RuntimeError:  # the loop closed meanwhile
                    pending.remove(sent)

    threading.Thread(target=watchdog, daemon=True, name="stall-probe").start()


if _DIR:
    _install(_Log(_DIR))
