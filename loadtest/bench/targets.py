"""The processes a router benchmark drives: nginx (backend and proxy), cache-router,
sglang-router, redis-server, and simulated engines. Each is a context manager that yields
its base URL once it answers, and stops its process on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtest.bench.procs import Proc, free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent.parent
MODEL_DIR = ROOT / "loadtest" / "models" / "sim-model"
SGLANG_VENV = ROOT / ".venv-bench"

REPLY = json.dumps({
    "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "sim-model",
    "choices": [{"index": 0, "text": " ok", "finish_reason": "length", "logprobs": None}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
})
"""No ``prompt_tokens_details``, as from an engine without ``--enable-prompt-tokens-details``:
a fixed ``cached_tokens: 0`` would make every request a stale hit for cache-router (drop the
prompt's keys, record them again), work that a caching engine never causes."""
MODELS = json.dumps({"object": "list", "data": [{"id": "sim-model", "object": "model", "owned_by": "bench"}]})

ROUTER_CONFIG = "log_decisions: false\n"
"""The benchmark's router config: no per-request decision log line, like the other
proxies here (nginx runs with access_log off, sglang-router at log level warn)."""


def nginx_conf(tmp: Path, backend_port: int, proxies: dict[int, str]) -> Path:
    """nginx answering every POST on ``backend_port`` with REPLY, plus one keep-alive proxy
    per ``{listen port: upstream host:port}``."""
    upstreams = "".join(f"  upstream up{port} {{ server {target}; keepalive 256; }}\n"
                        for port, target in proxies.items())
    servers = "".join(f"""  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      proxy_pass http://up{port};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
""" for port in proxies)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_max_body_size 64m;
  client_body_buffer_size 1m;
{upstreams}  server {{
    listen 127.0.0.1:{backend_port} reuseport;
    default_type application/json;
    location = /health {{ return 200 'ok'; }}
    location = /v1/models {{ return 200 '{MODELS}'; }}
    location = /metrics {{ default_type text/plain; return 200 ''; }}
    location / {{ return 200 '{REPLY}'; }}
  }}
{servers}}}
""")
    return conf


@contextmanager
def nginx_proc(tmp: Path, backend_port: int, proxies: dict[int, str]) -> Iterator[str]:
    conf = nginx_conf(tmp, backend_port, proxies)
    with Proc([shutil.which("nginx") or "nginx", "-c", str(conf), "-p", str(tmp)]) as p:
        url = f"http://127.0.0.1:{backend_port}"
        wait_http(f"{url}/health", proc=p, timeout=10)
        yield url


@contextmanager
def router_proc(backend: str, *extra: str, tmp: Path, config: Path | None = None) -> Iterator[tuple[str, Proc, str]]:
    """cache-router serve in its own process (the benchmark's config, then ``config``'s YAML, plus flags);
    yields its URL, its process and the URL of its liveness port's /health (``--health-port``)."""
    port, health_port = free_port(), free_port()
    merged = tmp / f"router-{port}.yaml"
    merged.write_text(ROUTER_CONFIG + (config.read_text() if config is not None else ""))
    args = [sys.executable, "-m", "router", "serve", "--config", str(merged), "--host", "127.0.0.1",
            "--port", str(port), "--backend", backend, "--tokenizer", str(MODEL_DIR), "--block-size", "16",
            "--log-level", "warning", "--health-port", str(health_port), *extra]
    with Proc(args, env=dict(os.environ)) as p:
        wait_http(f"http://127.0.0.1:{port}/ready", proc=p, timeout=60)
        yield f"http://127.0.0.1:{port}", p, f"http://127.0.0.1:{health_port}/health"


@contextmanager
def sglang_proc(backend: str) -> Iterator[tuple[str, Proc] | None]:
    """sglang-router (``cache_aware``) from ``.venv-bench``, given the project's tokenizer
    directory (it cannot download one here); None when it is not installed."""
    exe = SGLANG_VENV / "bin" / "python"
    if not exe.exists():
        yield None
        return
    port = free_port()
    args = [str(exe), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", backend, "--policy", "cache_aware", "--tokenizer-path", str(MODEL_DIR),
            "--log-level", "warn", "--prometheus-port", str(free_port())]
    with Proc(args) as p:
        wait_http(f"http://127.0.0.1:{port}/health", proc=p, timeout=60)
        yield f"http://127.0.0.1:{port}", p


@contextmanager
def redis_proc() -> Iterator[str]:
    port = free_port()
    with Proc(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]):
        time.sleep(0.3)
        yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def sim_engine() -> Iterator[str]:
    """One simulated vLLM engine in zero-delay mode, in its own process (its own GIL)."""
    from loadtest.engine import SimFleet

    with SimFleet(1, zero=True, mode="process", max_num_seqs=1024, cache_blocks=65536) as fleet:
        yield fleet.urls[0]
