"""One request at a time: what a request costs a router that has been idle since the last one.

``python -m loadtest.bench.single [--size 2000] [--requests 1000] [--gaps 0,0.002] [--rounds 2]``
starts nginx (fixed answers, as in ``loadtest.overhead``), cache-router and sglang-router (when
installed) and sends each, over one keep-alive connection, one completion at a time with a
pause of each ``--gap`` between them. It prints the p50 latency and the CPU time of the target's
processes per request. Without a pause the router is warm; with 2 ms (the mean gap per
connection of the overhead benchmark's paced rows: 32 connections at 400 req/s is 80 ms, so
the process idles between requests) its caches are cold and a request costs about twice the
CPU, for both routers: the added latency at low load is CPU per request times that penalty.
Loopback only; every run is bounded by ``--requests``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from loadtest.bench import targets as tg
from loadtest.bench.procs import free_port, tree_cpu_seconds
from loadtest.bench.prompts import completion_body


def _post(sock: socket.socket, body: bytes) -> None:
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the target closed the connection")
        buf += chunk
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if not sep:
            continue
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        if (length is not None and len(rest) >= length) or (length is None and rest.endswith(b"0\r\n\r\n")):
            return


def measure(url: str, pid: int, template: str, n: int, gap: float, tag: str) -> tuple[float, float]:
    """(p50 latency s, CPU s per request) of ``n`` requests sent one at a time, ``gap`` apart."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(50):  # warm-up: pool, memo, first-request costs
            _post(sock, template.replace("__UNIQUE__", f"{tag}w{i}").encode())
        latencies = []
        cpu0 = tree_cpu_seconds(pid) or 0.0
        for i in range(n):
            body = template.replace("__UNIQUE__", f"{tag}{i}").encode()
            t0 = time.perf_counter()
            _post(sock, body)
            latencies.append(time.perf_counter() - t0)
            if gap:
                time.sleep(gap)
        cpu = (tree_cpu_seconds(pid) or 0.0) - cpu0
    return statistics.median(latencies), cpu / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.single", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=2000, help="prompt tokens")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--gaps", default="0,0.002", help="pauses between requests, seconds (comma-separated)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    template = completion_body(args.size)
    with tempfile.TemporaryDirectory(prefix="cr-single-") as tmp, ExitStack() as stack:
        backend = stack.enter_context(tg.nginx_proc(Path(tmp), free_port(), {}))
        router, proc, _ = stack.enter_context(tg.router_proc(backend, tmp=Path(tmp)))
        targets = {"cache-router": (router, proc.pid)}
        sglang = stack.enter_context(tg.sglang_proc(backend))
        if sglang is not None:
            targets["sglang-router"] = (sglang[0], sglang[1].pid)
        print(f"{args.size}-token completions, one at a time, {args.requests} per cell; p50 latency, CPU per request")
        for r in range(args.rounds):
            for gap in (float(g) for g in args.gaps.split(",")):
                cells = []
                for name, (url, pid) in targets.items():
                    p50, cpu = measure(url, pid, template, args.requests, gap, f"{r}-{gap}-")
                    cells.append(f"{name} {p50 * 1e3:.2f} ms, {cpu * 1e6:,.0f} µs CPU")
                print(f"round {r + 1}, gap {gap * 1e3:g} ms: " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
