"""Waiting until a router has applied every KV-event batch a real engine has published.

The engine's replay socket tells its latest sequence number (``[b"", start]`` -> one
``[b"", topic, seq, payload]`` per buffered batch, then seq -1); the replica's applier
tells the next sequence number it expects. Equal means the router's index reflects
everything the engine did so far. Blocking zmq: for tests that drive a router running
in its own thread (``running_router``), never from a coroutine.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from router.events.applier import ReplicaApplier
from router.events.ingest import EventIngest

END_SEQ = b"\xff" * 8
PUBLISH_WAIT_S = 0.1  # the engine publishes a step's events from its own thread, just after answering
SETTLE_TIMEOUT_S = 15.0


def replay_next_seq(endpoint: str, start: int, timeout_s: float = 5.0) -> int:
    """The sequence number after the engine's latest buffered batch (``start`` if none is newer)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart([b"", start.to_bytes(8, "big")])
        latest = start
        while True:
            if not sock.poll(int(timeout_s * 1000)):
                raise TimeoutError(f"the engine's replay socket {endpoint} did not answer")
            frames = sock.recv_multipart()
            seq = frames[-2]  # [b"", topic, seq, payload]; older vLLM: [b"", seq, payload]
            if seq == END_SEQ:
                return latest
            latest = max(latest, int.from_bytes(seq, "big") + 1)
    finally:
        sock.close()


class EngineSync:
    def __init__(self, replay_endpoint: str, applier: ReplicaApplier) -> None:
        self.replay_endpoint = replay_endpoint
        self.applier = applier
        self.next_seq = 0

    def settle(self) -> None:
        time.sleep(PUBLISH_WAIT_S)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            self.next_seq = replay_next_seq(self.replay_endpoint, self.next_seq)
            if self.applier.state.expected == self.next_seq:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"router expects seq {self.applier.state.expected}, engine published up to {self.next_seq - 1}"
                )
            time.sleep(0.02)

    def engine_restarted(self) -> None:
        self.next_seq = 0


def ingest_of(app: Any) -> EventIngest:
    """The EventIngest a running ``create_app`` app started.

    ``app.state.ingest`` if the app exposes it; otherwise found through the fleet's restart
    callbacks, the one place the lifespan leaves it reachable (asked the gateway to expose it).
    """
    ingest = getattr(app.state, "ingest", None)
    if isinstance(ingest, EventIngest):
        return ingest
    fleet = app.state.pipeline.fleet
    for callback in getattr(fleet, "_on_restart", []):
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, EventIngest):
            return owner
    raise AssertionError("the router started no EventIngest (precise mode not configured?)")
