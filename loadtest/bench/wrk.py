"""wrk as the load generator: the Lua script that posts benchmark bodies, its output parsed.

Every request gets a unique tail (``__UNIQUE__`` replaced by a counter and a random number),
so no cache of whole prompts can make a target look faster than it is. One run is one
``Cell``: requests/s, p50/p99 latency in ms, and errors (non-2xx answers plus socket errors).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

WRK_LUA = """
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

WRK_PACED_LUA = """
delay = function()
  return math.random(0, {twice_ms})
end
"""
"""Pacing for a latency run below saturation: each connection waits a random 0..2d ms
(mean d) after every answer, so ``connections`` of them offer about connections / d
requests per second whatever the target's speed."""


@dataclass
class Cell:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def to_ms(text: str) -> float:
    """wrk's latency figure (``812.00us``, ``1.52ms``, ``2.01s``, ``1.00m``) in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _need(pattern: str, out: str) -> str:
    m = re.search(pattern, out, re.M)
    if m is None:
        raise ValueError(f"wrk output lacks {pattern!r} (did wrk run with --latency?):\n{out[-800:]}")
    return m.group(1)


def parse_wrk(out: str) -> Cell:
    """wrk ``--latency`` output -> Cell. A run with no completed request has rps 0 and
    NaN latencies rather than wrk's placeholder zeros, so it cannot pass for a fast one."""
    rps = float(_need(r"Requests/sec:\s+([\d.]+)", out))
    requests = int(_need(r"^\s*(\d+) requests in ", out))
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    if requests == 0:
        return Cell(0.0, float("nan"), float("nan"), errors, 0)
    p50 = to_ms(_need(r"^\s+50%\s+(\S+)", out))
    p99 = to_ms(_need(r"^\s+99%\s+(\S+)", out))
    return Cell(rps, p50, p99, errors, requests)


def run_wrk(url: str, path: str, body_file: Path, *, connections: int, duration: float, threads: int,
            rate: float | None = None) -> Cell:
    """One wrk run; ``rate``: offer about this many requests/s in all (paced) instead of saturating."""
    script = body_file.with_suffix(".paced.lua" if rate else ".lua")
    lua = WRK_LUA.format(body=body_file, path=path)
    if rate:
        lua += WRK_PACED_LUA.format(twice_ms=max(1, round(2 * 1000 * connections / rate)))
    script.write_text(lua)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "10s",
         "-s", str(script), url], capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    return parse_wrk(out)
