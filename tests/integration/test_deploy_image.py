"""The image's start-up path, run for real without Docker (no engine here): the Dockerfile's
ENTRYPOINT command line and HEALTHCHECK command, taken from the Dockerfile itself, start the
router from CACHE_ROUTER_CONFIG with extra arguments appended the way the Helm chart passes the
Redis URL; SIGTERM stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from loadtest.engine import SimFleet
from tests.conftest import ROOT, SIM_MODEL
from tests.support.servers import RedisServer, env_without_proxies, free_port
from tests.unit.test_deploy_manifests import stages


def test_entrypoint_and_healthcheck_start_the_router_from_the_mounted_config(
        tmp_path: Path, redis_server: RedisServer) -> None:
    runtime = dict(stages()[-1])
    entrypoint = json.loads(runtime["ENTRYPOINT"])
    health = json.loads(runtime["HEALTHCHECK"].split(" CMD ", 1)[1])
    port = free_port()
    with SimFleet(1) as fleet:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": port, "tokenizer": str(SIM_MODEL),
                                          "backends": [{"url": fleet.urls[0]}],
                                          "index": {"namespace": f"img{port}", "deadline_ms": 500}}))
        env = env_without_proxies()
        env["CACHE_ROUTER_CONFIG"] = str(config)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # As in the chart: args appended to `serve`, the Redis URL expanded from the environment.
        proc = subprocess.Popen([*entrypoint, "--redis-url", redis_server.url], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            check = [sys.executable if a == "python" else a.replace("8080", str(port)) for a in health]
            deadline = time.monotonic() + 30
            while subprocess.run(check, env=env, capture_output=True, timeout=10).returncode != 0:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                assert time.monotonic() < deadline, "HEALTHCHECK never passed"
                time.sleep(0.2)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 15
            while httpx.get(url + "/ready", timeout=5, trust_env=False).status_code != 200:
                assert time.monotonic() < deadline, "never ready"
                time.sleep(0.1)
            resp = httpx.post(url + "/v1/completions", json={"model": "sim-model", "prompt": "hello " * 100, "max_tokens": 4},
                              timeout=30, trust_env=False)
            assert resp.status_code == 200, resp.text
            # The router used the Redis URL given as an argument: its index keys are in that Redis.
            # (Writes are group-committed after the answer: poll briefly.)
            deadline = time.monotonic() + 10
            while not subprocess.run(["redis-cli", "-p", str(redis_server.port), "--scan", "--pattern", f"img{port}:*"],
                                     capture_output=True, text=True, timeout=10).stdout.split():
                assert time.monotonic() < deadline, "no index keys in the Redis named by --redis-url"
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            log = proc.stdout.read().decode() if proc.stdout else ""
            print(log[-4000:])  # shown when the test fails
        # exec: the router itself got SIGTERM (not a shell that ignores it) and shut down cleanly;
        # uvicorn re-raises the signal after its graceful shutdown, hence -SIGTERM as the exit status.
        assert code in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log
