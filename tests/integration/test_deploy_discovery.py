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

from router.config import BackendConfig, RouterConfig
from router.fleet.backend import Backend
from router.fleet.discovery import Discovery
from router.types import BackendId
from tests.support.servers import serving

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


class RecordingFleet:
    """Stand-in for the fleet's membership calls, recording them (the real Fleet is exercised elsewhere)."""

    def __init__(self) -> None:
        self.members: dict[BackendId, Backend] = {}
        self.calls: list[tuple[str, str]] = []
        self.configs: dict[BackendId, BackendConfig] = {}

    def add(self, cfg: BackendConfig) -> Backend:
        bid = BackendId(cfg.url)
        assert bid not in self.members, f"{bid} added twice"
        self.members[bid] = Backend(id=bid, url=cfg.url)
        self.configs[bid] = cfg
        self.calls.append(("add", bid))
        return self.members[bid]

    async def remove(self, backend_id: BackendId) -> None:
        self.members.pop(backend_id, None)
        self.calls.append(("remove", backend_id))

    def set_draining(self, backend_id: BackendId, draining: bool) -> None:
        if backend_id in self.members:
            self.members[backend_id].draining = draining
        self.calls.append(("drain" if draining else "undrain", backend_id))

    def get(self, backend_id: BackendId) -> Backend | None:
        return self.members.get(backend_id)

    def routed(self) -> set[str]:
        return {b for b, m in self.members.items() if not m.draining}


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
    return RouterConfig.model_validate({"discovery": {
        "kind": "kubernetes", "label_selector": "app=engine", "port": 8000, "api_server": api_url,
        "kv_events_port": 5557, "kv_replay_port": 5558, "drain_timeout_s": drain_timeout_s}})


async def test_kubernetes_list_then_watch_routes_only_ready_pods(kube_api: tuple[FakeKubeApi, str],
                                                                   sa_dir: Path) -> None:
    api, url = kube_api
    api.set_pod(pod("a", "10.0.0.1", ready=True), event=None)
    api.set_pod(pod("b", "10.0.0.2", ready=False), event=None)
    api.set_pod(pod("c", None, ready=False, phase="Pending"), event=None)
    fleet = RecordingFleet()
    disc = Discovery(kube_config(url), fleet, service_account_dir=sa_dir)
    await disc.start()
    try:
        await asyncio.wait_for(disc.synced.wait(), 5)
        assert fleet.routed() == {"http://10.0.0.1:8000"}
        cfg = fleet.configs[BackendId("http://10.0.0.1:8000")]
        assert (cfg.kv_events, cfg.kv_replay) == ("tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558")
        # The list used the selector, the pod's namespace and its service-account token.
        path, query, auth = api.requests[0]
        assert path == "/api/v1/namespaces/inference/pods"
        assert query["labelSelector"] == "app=engine" and auth == f"Bearer {TOKEN}"
        await until(lambda: any(q.get("watch") == "true" for _, q, _ in api.requests), "a watch request")
        assert next(q for _, q, _ in api.requests if q.get("watch"))["resourceVersion"] == str(api.version)

        api.set_pod(pod("b", "10.0.0.2", ready=True))  # b turns Ready
        await until(lambda: fleet.routed() == {"http://10.0.0.1:8000", "http://10.0.0.2:8000"}, "b added")

        api.set_pod(pod("c", "10.0.0.3", ready=True))  # c scheduled, running, Ready
        await until(lambda: "http://10.0.0.3:8000" in fleet.routed(), "c added")

        # a turns unready with a request in flight: drained at once, removed only when it finishes.
        fleet.members[BackendId("http://10.0.0.1:8000")].in_flight = 1
        api.set_pod(pod("a", "10.0.0.1", ready=False))
        await until(lambda: ("drain", "http://10.0.0.1:8000") in fleet.calls, "a draining")
        assert "http://10.0.0.1:8000" not in fleet.routed()
        await asyncio.sleep(0.3)
        assert ("remove", "http://10.0.0.1:8000") not in fleet.calls, "removed with a request in flight"
        fleet.members[BackendId("http://10.0.0.1:8000")].in_flight = 0
        await until(lambda: ("remove", "http://10.0.0.1:8000") in fleet.calls, "a removed after draining")

        # c is being deleted (terminating), then gone: drained and removed once.
        api.set_pod(pod("c", "10.0.0.3", ready=True, deleting=True))
        await until(lambda: ("remove", "http://10.0.0.3:8000") in fleet.calls, "terminating c removed")
        api.delete_pod("c")
        api.delete_pod("b")
        await until(lambda: "http://10.0.0.2:8000" not in fleet.members, "deleted b removed")
        assert fleet.calls.count(("remove", "http://10.0.0.3:8000")) == 1
        assert fleet.routed() == set()
    finally:
        await disc.stop()


async def test_unready_then_ready_again_cancels_the_drain(kube_api: tuple[FakeKubeApi, str],
                                                          sa_dir: Path) -> None:
    api, url = kube_api
    api.set_pod(pod("a", "10.0.0.1", ready=True), event=None)
    fleet = RecordingFleet()
    disc = Discovery(kube_config(url, drain_timeout_s=30), fleet, service_account_dir=sa_dir)
    await disc.start()
    try:
        await asyncio.wait_for(disc.synced.wait(), 5)
        bid = BackendId("http://10.0.0.1:8000")
        fleet.members[bid].in_flight = 2  # a long stream keeps the drain waiting
        api.set_pod(pod("a", "10.0.0.1", ready=False))
        await until(lambda: fleet.members[bid].draining, "a draining")
        api.set_pod(pod("a", "10.0.0.1", ready=True))
        await until(lambda: not fleet.members[bid].draining, "a undrained")
        assert ("remove", bid) not in fleet.calls and fleet.calls.count(("add", bid)) == 1
    finally:
        await disc.stop()


async def test_expired_watch_relists_and_reconciles(kube_api: tuple[FakeKubeApi, str], sa_dir: Path) -> None:
    api, url = kube_api
    api.set_pod(pod("a", "10.0.0.1", ready=True), event=None)
    api.set_pod(pod("b", "10.0.0.2", ready=True), event=None)
    fleet = RecordingFleet()
    disc = Discovery(kube_config(url), fleet, service_account_dir=sa_dir)
    await disc.start()
    try:
        await asyncio.wait_for(disc.synced.wait(), 5)
        await until(lambda: any(q.get("watch") for _, q, _ in api.requests), "watching")
        # While the watch is down, b goes away and d arrives (changes the watch never carried).
        api.pods.pop("b")
        api.set_pod(pod("d", "10.0.0.4", ready=True), event=None)
        api.events.put({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}})
        await until(lambda: fleet.routed() == {"http://10.0.0.1:8000", "http://10.0.0.4:8000"}, "relisted")
        lists = [q for _, q, _ in api.requests if not q.get("watch")]
        assert len(lists) >= 2
        assert fleet.calls.count(("add", "http://10.0.0.1:8000")) == 1  # a kept, not re-added
    finally:
        await disc.stop()


async def test_api_down_keeps_the_last_known_replicas(sa_dir: Path) -> None:
    api = FakeKubeApi()
    api.set_pod(pod("a", "10.0.0.1", ready=True), event=None)
    fleet = RecordingFleet()
    server_cm = serving(api.app)
    server = server_cm.__enter__()
    disc = Discovery(kube_config(server.url), fleet, service_account_dir=sa_dir)
    await disc.start()
    try:
        await asyncio.wait_for(disc.synced.wait(), 5)
        api.events.put(None)
        server_cm.__exit__(None, None, None)  # the API server goes away
        await asyncio.sleep(1.0)
        assert fleet.routed() == {"http://10.0.0.1:8000"}
        assert not any(c[0] in ("drain", "remove") for c in fleet.calls)
    finally:
        await disc.stop()


async def test_dns_discovery_resolves_the_service_name() -> None:
    # "localhost" resolves from /etc/hosts: no network needed.
    cfg = RouterConfig.model_validate({"discovery": {"kind": "dns", "dns_name": "localhost", "port": 8123,
                                                     "interval_s": 0.1}})
    fleet = RecordingFleet()
    disc = Discovery(cfg, fleet)
    await disc.start()
    try:
        await asyncio.wait_for(disc.synced.wait(), 5)
        assert "http://127.0.0.1:8123" in fleet.routed()
        await asyncio.sleep(0.3)  # re-resolving the same records changes nothing
        assert fleet.calls.count(("add", "http://127.0.0.1:8123")) == 1
    finally:
        await disc.stop()


def test_discovery_config_requires_its_fields() -> None:
    with pytest.raises(ValueError, match="label_selector"):
        RouterConfig.model_validate({"discovery": {"kind": "kubernetes", "port": 8000}})
    with pytest.raises(ValueError, match="dns_name"):
        RouterConfig.model_validate({"discovery": {"kind": "dns"}})
