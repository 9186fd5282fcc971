"""Bad input, generated: every endpoint's body fuzzed with hypothesis over a real HTTP server.

The router (real uvicorn, in a thread) sits in front of a simulated engine (its own process),
so a body the router accepts meets a faithful engine validator too. For every generated
input: the answer is < 500 and arrives within the socket timeout (never a 5xx or a hang);
an error is in OpenAI's shape ``{"error": {"message", "type", "code"}}``; and a rejected
request leaves the index exactly as it was (entry count and a probe lookup).

Inputs: well-formed bodies with wrong types and out-of-range values (token ids past the
vocabulary, absurd ``max_tokens``, thousands of messages, huge strings), any JSON value,
malformed JSON, invalid UTF-8 and deep nesting, all sent over one keep-alive connection.

Examples: ``CR_FUZZ_EXAMPLES`` (total across the tests here); default 10,000 when ``CI=true``,
else 1,500. Figures (examples sent, statuses seen, rate) are printed with ``-s``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtest.engine import SimFleet
from router.app import create_app
from router.config import RouterConfig
from router.hashing.keys import prompt_keys
from router.hashing.tokenizer import ModelTokenizer
from tests.conftest import SIM_MODEL
from tests.support.router import ADMIN, router_config
from tests.support.servers import UvicornThread

TOTAL = int(os.environ.get("CR_FUZZ_EXAMPLES") or (10_000 if os.environ.get("CI") == "true" else 1_500))
# Share of the total per generator; the structured ones find more than random JSON does.
SHARES = {"completion": 0.3, "chat": 0.3, "json": 0.15, "raw": 0.15, "debug": 0.1}
MAX_BODY = 64 * 1024  # small limit so "huge body" inputs are cheap to build and still cross it
PATHS = ["/v1/completions", "/v1/chat/completions", "/debug/route"]
PROBE = "The probe prompt whose prefix must stay in the index. " * 6


class LoopCapture:
    """ASGI wrapper that remembers the server's event loop, to run index calls on it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)


@dataclass
class Target:
    server: UvicornThread
    capture: LoopCapture
    probe_keys: list[Any]
    conn: http.client.HTTPConnection | None = None
    statuses: Counter[int] = field(default_factory=Counter)
    sent: int = 0
    hung: int = 0
    server_errors: list[tuple[str, bytes, int]] = field(default_factory=list)
    seconds: float = 0.0
    last_state: tuple[int, dict[str, int]] | None = None

    def _index(self, coro_fn: Any) -> Any:
        pipeline = self.capture.app.state.pipeline
        assert self.capture.loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(pipeline.index), self.capture.loop).result(10)

    def index_state(self) -> tuple[int, dict[str, int]]:
        async def read(ix: Any) -> tuple[int, dict[str, int]]:
            return sum((await ix.sizes()).values()), dict(await ix.lookup(self.probe_keys))

        return self._index(read)  # type: ignore[no-any-return]

    def send(self, method: str, path: str, body: bytes | None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        hdrs = {"content-type": "application/json", **ADMIN, **(headers or {})}
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=15)
            t0 = time.perf_counter()
            try:
                self.conn.request(method, path, body=body, headers=hdrs)
                resp = self.conn.getresponse()
                data = resp.read()
            except TimeoutError:
                self.hung += 1
                self.conn.close()
                self.conn = None
                raise AssertionError(f"no answer within 15 s: {method} {path} {(body or b'')[:200]!r}") from None
            except (ConnectionError, http.client.HTTPException):
                # The server may close a connection after an error answer: reconnect once.
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            finally:
                self.seconds += time.perf_counter() - t0
            if resp.getheader("connection", "").lower() == "close":
                self.conn.close()
                self.conn = None
            self.sent += 1
            self.statuses[resp.status] += 1
            return resp.status, data
        raise AssertionError("unreachable")

    def check(self, path: str, body: bytes, method: str = "POST") -> int:
        """Send, and assert the contract; returns the status. Requests go one at a time, so
        the index state after the last accepted request is the "before" of this one."""
        before = self.last_state if self.last_state is not None else self.index_state()
        status, data = self.send(method, path, body)
        if status >= 500:
            self.server_errors.append((path, body[:300], status))
        assert status < 500, f"{status} for {path} {body[:300]!r}: {data[:300]!r}"
        if status >= 400:
            err = orjson.loads(data)["error"]
            assert isinstance(err["message"], str) and isinstance(err["type"], str)
            # The router's own errors carry a string code; an engine's 4xx passes through as the
            # engine wrote it (vLLM: the status as an integer code).
            assert "code" in err and isinstance(err["code"], str | int | None), err
            after = self.index_state()
            assert after == before, f"rejected request ({status}) changed the index: {body[:300]!r}"
            self.last_state = after
        else:
            self.last_state = None  # accepted: the index may change as its record lands
        return status


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with SimFleet(1, block_size=16, cache_blocks=200_000, mode="process") as fleet:
        cfg: RouterConfig = router_config(fleet.urls, tokenizer=str(SIM_MODEL), block_size=16,
                                          max_body_bytes=MAX_BODY, log_decisions=False)
        capture = LoopCapture(create_app(cfg))
        server = UvicornThread(capture).start()
        tok = ModelTokenizer.from_dir(SIM_MODEL)
        keys = prompt_keys(tok.encode_completion(PROBE), 16, "sim-model", None)
        t = Target(server, capture, list(keys))
        try:
            deadline = time.monotonic() + 10
            while t.send("GET", "/ready", None)[0] != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            body = orjson.dumps({"model": "sim-model", "prompt": PROBE, "max_tokens": 1})
            assert t.send("POST", "/v1/completions", body)[0] == 200
            time.sleep(0.2)  # the record runs after the answer
            assert t.index_state()[1], "the probe prompt is not in the index"
            yield t
        finally:
            rate = t.sent / t.seconds if t.seconds else 0.0
            print(f"\nfuzz: {t.sent} requests, statuses {dict(sorted(t.statuses.items()))}, hung {t.hung}, "
                  f"5xx {len(t.server_errors)}, {rate:.0f} req/s over one keep-alive connection")
            if t.conn is not None:
                t.conn.close()
            server.stop()


BATCH = 10
"""Inputs per hypothesis example: drawing ten values in one example costs about a third of ten
examples (the engine's per-example bookkeeping dominates), and a failing batch still shrinks."""


def _fuzz(share: str) -> settings:
    return settings(max_examples=max(5, round(TOTAL * SHARES[share] / BATCH)), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def batch(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(strategy, min_size=BATCH, max_size=BATCH)


# --- strategies --------------------------------------------------------------------------
_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
json_values = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=6)
                           | st.dictionaries(st.text(max_size=12), kids, max_size=6), max_leaves=10)
_big_text = st.integers(0, MAX_BODY + 4096).map(lambda n: "a" * n)
_token_ids = st.lists(st.integers(-(2**65), 2**65) | st.integers(0, 9000), min_size=0, max_size=50)
_prompt = st.one_of(
    st.text(max_size=300), _big_text, _token_ids, st.lists(st.text(max_size=50), max_size=5),
    st.lists(_token_ids, max_size=4), json_values,
)
# Values an engine accepts quickly, or far out of range: never a 32k-token generation.
_max_tokens = st.one_of(st.integers(1, 4), st.integers(-(2**64), 0), st.integers(32_000, 2**64),
                        st.floats(), st.text(max_size=5), st.booleans(), st.none())
_model = st.sampled_from(["sim-model", "sim-model"]) | st.text(max_size=20) | json_values
_salt = st.none() | st.text(max_size=20) | st.integers() | st.just("")
_common = {"model": _model, "max_tokens": _max_tokens, "stream": st.booleans() | json_values,
           "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": json_values}),
           "cache_salt": _salt, "temperature": json_values}
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "nobody"]) | json_values},
    optional={"content": st.text(max_size=200) | st.none() | json_values
              | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | json_values},
                                               optional={"text": st.text(max_size=50) | json_values}),
                         max_size=3),
              "name": json_values},
)
_many_messages = st.integers(1000, 3000).map(lambda n: [{"role": "user", "content": f"m{i}"} for i in range(n)])
_few_messages = st.lists(_message, max_size=8)
# one_of picks a branch uniformly: thousands of messages in about one body of ten (they are slow to render).
_messages = st.one_of(*[_few_messages] * 6, json_values, json_values, json_values, _many_messages)


def _body(required: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    # Required keys usually present, sometimes dropped; the rest optional.
    return st.fixed_dictionaries({}, optional={**required, **_common}).map(
        lambda d: {"max_tokens": 2, **d} if "max_tokens" not in d else d)


completion_bodies = _body({"prompt": _prompt}) | _body({"prompt": _prompt}).map(lambda d: {**d, "model": "sim-model"})
chat_bodies = _body({"messages": _messages}) | _body({"messages": _messages}).map(
    lambda d: {**d, "model": "sim-model"})


def dumps(value: Any) -> bytes:
    """stdlib json: unlike orjson it writes integers past 64 bits and NaN (itself invalid JSON)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _deep(n: int) -> bytes:
    return b'{"model": "sim-model", "prompt": ' + b"[" * n + b"1" + b"]" * n + b"}"


def _corrupt(raw: bytes, at: int, junk: bytes) -> bytes:
    at = at % (len(raw) + 1)
    return raw[:at] + junk + raw[at:]


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.integers(1, 50_000).map(_deep),
    st.builds(_corrupt, completion_bodies.map(dumps), st.integers(0, 10_000),
              st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00", b"}", b'"', b"\\u12"])),
    completion_bodies.map(dumps).map(lambda b: b[: len(b) // 2]),  # truncated JSON
    st.just(b'{"model": "sim-model", "prompt": "\xff\xfe"}'),
)


# --- tests -------------------------------------------------------------------------------
@_fuzz("completion")
@given(bodies=batch(completion_bodies))
def test_fuzz_completion_bodies(target: Target, bodies: list[dict[str, Any]]) -> None:
    for body in bodies:
        target.check("/v1/completions", dumps(body))


@_fuzz("chat")
@given(bodies=batch(chat_bodies))
def test_fuzz_chat_bodies(target: Target, bodies: list[dict[str, Any]]) -> None:
    for body in bodies:
        target.check("/v1/chat/completions", dumps(body))


@_fuzz("json")
@given(cases=batch(st.tuples(st.sampled_from(PATHS), json_values)))
def test_fuzz_any_json_value_on_every_endpoint(target: Target, cases: list[tuple[str, Any]]) -> None:
    for path, value in cases:
        assert target.check(path, dumps(value)) != 200 or isinstance(value, dict)


@_fuzz("raw")
@given(cases=batch(st.tuples(st.sampled_from(PATHS), raw_bodies)))
def test_fuzz_malformed_bytes_on_every_endpoint(target: Target, cases: list[tuple[str, bytes]]) -> None:
    for path, raw in cases:
        target.check(path, raw)


@_fuzz("debug")
@given(bodies=batch(completion_bodies | chat_bodies))
def test_fuzz_debug_route_is_a_dry_run(target: Target, bodies: list[dict[str, Any]]) -> None:
    before = target.index_state()
    for body in bodies:
        target.check("/debug/route", dumps(body))
    assert target.index_state() == before  # a dry run never writes, accepted or not


def test_fuzz_sent_the_required_number_of_inputs(target: Target) -> None:
    """Runs after the generated tests (file order): CI must have sent at least CR_FUZZ_EXAMPLES."""
    if target.sent < 100:
        pytest.skip("the generated tests were deselected")
    assert target.sent >= TOTAL * 0.99, (target.sent, TOTAL)


def test_oversized_and_odd_headers_are_4xx_never_5xx_or_a_hang(target: Target) -> None:
    body = orjson.dumps({"model": "sim-model", "prompt": "hi", "max_tokens": 1})
    before = target.index_state()
    for name, value in [("x-big", "v" * 200_000), ("content-length", "-1"), ("content-length", "abc"),
                        ("content-type", "text/plain\x7f"), ("x-request-id", "../../etc" * 50)]:
        try:
            status, data = target.send("POST", "/v1/completions", body, {name: value})
        except (ConnectionError, http.client.HTTPException):
            status, data = 0, b""  # the server dropped the connection: also not a 5xx or a hang
        print(f"header {name} ({len(value)} chars): {status}")
        assert status < 500
        if status >= 400 and data.startswith(b"{"):
            assert "error" in orjson.loads(data)
    assert target.index_state()[0] >= before[0]


def test_huge_bodies_are_413_in_openai_shape(target: Target) -> None:
    before = target.index_state()
    for path in PATHS:
        status, data = target.send("POST", path, b'{"prompt": "' + b"x" * (MAX_BODY + 1) + b'"}')
        assert status == 413, (path, status, data[:200])
        assert orjson.loads(data)["error"]["code"]
    assert target.index_state() == before


def test_request_the_engine_rejects_leaves_no_index_entries(target: Target) -> None:
    """The router accepts max_tokens up to 2^20; the engine refuses prompt + max_tokens past its
    context. Keys recorded at dispatch for that request must not stay behind."""
    prompt = "A prompt the engine will refuse because of max_tokens. " * 10
    tok = ModelTokenizer.from_dir(SIM_MODEL)
    keys = list(prompt_keys(tok.encode_completion(prompt), 16, "sim-model", None))
    before = target.index_state()
    status, data = target.send("POST", "/v1/completions",
                               dumps({"model": "sim-model", "prompt": prompt, "max_tokens": 32_768}))
    assert status == 400, data
    time.sleep(0.2)
    assert target._index(lambda ix: ix.lookup(keys)) == {}
    assert target.index_state() == before
