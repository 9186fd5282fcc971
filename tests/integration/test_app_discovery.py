"""The router as shipped routes to what Kubernetes discovery finds, and stops routing to a pod
that goes away. No API server runs here: the list-and-watch stand-in of the discovery tests
serves the pods, and a real simulated engine on 127.0.0.1 is the pod behind them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from loadtest.engine import SimFleet
from router.config import RouterConfig
from tests.integration.test_deploy_discovery import FakeKubeApi, pod
from tests.support.router import running_router
from tests.support.servers import serving


async def _until_status(client: httpx.AsyncClient, url: str, status: int, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while (await client.get(url)).status_code != status:
        assert time.monotonic() < deadline, f"{url} never answered {status}"
        await asyncio.sleep(0.05)


async def test_router_follows_kubernetes_pods(sim_model_dir: Path) -> None:
    api = FakeKubeApi()
    with SimFleet(1) as engines, serving(api.app) as kube:
        port = int(engines.urls[0].rsplit(":", 1)[1])
        api.set_pod(pod("engine-0", "127.0.0.1", ready=True), event=None)
        config = RouterConfig.model_validate({
            "tokenizer": str(sim_model_dir),
            "discovery": {"kind": "kubernetes", "label_selector": "app=engine", "namespace": "inference",
                          "port": port, "api_server": kube.url, "drain_timeout_s": 1.0}})
        with running_router(config=config) as router:
            async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
                body = {"model": "sim-model", "prompt": "hello " * 50, "max_tokens": 2}
                r = await client.post(f"{router.url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.headers["x-cache-router-backend"] == f"http://127.0.0.1:{port}"
                api.delete_pod("engine-0")
                await _until_status(client, f"{router.url}/ready", 503)
                r = await client.post(f"{router.url}/v1/completions", json=body)
                assert r.status_code in (404, 503) and "error" in r.json()
        api.events.put(None)
