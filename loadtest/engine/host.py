"""Many simulated engines in one process: one uvicorn server per engine, all in one event loop.

Why one loop: a 2-core machine cannot afford a process (and an interpreter) per engine
for a fleet of 8-16; the engines are cheap coroutines, so they share the loop and one
ZMQ context. Ports are bound up front (0 = any free port), so the addresses are known
before serving and can be announced in one ready line.

It owns sockets, servers and shutdown; engines own their state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvicorn
import zmq.asyncio

from loadtest.engine.app import EngineApp
from loadtest.engine.engine import SIM_MODEL_DIR, Engine, EngineConfig, Vocabulary
from loadtest.engine.events import EventPublisher, EventsConfig
from loadtest.engine.faults import Faults
from router.hashing.tokenizer import ModelTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventsPlan:
    """How the fleet publishes KV events. ``ports``/``replay_ports``: 0 = a free port."""

    ports: list[int] = field(default_factory=list)  # bind mode: one PUB port per engine
    connect: str | None = None  # connect mode: every engine connects here with its own topic
    replay_ports: list[int] = field(default_factory=list)  # empty: no replay socket
    bind_host: str = "127.0.0.1"  # "*" as vLLM's default endpoint
    topic_prefix: str | None = (
        None  # topic = prefix + HTTP port; None: "" when binding, "kv-" when connecting
    )
    int_hashes: bool = True
    positional: bool = False


@dataclass(frozen=True)
class EngineSpec:
    """Where to reach one engine (also the ready line's schema)."""

    index: int
    url: str
    port: int
    kv_events: str | None  # the PUB endpoint to connect to (bind mode) or the subscriber's (connect mode)
    kv_connect: bool  # True: the engine connects to ``kv_events``; the subscriber binds it
    kv_replay: str | None
    kv_topic: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class _Server(uvicorn.Server):
    # Several servers share one loop, so signals are the host's job, not each server's.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class Host:
    """N engines on ``ports`` (0 = any free port). ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        config: EngineConfig,
        ports: list[int],
        *,
        host: str = "127.0.0.1",
        events: EventsPlan | None = None,
        faults: Faults | None = None,
        tokenizer_dir: str | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self.events = events
        self._ports = ports
        self._faults = faults or Faults()
        self._dir = tokenizer_dir or str(SIM_MODEL_DIR)
        self.engines: list[Engine] = []
        self.specs: list[EngineSpec] = []
        self._servers: list[_Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._ctx: zmq.asyncio.Context | None = None

    async def start(self, start_timeout: float = 20.0) -> list[EngineSpec]:
        tokenizer = ModelTokenizer.from_dir(self._dir)
        vocab = Vocabulary(Path(self._dir))
        self._ctx = zmq.asyncio.Context()
        sockets = [_bind(self.host, p) for p in self._ports]
        for i, sock in enumerate(sockets):
            port = int(sock.getsockname()[1])
            publisher = self._publisher(i, port)
            faults = Faults(**self._faults.to_dict())
            engine = Engine(self.config, vocab, publisher, faults)
            self.engines.append(engine)
            self.specs.append(
                EngineSpec(
                    index=i,
                    url=f"http://{self._client_host()}:{port}",
                    port=port,
                    kv_events=publisher.endpoint if publisher else None,
                    kv_connect=bool(publisher and publisher.config.connect),
                    kv_replay=publisher.replay_endpoint if publisher else None,
                    kv_topic=publisher.config.topic if publisher else "",
                )
            )
            cfg = uvicorn.Config(
                EngineApp(engine, tokenizer).app,
                lifespan="off",
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=1,
                timeout_keep_alive=30,
            )
            server = _Server(cfg)
            self._servers.append(server)
            self._tasks.append(
                asyncio.get_running_loop().create_task(
                    server.serve(sockets=[sock]), name=f"sim-engine {port}"
                )
            )
        deadline = asyncio.get_running_loop().time() + start_timeout
        while not all(s.started for s in self._servers):
            if any(t.done() for t in self._tasks) or asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise RuntimeError("simulated engines did not start")
            await asyncio.sleep(0.01)
        return self.specs

    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "*") else self.host

    def _publisher(self, i: int, port: int) -> EventPublisher | None:
        plan = self.events
        if plan is None or (not plan.ports and plan.connect is None):
            return None
        assert self._ctx is not None
        prefix = plan.topic_prefix if plan.topic_prefix is not None else ("kv-" if plan.connect else None)
        topic = f"{prefix}{port}" if prefix is not None else ""
        if plan.connect is not None:
            endpoint = plan.connect
        else:
            endpoint = f"tcp://{plan.bind_host}:{plan.ports[i] or '*'}"
        replay = None
        if plan.replay_ports:
            replay = f"tcp://{plan.bind_host}:{plan.replay_ports[i] or '*'}"
        cfg = EventsConfig(
            endpoint=endpoint,
            connect=plan.connect is not None,
            replay_endpoint=replay,
            topic=topic,
            int_hashes=plan.int_hashes,
            positional=plan.positional,
        )
        publisher = EventPublisher(cfg, self.config.block_size, self._ctx)
        publisher.start()
        return publisher

    def idle(self) -> bool:
        """No engine runs or queues a request."""
        return all(e.scheduler.num_running == 0 and e.scheduler.num_waiting == 0 for e in self.engines)

    def request_stop(self) -> None:
        for server in self._servers:
            server.should_exit = True

    async def wait(self) -> None:
        """Until every server stopped (a signal, or ``request_stop``)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        self.request_stop()
        await self.wait()
        for engine in self.engines:
            if engine.publisher is not None:
                await engine.publisher.stop()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        log.info("simulated engines stopped")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
