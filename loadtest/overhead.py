"""Router overhead: wrk against the fastest possible backend, direct and through proxies.

``python -m loadtest overhead`` starts nginx answering every POST with a fixed completion
body (the fastest backend there is), then drives it with wrk (a Lua script posting
completion or chat requests whose prompts share a long prefix and end in a unique tail)
directly, through an nginx proxy, through cache-router (in-process index, Redis index) and
through sglang-router (``cache_aware``) when it is installed. Each cell is the median of
``--repeats`` runs; ratios are to the nginx proxy of the same run. Loopback only; every run
is bounded by ``--duration``.

nginx and wrk come from Debian's packages (installed with apt-get when missing and root);
sglang-router from PyPI into ``.venv-bench`` (``--install-sglang``), given the project's
tokenizer directory since it cannot download one here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loadtest.bench.procs import Proc, free_port, install_debian, wait_http
from loadtest.bench.prompts import chat_body, completion_body

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "loadtest" / "models" / "sim-model"
SGLANG_VENV = ROOT / ".venv-bench"

_REPLY = json.dumps({
    "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "sim-model",
    "choices": [{"index": 0, "text": " ok", "finish_reason": "length", "logprobs": None}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
              "prompt_tokens_details": {"cached_tokens": 0}},
})
_MODELS = json.dumps({"object": "list", "data": [{"id": "sim-model", "object": "model", "owned_by": "bench"}]})

_WRK_LUA = """
local f = io.open("{body}", "r")
local template = f:read("*a")
f:close()
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  local body = template:gsub("__UNIQUE__", tostring(counter) .. "-" .. tostring(math.random(1, 1e9)))
  return wrk.format(nil, "{path}", nil, body)
end
"""


@dataclass
class Cell:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _nginx_conf(tmp: Path, backend_port: int, proxy_port: int) -> Path:
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
  upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{backend_port} reuseport;
    default_type application/json;
    location = /health {{ return 200 'ok'; }}
    location = /v1/models {{ return 200 '{_MODELS}'; }}
    location = /metrics {{ default_type text/plain; return 200 ''; }}
    location / {{ return 200 '{_REPLY}'; }}
  }}
  server {{
    listen 127.0.0.1:{proxy_port} reuseport;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
    return conf


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Cell:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return Cell(rps, p50, p99, errors)


def run_wrk(url: str, path: str, body_file: Path, *, connections: int, duration: float, threads: int) -> Cell:
    script = body_file.with_suffix(".lua")
    script.write_text(_WRK_LUA.format(body=body_file, path=path))
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "10s",
         "-s", str(script), url], capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    return parse_wrk(out)


@contextmanager
def router_proc(backend: str, *extra: str) -> Iterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "router", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--backend", backend, "--tokenizer", str(MODEL_DIR), "--block-size", "16", *extra]
    with Proc(args, env={**os.environ, "CACHE_ROUTER_LOG_DECISIONS": "0"}) as p:
        wait_http(f"http://127.0.0.1:{port}/ready", proc=p, timeout=60)
        yield f"http://127.0.0.1:{port}"


@contextmanager
def sglang_proc(backend: str) -> Iterator[str | None]:
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
        yield f"http://127.0.0.1:{port}"


@contextmanager
def redis_proc() -> Iterator[str]:
    port = free_port()
    with Proc(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]):
        time.sleep(0.3)
        yield f"redis://127.0.0.1:{port}/0"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,2000,8000,32000", help="prompt sizes in tokens (comma-separated)")
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="also a 2k-token chat row")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--targets", default="direct,nginx,cache-router,cache-router-redis,sglang-router")
    ap.add_argument("--router-arg", action="append", default=[], help="extra flag for cache-router serve")
    ap.add_argument("--install-sglang", action="store_true", help="pip install sglang-router into .venv-bench")
    ap.add_argument("--json", type=Path, help="also write the table as JSON")
    args = ap.parse_args(argv)

    install_debian({"nginx": "nginx", "wrk": "wrk", "redis-server": "redis-server"})
    if args.install_sglang and not (SGLANG_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(SGLANG_VENV)], check=True)
        subprocess.run([str(SGLANG_VENV / "bin" / "pip"), "install", "-q", "sglang-router"], check=True)
    targets = args.targets.split(",")
    rows = [("completion", int(s)) for s in args.sizes.split(",")] + ([("chat", 2000)] if args.chat else [])
    results: dict[str, dict[str, Cell]] = {}
    with tempfile.TemporaryDirectory(prefix="cr-overhead-") as tmpdir:
        tmp = Path(tmpdir)
        backend_port, proxy_port = free_port(), free_port()
        conf = _nginx_conf(tmp, backend_port, proxy_port)
        with Proc([shutil.which("nginx") or "nginx", "-c", str(conf), "-p", str(tmp)]):
            backend = f"http://127.0.0.1:{backend_port}"
            wait_http(f"{backend}/health", timeout=10)
            for kind, size in rows:
                label = f"{kind} {size} tok"
                body = tmp / f"{kind}-{size}.json"
                body.write_text(completion_body(size) if kind == "completion" else chat_body(size))
                path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
                results[label] = _measure_row(targets, backend, f"http://127.0.0.1:{proxy_port}", path, body, args)
    _print_table(results, targets, args)
    if args.json:
        args.json.write_text(json.dumps({r: {t: c.__dict__ for t, c in cells.items()} for r, cells in results.items()},
                                        indent=2))
    return 0


def _measure_row(targets: list[str], backend: str, proxy: str, path: str, body: Path,
                 args: argparse.Namespace) -> dict[str, Cell]:
    def median_of(url: str) -> Cell:
        cells = [run_wrk(url, path, body, connections=args.connections, duration=args.duration,
                         threads=args.threads) for _ in range(args.repeats)]
        return Cell(statistics.median(c.rps for c in cells), statistics.median(c.p50_ms for c in cells),
                    statistics.median(c.p99_ms for c in cells), sum(c.errors for c in cells))

    out: dict[str, Cell] = {}
    for target in targets:
        if target == "direct":
            out[target] = median_of(backend)
        elif target == "nginx":
            out[target] = median_of(proxy)
        elif target == "cache-router":
            with router_proc(backend, *args.router_arg) as url:
                median_of(url)  # warm-up: pools, tokenizer, first-request costs
                out[target] = median_of(url)
        elif target == "cache-router-redis":
            with redis_proc() as redis_url, router_proc(backend, "--redis-url", redis_url, *args.router_arg) as url:
                median_of(url)
                out[target] = median_of(url)
        elif target == "sglang-router":
            with sglang_proc(backend) as url:
                if url is not None:
                    median_of(url)
                    out[target] = median_of(url)
        print(f"  {path} {body.stem} {target}: {out[target].rps:.0f} req/s" if target in out else "", flush=True)
    return out


def _print_table(results: dict[str, dict[str, Cell]], targets: list[str], args: argparse.Namespace) -> None:
    print(f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration}s, median of {args.repeats}, "
          f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores")
    head = "| prompt | " + " | ".join(f"{t} req/s (p50/p99 ms)" for t in targets) + " | router/nginx | router/sglang |"
    print(head)
    print("|" + "---|" * (len(targets) + 3))
    for label, cells in results.items():
        parts = []
        for t in targets:
            c = cells.get(t)
            parts.append("n/a" if c is None else f"{c.rps:,.0f} ({c.p50_ms:.2f}/{c.p99_ms:.2f})"
                         + (f" {c.errors} err" if c.errors else ""))
        router, nginx, sgl = cells.get("cache-router"), cells.get("nginx"), cells.get("sglang-router")
        r_ng = f"{router.rps / nginx.rps:.2f}" if router and nginx else "n/a"
        r_sg = f"{router.rps / sgl.rps:.2f}" if router and sgl else "n/a"
        print(f"| {label} | " + " | ".join(parts) + f" | {r_ng} | {r_sg} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
