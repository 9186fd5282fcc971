"""``SimFleet``: start N simulated engines for a test, a load run or the demo, and control them.

Two modes, same handle:

- ``mode="thread"`` (default): the engines run in a background thread with their own event
  loop; quick to start (~0.3 s), but they share the GIL with the caller.
- ``mode="process"``: ``python -m loadtest engine ...`` in a subprocess, ready when it prints
  its ready line and every engine answers /health; use it for load tests, so the engines
  do not compete with the caller's event loop, and for fault tests (``kill()``).

Everything after start goes over HTTP to the engines' ``/sim/*`` endpoints, so both
modes behave the same and a test never reaches into another thread's state.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx

from loadtest.engine.host import EngineSpec, Host

_ROOT = Path(__file__).resolve().parents[2]


class SimFleet:
    """N simulated vLLM engines on free loopback ports. Use as ``with`` or ``async with``.

    ``kv_events``: ``None`` (off), ``"bind"`` (each engine binds a free PUB port and a replay
    port; connect a SUB to ``spec.kv_events``) or a ``tcp://127.0.0.1:P`` endpoint that a
    subscriber has bound (engines connect to it, topic ``kv-<http port>``).
    ``extra_args``: any further ``python -m loadtest engine`` options, e.g. ``["--decode-ms", "2"]``.
    """

    def __init__(
        self,
        n: int = 1,
        *,
        block_size: int = 16,
        cache_blocks: int = 2048,
        max_num_seqs: int = 64,
        zero: bool = True,
        model: str = "sim-model",
        loras: Sequence[str] = (),
        seed: int = 0,
        kv_events: str | None = None,
        kv_replay: bool = True,
        kv_bytes_hashes: bool = False,
        kv_positional: bool = False,
        extra_args: Sequence[str] = (),
        mode: Literal["thread", "process"] = "thread",
        start_timeout: float = 30.0,
    ) -> None:
        self.n = n
        self.mode = mode
        self.start_timeout = start_timeout
        argv = [
            "--port",
            "0",
            "--engines",
            str(n),
            "--block-size",
            str(block_size),
            "--cache-blocks",
            str(cache_blocks),
            "--max-num-seqs",
            str(max_num_seqs),
            "--model",
            model,
            "--seed",
            str(seed),
        ]
        for name in loras:
            argv += ["--lora", name]
        if zero:
            argv.append("--zero")
        if kv_events == "bind":
            argv += ["--kv-events-port", "0"]
            argv += ["--no-kv-replay"] if not kv_replay else ["--kv-replay-port", "0"]
        elif kv_events is not None:
            argv += ["--kv-events-connect", kv_events]
        if kv_bytes_hashes:
            argv.append("--kv-bytes-hashes")
        if kv_positional:
            argv.append("--kv-positional")
        self.argv = argv + list(extra_args)
        self.specs: list[EngineSpec] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._host: Host | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._http = httpx.Client(timeout=10.0, trust_env=False)

    # --- addresses -----------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.specs]

    def __getitem__(self, i: int) -> EngineSpec:
        return self.specs[i]

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> SimFleet:
        if self.mode == "process":
            self._start_process()
        else:
            self._start_thread()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        if self._loop is not None and self._host is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._host.request_stop)
            self._thread.join(15)
            self._loop = self._host = self._thread = None

    def kill(self) -> None:
        """SIGKILL the engines' process (process mode): every engine dies at once, mid-request."""
        if self.proc is None:
            raise RuntimeError("kill() needs mode='process'")
        self.proc.kill()
        self.proc.wait()

    def revive(self) -> None:
        """After ``kill()``: a new process on the same HTTP and event ports, empty, event seq at 0."""
        if self.mode != "process" or not self.specs:
            raise RuntimeError("revive() needs a started fleet with mode='process'")
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the engines' process is still running: kill() it first")
        argv = list(self.argv)

        def pin(option: str, ports: list[int]) -> None:
            value = ",".join(str(p) for p in ports)
            if option in argv:
                argv[argv.index(option) + 1] = value
            else:
                argv.extend([option, value])

        pin("--port", [spec.port for spec in self.specs])
        if all(spec.kv_events and not spec.kv_connect for spec in self.specs):
            pin("--kv-events-port", [_port(spec.kv_events) for spec in self.specs])
        if all(spec.kv_replay for spec in self.specs):
            pin("--kv-replay-port", [_port(spec.kv_replay) for spec in self.specs])
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._start_process(argv)

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._http.close()

    async def __aenter__(self) -> SimFleet:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.__exit__, t, e, tb)

    def _start_thread(self) -> None:
        from loadtest.engine.cli import build_parser, config_from_args, plan_from_args
        from loadtest.engine.faults import from_args

        args = build_parser().parse_args(self.argv)
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            host = Host(
                config_from_args(args),
                [0] * args.engines,
                host=args.host,
                events=plan_from_args(args),
                faults=from_args(args),
                tokenizer_dir=args.tokenizer,
            )
            try:
                self.specs = await host.start(self.start_timeout)
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            self._host, self._loop = host, asyncio.get_running_loop()
            ready.set()
            try:
                await host.wait()
            finally:
                await host.stop()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="sim-fleet", daemon=True)
        self._thread.start()
        if not ready.wait(self.start_timeout) or failure:
            raise RuntimeError(f"simulated fleet did not start: {failure[:1]}")

    def _start_process(self, argv: list[str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest", "engine", *(argv or self.argv)],
            stdout=subprocess.PIPE,
            env=env,
            cwd=str(_ROOT),
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("simulated engine process did not become ready")
                if sel.select(0.1):
                    line = self.proc.stdout.readline()
                    if line.startswith(b"{"):
                        ready = json.loads(line)
                        self.specs = [EngineSpec(**spec) for spec in ready["engines"]]
                        break
        for spec in self.specs:
            self._http.get(spec.url + "/health").raise_for_status()

    # --- controls (HTTP; sync and async) -----------------------------------------------------
    def cache(self, i: int) -> dict[int, dict[str, Any]]:
        """Engine i's cache right now: uint64 hash -> {digest, parent, token_ids, lora_name, ref_cnt}."""
        return _blocks(self._http.get(self.specs[i].url + "/sim/cache").raise_for_status().json())

    def stats(self, i: int) -> dict[str, Any]:
        """Requests, prompt/cached/generated tokens, busy seconds, running, waiting, event seq."""
        result: dict[str, Any] = self._http.get(self.specs[i].url + "/sim/stats").raise_for_status().json()
        return result

    def set_faults(self, i: int, **faults: Any) -> dict[str, Any]:
        """error_rate, error_status, hang, die_after_tokens, health_delay_s, health_fail."""
        result: dict[str, Any] = (
            self._http.post(self.specs[i].url + "/sim/faults", json=faults).raise_for_status().json()
        )
        return result

    def restart(self, i: int, downtime_s: float = 0.0) -> None:
        """Engine i restarts: empty cache, counters and event seq at 0, in-flight requests cut."""
        self._http.post(
            self.specs[i].url + "/sim/restart", params={"downtime_s": downtime_s}
        ).raise_for_status()

    def reset_prefix_cache(self, i: int) -> bool:
        ok: bool = (
            self._http.post(self.specs[i].url + "/reset_prefix_cache").raise_for_status().json()["reset"]
        )
        return ok

    async def acache(self, i: int) -> dict[int, dict[str, Any]]:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
            return _blocks((await client.get(self.specs[i].url + "/sim/cache")).raise_for_status().json())

    async def astats(self, i: int) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
            result: dict[str, Any] = (
                (await client.get(self.specs[i].url + "/sim/stats")).raise_for_status().json()
            )
            return result

    async def aset_faults(self, i: int, **faults: Any) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
            r = await client.post(self.specs[i].url + "/sim/faults", json=faults)
            result: dict[str, Any] = r.raise_for_status().json()
            return result

    async def arestart(self, i: int, downtime_s: float = 0.0) -> None:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
            r = await client.post(self.specs[i].url + "/sim/restart", params={"downtime_s": downtime_s})
            r.raise_for_status()


def _port(endpoint: str | None) -> int:
    assert endpoint is not None
    return int(endpoint.rsplit(":", 1)[1])


def _blocks(body: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(b["hash"]): b for b in body["blocks"]}
