"""``cache-router`` on the command line: check-config verdicts, serve with flags over a file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import SIM_MODEL
from tests.support.router import ADMIN_ENV, HTTP, scripted_engines
from tests.support.servers import env_without_proxies, free_port

SECRET = "zebra quartz marmalade"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", *args], capture_output=True, text=True, timeout=60,
                          env=env_without_proxies())


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    cfg = tmp_path / "router.yaml"
    cfg.write_text("port: 9000\npolicy: least_load\nblock_size: 32\nbackends:\n  - url: http://127.0.0.1:8001/\n")
    done = _cli("check-config", str(cfg))
    assert done.returncode == 0, done.stderr
    assert "least_load" in done.stdout and "http://127.0.0.1:8001" in done.stdout


def test_check_config_rejects_unknown_keys_and_bad_yaml(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("polcy: cache_aware\n")
    done = _cli("check-config", str(typo))
    assert done.returncode == 1 and "polcy" in done.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("backends: [\n")
    assert _cli("check-config", str(broken)).returncode == 1
    assert _cli("check-config", str(tmp_path / "missing.yaml")).returncode == 1


def test_serve_flags_override_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "router.yaml"
    cfg.write_text("policy: round_robin\nport: 1\nbackends:\n  - url: http://127.0.0.1:9\n"
                   f"auth:\n  admin_token_env: {ADMIN_ENV}\n")
    port = free_port()
    with scripted_engines(1) as (engine,):
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--config", str(cfg), "--port", str(port),
             "--backend", engine.url, "--tokenizer", str(SIM_MODEL), "--policy", "least_load"],
            env=env_without_proxies(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while True:
                try:
                    if HTTP.get(url + "/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "router did not start"
                time.sleep(0.1)
            resp = HTTP.post(url + "/v1/completions", json={"model": "sim-model", "prompt": SECRET}, timeout=10)
            assert resp.headers["x-cache-router-backend"] == engine.url  # --backend replaced the file's list
            plan = HTTP.post(url + "/debug/route", json={"model": "sim-model", "prompt": "hi"}).json()
            assert plan["policy"] == "least_load" and plan["approximate"] is False
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=20)
        assert proc.returncode in (0, -15), out  # uvicorn re-raises SIGTERM after a clean shutdown
        assert "Application shutdown complete" in out
        assert '"model":"sim-model"' in out  # the decision log line is there...
        assert SECRET not in out  # ...without the prompt


def test_environment_configures_the_router_and_secrets_stay_out_of_summaries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from router.cli import _parser, config_from_args, redacted, summary

    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9100\nbackends:\n  - url: http://127.0.0.1:9\n")
    monkeypatch.setenv("CACHE_ROUTER_CONFIG", str(cfg))
    monkeypatch.setenv("CACHE_ROUTER_REDIS_URL", "redis://:hunter2@redis.example:6379/0")
    config = config_from_args(_parser().parse_args(["serve"]))
    assert config.port == 9100 and config.redis_url == "redis://:hunter2@redis.example:6379/0"
    assert "hunter2" not in summary(config) and "***" in summary(config)
    flagged = config_from_args(_parser().parse_args(["serve", "--redis-url", "redis://127.0.0.1:1/0"]))
    assert flagged.redis_url == "redis://127.0.0.1:1/0"  # a flag wins over the environment
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
