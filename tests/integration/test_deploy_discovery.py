"""Kubernetes and DNS discovery against real servers.

No Kubernetes API server runs here (none can be installed on this machine), so these tests
serve a small stand-in for the two endpoints discovery uses, on a real uvicorn server:
``GET /api/v1/namespaces/{ns}/pods?labelSelector=...`` (a PodList) and the same with
``watch=true`` (a chunked stream of JSON lines ``{"type": ..., "object": pod}``, as the real
API server sends). The test scripts the pods' lives: added, turning Ready and unready, deleted,
and a watch that expires with 410 Gone so discovery must re-list.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from router.config import RouterConfig
from router.fleet.discovery import Discovery, pod_backend
from router.fleet.registry import Fleet
from router.index.memory import MemoryBlockIndex
from router.types import BackendId, BlockKey
from tests.support.servers import free_port, serving

TOKEN = "test-sa-token"


def pod(name: str, ip: str | None, *, ready: bool, phase: str = "Running", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}", "labels": {"app": "engine"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": phase,
                              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"kind": "Pod", "metadata": meta, "status": status}


class FakeKubeApi:
    """The list and watch endpoints of the pods resource; the test pushes watch events into ``events``."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.version = 100
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()  # None ends the current watch
        self.requests: list[tuple[str, dict[str, str], str]] = []  # (path, query, authorization)
        self.app = Starlette(routes=[Route("/api/v1/namespaces/{ns}/pods", self.pods_endpoint)])

    def bump(self, p: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        p["metadata"]["resourceVersion"] = str(self.version)
        return p

    def set_pod(self, p: dict[str, Any], event: str | None = "MODIFIED") -> None:
        self.pods[p["metadata"]["name"]] = self.bump(p)
        if event:
            self.events.put({"type": event, "object": p})

    def delete_pod(self, name: str) -> None:
        p = self.bump(self.pods.pop(name))
        self.events.put({"type": "DELETED", "object": p})

    async def pods_endpoint(self, request: Request) -> Response:
        query = dict(request.query_params)
        self.requests.append((request.url.path, query, request.headers.get("authorization", "")))
        if query.get("watch") != "true":
            body = {"kind": "PodList", "metadata": {"resourceVersion": str(self.version)},
                    "items": list(self.pods.values())}
            return Response(orjson.dumps(body), media_type="application/json")

        async def stream() -> AsyncIterator[bytes]:
            deadline = time.monotonic() + 20  # bounded, like the real server's timeoutSeconds
            while time.monotonic() < deadline:
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    await asyncio.sleep(0.01)
                    continue
                if event is None:
                    return
                yield orjson.dumps(event) + b"\n"

        return StreamingResponse(stream(), media_type="application/json")


class WatchedFleet:
    """The real Fleet (started: its probes go to the 127.0.0.x pod IPs, where nothing listens), with the
    app's wiring of ``on_removed`` to the index, so a removal visibly clears the replica's entries."""

    def __init__(self, config: RouterConfig) -> None:
        self.fleet = Fleet(config)
        self.index = MemoryBlockIndex()
        self.removed: list[str] = []
        self.fleet.on_removed(self._removed)

    async def _removed(self, backend_id: BackendId) -> None:
        self.removed.append(backend_id)
        await self.index.clear(backend_id)

    def routed(self) -> set[str]:
        return {b.id for b in self.fleet.backends() if not b.draining}

    def draining(self, bid: str) -> bool:
        b = self.fleet.get(BackendId(bid))
        return b is not None and b.draining


async def until(cond: Callable[[], bool], what: str, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def kube_api() -> Iterator[tuple[FakeKubeApi, str]]:
    api = FakeKubeApi()
    with serving(api.app) as server:
        yield api, server.url
        api.events.put(None)


@pytest.fixture
def sa_dir(tmp_path: Path) -> Path:
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "namespace").write_text("inference\n")
    return tmp_path


def kube_config(api_url: str, drain_timeout_s: float = 5.0) -> RouterConfig:
    # Pod IPs in these tests are 127.0.0.x: the real Fleet's probes stay on loopback (refused: no engine).
    return RouterConfig.model_validate({"discovery": {
        "kind": "kubernetes", "label_selector": "app=engine", "port": PORT, "api_server": api_url,
        "kv_events_port": 5557, "kv_replay_port": 5558, "drain_timeout_s": drain_timeout_s}})


PORT = free_port()
A, B, C, D = (f"http://127.0.0.{i}:{PORT}" for i in (11, 12, 13, 14))


@pytest.fixture
async def watched() -> AsyncIterator[Callable[[RouterConfig], WatchedFleet]]:
    fleets: list[WatchedFleet] = []

    def make(config: RouterConfig) -> WatchedFleet:
        fleets.append(WatchedFleet(config))
        return fleets[-1]

    yield make
    for w in fleets:
        await w.fleet.stop()


async def test_kubernetes_list_then_watch_routes_only_ready_pods(
        kube_api: tuple[FakeKubeApi, str], sa_dir: Path, watched: Callable[[RouterConfig], WatchedFleet]) -> None:
    api, url = kube_api
    api.set_pod(pod("a", "127.0.0.11", ready=True), event=None)
    api.set_pod(pod("b", "127.0.0.12", ready=False), event=None)
    api.set_pod(pod("c", None, ready=False, phase="Pending"), event=None)
    config = kube_config(url)
    w = watched(config)
    await w.fleet.start()
    disc = Discovery(config, w.fleet, service_account_dir=sa_dir)
    await disc.start()
    try:
        await asyncio.wait_for(disc.synced.wait(), 5)
        assert w.routed() == {A}
        assert disc.active == {A}
        # The list used the selector, the pod's namespace and its service-account token.
        path, query, auth = api.requests[0]
        assert path == "/api/v1/namespaces/inference/pods"
        assert query["labelSelector"] == "app=engine" and auth == f"Bearer {TOKEN}"
        await until(lambda: any(q.get("watch") == "true" for _, q, _ in api.requests), "a watch request")
        assert next(q for _, q, _ in api.requests if q.get("watch"))["resourceVersion"] == str(api.version)

        api.set_pod(pod("b", "127.0.0.12", ready=True))  # b turns Ready
        await until(lambda: w.routed() == {A, B}, "b added")
        api.set_pod(pod("c", "127.0.0.13", ready=True))  # c scheduled, running, Ready
        await until(lambda: w.routed() == {A, B, C}, "c added")

        # a holds index entries and a request in flight when it turns unready: drained at once
        # (no new requests), removed (and its entries cleared) only once the request finishes.
        await w.index.record(BackendId(A), [BlockKey(1), BlockKey(2)], ttl_s=None)
        w.fleet.acquire(BackendId(A))
        api.set_pod(pod("a", "127.0.0.11", ready=False))
        await until(lambda: w.draining(A), "a draining")
        assert A not in w.routed()
        await asyncio.sleep(0.3)
        assert A not in w.removed, "removed with a request in flight"
        assert (await w.index.sizes()).get(BackendId(A)) == 2
        w.fleet.release(BackendId(A), ok=True)
        await until(lambda: A in w.removed, "a removed after draining")
        assert w.fleet.get(BackendId(A)) is None
        assert BackendId(A) not in await w.index.sizes()

        # c is being deleted (terminating), then gone: drained and removed once.
        api.set_pod(pod("c", "127.0.0.13", ready=True, deleting=True))
        await until(lambda: C in w.removed, "terminating c removed")
        api.delete_pod("c")
        api.delete_pod("b")
        await until(lambda: B in w.removed, "deleted b removed")
        assert w.removed.count(C) == 1
        assert w.fleet.backends() == []
    finally:
        await disc.stop()


async def test_unready_then_ready_again_cancels_the_drain(
        kube_api: tuple[FakeKubeApi, str], sa_dir: Path, watched: Callable[[RouterConfig], WatchedFleet]) -> None:
    api, url = kube_api
    api.set_pod(pod("a", "127.0.0.11", ready=True), event=None)
    config = kube_config(url, drain_timeout_s=30)
    w = watched(config)
    disc = Discovery(config, w.fleet, service_account_dir=sa_dir)
    await disc.start()
    try:
        await asyncio.wait_for(disc.synced.wait(), 5)
        backend = w.fleet.get(BackendId(A))
        w.fleet.acquire(BackendId(A))  # a long stream keeps the drain waiting
        api.set_pod(pod("a", "127.0.0.11", ready=False))
        await until(lambda: w.draining(A), "a draining")
        api.set_pod(pod("a", "127.0.0.11", ready=True))
        await until(lambda: not w.draining(A), "a undrained")
        assert w.removed == [] and w.fleet.get(BackendId(A)) is backend
    finally:
        await disc.stop()


async def test_expired_watch_relists_and_reconciles(
        kube_api: tuple[FakeKubeApi, str], sa_dir: Path, watched: Callable[[RouterConfig], WatchedFleet]) -> None:
    api, url = kube_api
    api.set_pod(pod("a", "127.0.0.11", ready=True), event=None)
    api.set_pod(pod("b", "127.0.0.12", ready=True), event=None)
    config = kube_config(url)
    w = watched(config)
    disc = Discovery(config, w.fleet, service_account_dir=sa_dir)
    await disc.start()
    try:
        await asyncio.wait_for(disc.synced.wait(), 5)
        backend_a = w.fleet.get(BackendId(A))
        await until(lambda: any(q.get("watch") for _, q, _ in api.requests), "watching")
        # While the watch is down, b goes away and d arrives (changes the watch never carried).
        api.pods.pop("b")
        api.set_pod(pod("d", "127.0.0.14", ready=True), event=None)
        api.events.put({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}})
        await until(lambda: w.routed() == {A, D} and B in w.removed, "relisted")
        assert len([q for _, q, _ in api.requests if not q.get("watch")]) >= 2
        assert w.fleet.get(BackendId(A)) is backend_a  # a kept, not removed and re-added
    finally:
        await disc.stop()


async def test_api_down_keeps_the_last_known_replicas(
        sa_dir: Path, watched: Callable[[RouterConfig], WatchedFleet]) -> None:
    api = FakeKubeApi()
    api.set_pod(pod("a", "127.0.0.11", ready=True), event=None)
    server_cm = serving(api.app)
    server = server_cm.__enter__()
    config = kube_config(server.url)
    w = watched(config)
    disc = Discovery(config, w.fleet, service_account_dir=sa_dir)
    await disc.start()
    try:
        await asyncio.wait_for(disc.synced.wait(), 5)
        api.events.put(None)
        server_cm.__exit__(None, None, None)  # the API server goes away
        await asyncio.sleep(1.0)
        assert w.routed() == {A} and w.removed == []
    finally:
        await disc.stop()


async def test_dns_discovery_resolves_the_service_name(watched: Callable[[RouterConfig], WatchedFleet]) -> None:
    # "localhost" resolves from /etc/hosts: no network needed.
    config = RouterConfig.model_validate({"discovery": {"kind": "dns", "dns_name": "localhost", "port": PORT,
                                                        "interval_s": 0.1, "kv_events_port": 5557}})
    w = watched(config)
    disc = Discovery(config, w.fleet)
    await disc.start()
    try:
        await asyncio.wait_for(disc.synced.wait(), 5)
        url = f"http://127.0.0.1:{PORT}"
        assert url in w.routed()
        backend = w.fleet.get(BackendId(url))
        await asyncio.sleep(0.3)  # re-resolving the same records changes nothing
        assert w.fleet.get(BackendId(url)) is backend and w.removed == []
    finally:
        await disc.stop()


def test_pod_endpoints_derive_from_the_pod_ip() -> None:
    cfg = kube_config("http://127.0.0.1:1").discovery
    bcfg = pod_backend(pod("a", "10.1.2.3", ready=True), cfg)
    assert bcfg is not None
    assert (bcfg.url, bcfg.kv_events, bcfg.kv_replay) == (
        f"http://10.1.2.3:{PORT}", "tcp://10.1.2.3:5557", "tcp://10.1.2.3:5558")
    v6 = pod_backend(pod("b", "fd00::7", ready=True), cfg)
    assert v6 is not None and v6.url == f"http://[fd00::7]:{PORT}"
    assert pod_backend(pod("c", "10.1.2.4", ready=False), cfg) is None
    assert pod_backend(pod("d", "10.1.2.5", ready=True, deleting=True), cfg) is None
    assert pod_backend(pod("e", "10.1.2.6", ready=True, phase="Succeeded"), cfg) is None


def test_discovery_config_requires_its_fields() -> None:
    with pytest.raises(ValueError, match="label_selector"):
        RouterConfig.model_validate({"discovery": {"kind": "kubernetes", "port": 8000}})
    with pytest.raises(ValueError, match="dns_name"):
        RouterConfig.model_validate({"discovery": {"kind": "dns"}})


async def test_kubernetes_outside_a_pod_without_api_server_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = RouterConfig.model_validate({"discovery": {"kind": "kubernetes", "label_selector": "app=x", "port": 1}})
    with pytest.raises(RuntimeError, match="api_server"):
        await Discovery(config, Fleet(config)).start()
