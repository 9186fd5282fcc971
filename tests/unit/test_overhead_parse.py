"""The overhead benchmark's pieces that decide its numbers: wrk's output parsed, the request
bodies it sends, the /health probe summary, the nginx config. Not timed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadtest.bench.probe import summarize
from loadtest.bench.prompts import chat_body, completion_body
from loadtest.bench.targets import MODEL_DIR, nginx_conf
from loadtest.bench.wrk import parse_wrk, to_ms
from router.hashing.tokenizer import ModelTokenizer

# Captured from wrk 4.1 on this machine (nginx answering a fixed body).
WRK_OK = """Running 1s test @ http://127.0.0.1:18901
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   109.22us  449.94us   5.06ms   95.78%
    Req/Sec    50.39k     7.05k   56.64k    72.73%
  Latency Distribution
     50%   27.00us
     75%   28.00us
     90%   39.00us
     99%    2.74ms
  54969 requests in 1.10s, 23.49MB read
Requests/sec:  50130.05
Transfer/sec:     21.42MB
"""

WRK_ERRORS = """Running 3s test @ http://127.0.0.1:8080
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20s   400.00ms   2.00s    60.00%
    Req/Sec     5.00      2.00    10.00     70.00%
  Latency Distribution
     50%    1.10s
     75%    1.50s
     90%    1.80s
     99%    1.00m
  40 requests in 3.01s, 10.00KB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:     13.29
Transfer/sec:      3.32KB
"""

WRK_NOTHING = """Running 1s test @ http://127.0.0.1:8080
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.00s, 0.00B read
  Socket errors: connect 0, read 0, write 0, timeout 32
Requests/sec:      0.00
Transfer/sec:       0.00B
"""


def test_parse_wrk_reads_rate_percentiles_in_ms_and_counts() -> None:
    cell = parse_wrk(WRK_OK)
    assert cell.rps == pytest.approx(50130.05)
    assert cell.p50_ms == pytest.approx(0.027)
    assert cell.p99_ms == pytest.approx(2.74)
    assert (cell.errors, cell.requests) == (0, 54969)


def test_parse_wrk_adds_socket_errors_and_non_2xx() -> None:
    cell = parse_wrk(WRK_ERRORS)
    assert cell.errors == 1 + 2 + 3 + 4 + 5
    assert cell.p50_ms == pytest.approx(1100.0)
    assert cell.p99_ms == pytest.approx(60_000.0)


def test_parse_wrk_with_no_answer_is_not_a_fast_run() -> None:
    cell = parse_wrk(WRK_NOTHING)
    assert cell.rps == 0 and cell.requests == 0 and cell.errors == 32
    assert math.isnan(cell.p50_ms) and math.isnan(cell.p99_ms)


def test_parse_wrk_refuses_output_without_latency_distribution() -> None:
    with pytest.raises(ValueError, match="--latency"):
        parse_wrk(WRK_OK.replace("50%", "fifty"))


@pytest.mark.parametrize(("text", "ms"), [("812.00us", 0.812), ("1.52ms", 1.52), ("2.01s", 2010.0), ("1.00m", 60e3)])
def test_to_ms_units(text: str, ms: float) -> None:
    assert to_ms(text) == pytest.approx(ms)


@pytest.fixture(scope="module")
def tokenizer() -> ModelTokenizer:
    return ModelTokenizer.from_dir(MODEL_DIR)


@pytest.mark.parametrize("n", [100, 2000, 8000])
def test_completion_body_has_the_size_asked_for_and_one_unique_slot(n: int, tokenizer: ModelTokenizer) -> None:
    raw = completion_body(n)
    assert raw.count("__UNIQUE__") == 1
    body = json.loads(raw)
    assert body["model"] == "sim-model" and body["max_tokens"] == 1 and "stream" not in body
    tokens = len(tokenizer.encode_completion(body["prompt"].replace("__UNIQUE__", "12-345678")))
    assert 0.85 * n <= tokens <= 1.15 * n, tokens


def test_bodies_share_their_prefix_and_differ_only_in_the_tail() -> None:
    one, two = (completion_body(2000).replace("__UNIQUE__", t) for t in ("1-7", "2-9"))
    shared = len(one) - len(" request 1-7 please answer briefly\", \"max_tokens\": 1, \"temperature\": 0}")
    assert one[:shared] == two[:shared] and one != two


def test_chat_body_renders_to_the_size_asked_for(tokenizer: ModelTokenizer) -> None:
    raw = chat_body(2000, max_tokens=16, stream=True)
    assert raw.count("__UNIQUE__") == 1
    body = json.loads(raw)
    assert body["stream"] is True and body["max_tokens"] == 16
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    tokens = len(tokenizer.encode_chat(body["messages"]))
    assert 0.85 * 2000 <= tokens <= 1.15 * 2000, tokens


def test_streaming_completion_body_asks_for_a_stream() -> None:
    body = json.loads(completion_body(100, max_tokens=16, stream=True))
    assert body["stream"] is True and body["max_tokens"] == 16


def test_probe_summary_percentiles_and_empty() -> None:
    stats = summarize([float(i) for i in range(1, 101)], failures=2)
    assert (stats.n, stats.failures, stats.max_ms) == (100, 2, 100.0)
    assert stats.p50_ms == pytest.approx(50.5) and stats.p99_ms == 99.0
    empty = summarize([], failures=3)
    assert empty.n == 0 and empty.failures == 3 and math.isnan(empty.p99_ms)


def test_nginx_conf_has_the_backend_and_one_keepalive_proxy_each(tmp_path: Path) -> None:
    text = nginx_conf(tmp_path, 9001, {9002: "127.0.0.1:9001", 9003: "127.0.0.1:7000"}).read_text()
    assert "listen 127.0.0.1:9001" in text and "return 200 '{" in text
    for port, target in ((9002, "127.0.0.1:9001"), (9003, "127.0.0.1:7000")):
        assert f"listen 127.0.0.1:{port}" in text
        assert f"upstream up{port} {{ server {target}; keepalive 256; }}" in text
    assert text.count("{") == text.count("}")
