"""Replica discovery: keeps the fleet's membership in step with where the engines run.

Owns one background task per router that turns ``config.discovery`` into fleet changes:

- ``static``: nothing to do; the fleet serves ``config.backends`` as configured.
- ``dns``: the A/AAAA records of a headless service, resolved every ``interval_s``.
- ``kubernetes``: pods matched by ``label_selector``, listed then WATCHED through the API
  server (plain httpx, the pod's service-account token and CA), re-listed when the watch
  expires (410 Gone) or breaks.

Only Ready pods are routed to. A replica that disappears or turns unready is drained
(``fleet.set_draining``: no new requests), then removed once its in-flight requests finish
or ``drain_timeout_s`` passes (``fleet.remove``: the fleet's ``on_removed`` callbacks clear
its index entries). A replica that becomes Ready again while draining is simply un-drained.
A failed DNS resolve or API call never empties the fleet: the last known set is kept.

It does not probe health, scrape load or learn models: the fleet does, for every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson

from router.config import BackendConfig, DiscoveryConfig, RouterConfig
from router.fleet.backend import Backend
from router.tasks import cancel_and_wait
from router.types import BackendId

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_WATCH_TIMEOUT_S = 290  # the API server ends a watch after this; we re-watch from the last resourceVersion
_RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # backoff after failed API calls, capped at the last value


class FleetMembership(Protocol):
    """The part of ``router.fleet.registry.Fleet`` discovery needs."""

    def add(self, cfg: BackendConfig) -> Backend: ...

    async def remove(self, backend_id: BackendId) -> None: ...

    def set_draining(self, backend_id: BackendId, draining: bool) -> None: ...

    def get(self, backend_id: BackendId) -> Backend | None: ...


def pod_backend(pod: Mapping[str, Any], cfg: DiscoveryConfig) -> BackendConfig | None:
    """The BackendConfig of a pod that should receive traffic, or None (not Ready, terminating, no IP)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return endpoint_backend(ip, cfg) if ready else None


def endpoint_backend(ip: str, cfg: DiscoveryConfig) -> BackendConfig:
    """A replica at ``ip``: HTTP on ``port``, KV events and replay on the pod's own ports if configured."""
    host = f"[{ip}]" if ":" in ip else ip
    return BackendConfig(
        url=f"http://{host}:{cfg.port}",
        kv_events=f"tcp://{host}:{cfg.kv_events_port}" if cfg.kv_events_port else None,
        kv_replay=f"tcp://{host}:{cfg.kv_replay_port}" if cfg.kv_replay_port else None,
    )


class Discovery:
    """Runs the configured discovery kind as one named background task."""

    def __init__(self, config: RouterConfig, fleet: FleetMembership, *,
                 service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> None:
        self.cfg = config.discovery
        self.fleet = fleet
        self.sa_dir = service_account_dir
        self._task: asyncio.Task[None] | None = None
        self._active: dict[BackendId, str] = {}  # replica -> identity (pod uid, or the IP for DNS)
        self._drains: dict[BackendId, asyncio.Task[None]] = {}
        self._removing: set[BackendId] = set()  # drains past their wait, inside fleet.remove
        self._pods: dict[str, tuple[str, BackendConfig]] = {}  # pod name -> (uid, config) of Ready pods
        self.synced = asyncio.Event()
        """Set once the first full list (or resolve) has been applied; tests and readiness wait on it."""

    @property
    def active(self) -> set[BackendId]:
        """Replicas discovery routes to (added, not draining)."""
        return set(self._active)

    async def start(self) -> None:
        if self.cfg.kind == "static" or self._task is not None:
            self.synced.set()
            return
        if self.cfg.kind == "dns":
            self._task = asyncio.create_task(self._run_dns(), name="discovery-dns")
        else:
            # Built here so a router that cannot reach the API at all (outside a pod, no api_server)
            # fails at start instead of serving an empty fleet.
            client = await self._kube_client()
            self._task = asyncio.create_task(self._run_kubernetes(client), name="discovery-kubernetes")
        self._task.add_done_callback(_log_end)

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._drains.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(task, return_exceptions=True)
        self._task = None
        self._drains.clear()
        log.info("discovery stopped (%s)", self.cfg.kind)

    # --- reconciling the desired set with the fleet -------------------------------------------
    async def _apply(self, desired: Mapping[BackendId, tuple[str, BackendConfig]]) -> None:
        """Make the routed set equal ``desired`` (replica -> (identity, config))."""
        for bid, (ident, bcfg) in desired.items():
            if bid in self._active and self._active[bid] != ident:
                # The same IP now belongs to another pod: the old cache went with the old pod.
                log.info("discovery: %s is a new pod, replacing the old one", bid)
                self._active.pop(bid)
                await self._cancel_drain(bid)
                await self.fleet.remove(bid)
            if bid in self._active:
                continue
            task = self._drains.get(bid)
            if task is not None and not task.done() and bid not in self._removing:
                await self._cancel_drain(bid)
                self.fleet.set_draining(bid, False)
                log.info("discovery: %s ready again, drain cancelled", bid)
            else:
                if task is not None and not task.done():
                    await asyncio.shield(task)  # let the removal finish, then add it anew
                self.fleet.add(bcfg)
                log.info("discovery: added %s", bid)
            self._active[bid] = ident
        for bid in [b for b in self._active if b not in desired]:
            self._active.pop(bid)
            self._start_drain(bid)
        self.synced.set()

    def _start_drain(self, bid: BackendId) -> None:
        self.fleet.set_draining(bid, True)
        log.info("discovery: draining %s (gone or not ready)", bid)
        self._drains[bid] = asyncio.create_task(self._drain(bid), name=f"discovery-drain-{bid}")

    async def _cancel_drain(self, bid: BackendId) -> None:
        task = self._drains.pop(bid, None)
        if task is not None and not task.done():
            await cancel_and_wait(task)

    async def _drain(self, bid: BackendId) -> None:
        """Wait for the replica's in-flight requests to finish (up to drain_timeout_s), then remove it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.drain_timeout_s
        while loop.time() < deadline:
            backend = self.fleet.get(bid)
            if backend is None or backend.in_flight <= 0:
                break
            await asyncio.sleep(0.1)
        self._removing.add(bid)
        try:
            await self.fleet.remove(bid)
            log.info("discovery: removed %s", bid)
        finally:
            self._removing.discard(bid)
            if self._drains.get(bid) is asyncio.current_task():
                del self._drains[bid]

    # --- DNS (headless service) ---------------------------------------------------------------
    async def _run_dns(self) -> None:
        assert self.cfg.dns_name is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    infos = await loop.getaddrinfo(self.cfg.dns_name, self.cfg.port, type=socket.SOCK_STREAM)
                    ips = sorted({str(info[4][0]) for info in infos})
                    desired = {}
                    for ip in ips:
                        bcfg = endpoint_backend(ip, self.cfg)
                        desired[BackendId(bcfg.url)] = (ip, bcfg)
                    await self._apply(desired)
                except OSError as exc:
                    log.warning("discovery: cannot resolve %s (%s); keeping %d replicas",
                                self.cfg.dns_name, exc, len(self._active))
                await asyncio.sleep(self.cfg.interval_s)
        except asyncio.CancelledError:
            log.info("discovery: dns task cancelled")
            raise

    # --- Kubernetes: list, then watch -----------------------------------------------------------
    async def _run_kubernetes(self, client: httpx.AsyncClient) -> None:
        failures = 0
        try:
            async with client:
                namespace = self.cfg.namespace or await self._read_sa("namespace") or "default"
                path = f"/api/v1/namespaces/{namespace}/pods"
                while True:
                    try:
                        version = await self._list(client, path)
                        failures = 0
                        while version is not None:
                            version = await self._watch(client, path, version)
                        log.info("discovery: watch expired, re-listing pods")
                    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                        delay = _RETRY_S[min(failures, len(_RETRY_S) - 1)]
                        failures += 1
                        log.warning("discovery: kubernetes API error (%s: %s); keeping %d replicas, retry in %.1fs",
                                    type(exc).__name__, exc, len(self._active), delay)
                        await asyncio.sleep(delay)
        except asyncio.CancelledError:
            log.info("discovery: kubernetes task cancelled")
            raise

    async def _kube_client(self) -> httpx.AsyncClient:
        base = self.cfg.api_server
        if base is None:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise RuntimeError("discovery.kind=kubernetes outside a pod: set discovery.api_server")
            base = f"https://{host}:{port}"
        ca = self.sa_dir / "ca.crt"
        verify: ssl.SSLContext | bool = True
        if base.startswith("https") and await asyncio.to_thread(ca.exists):
            verify = await asyncio.to_thread(ssl.create_default_context, cafile=str(ca))
        timeout = httpx.Timeout(10.0, read=_WATCH_TIMEOUT_S + 30.0)
        return httpx.AsyncClient(base_url=base, verify=verify, timeout=timeout, trust_env=False)

    async def _read_sa(self, name: str) -> str | None:
        try:
            return (await asyncio.to_thread((self.sa_dir / name).read_text)).strip()
        except OSError:
            return None

    async def _headers(self) -> dict[str, str]:
        # Re-read per request: projected service-account tokens rotate while the pod runs.
        token = await self._read_sa("token")
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _list(self, client: httpx.AsyncClient, path: str) -> str:
        resp = await client.get(path, params={"labelSelector": self.cfg.label_selector or ""},
                                headers=await self._headers())
        resp.raise_for_status()
        body = orjson.loads(resp.content)
        self._pods.clear()
        for pod in body.get("items") or []:
            self._track(pod)
        await self._apply_pods()
        return str(body["metadata"]["resourceVersion"])

    async def _watch(self, client: httpx.AsyncClient, path: str, version: str) -> str | None:
        """Apply watch events until the stream ends; the version to resume from, or None to re-list."""
        params = {"labelSelector": self.cfg.label_selector or "", "watch": "true", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(_WATCH_TIMEOUT_S)}
        async with client.stream("GET", path, params=params, headers=await self._headers()) as resp:
            if resp.status_code == 410:
                return None
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                event = orjson.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    # 410 Gone: our version is too old to resume from; anything else: re-list too.
                    log.info("discovery: watch error %s", obj.get("message") or obj.get("code"))
                    return None
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    self._pods.pop(str(obj["metadata"]["name"]), None)
                else:
                    self._track(obj)
                await self._apply_pods()
        return version

    def _track(self, pod: Mapping[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        bcfg = pod_backend(pod, self.cfg)
        if bcfg is None:
            self._pods.pop(str(meta.get("name")), None)
        else:
            self._pods[str(meta.get("name"))] = (str(meta.get("uid") or meta.get("name")), bcfg)

    async def _apply_pods(self) -> None:
        await self._apply({BackendId(bcfg.url): (uid, bcfg) for uid, bcfg in self._pods.values()})


def _log_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("discovery task %s died: %r; the fleet keeps its last replicas", task.get_name(),
                  task.exception())
