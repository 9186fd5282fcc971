"""The hot routes on uvicorn's connection without ASGI (router.api.hot), over raw sockets.

What uvicorn did for them through ASGI must still hold on the lean path: keep-alive with
other routes on the same connection, pipelined requests answered in order, 100-continue,
chunked request bodies under the size limit, ``connection: close``, a client that leaves
mid-body, and answers byte-for-byte like the ASGI path's (bar the date and request id).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson
import pytest

from router.api import hot
from router.api.hot import HotExchange
from tests.support.router import metric, running_router, scripted_engines

BODY = orjson.dumps({"model": "sim-model", "prompt": "The quick brown fox " * 10, "max_tokens": 5})


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class Reader:
    """HTTP/1.1 answers from a socket, in order, however the bytes are split."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.done: list[Answer] = []
        self.interim: list[int] = []
        self._cur = Answer()
        self._name = b""
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._cur = Answer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._cur.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._cur.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._cur.body += body

    def on_message_complete(self) -> None:
        if 100 <= self._cur.status < 200:
            self.interim.append(self._cur.status)
        else:
            self.done.append(self._cur)

    def answers(self, n: int, timeout: float = 10.0) -> list[Answer]:
        deadline = time.monotonic() + timeout
        while len(self.done) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                break
            self.parser.feed_data(data)
        out, self.done = self.done[:n], self.done[n:]
        return out


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return (f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n{head}"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


ENGINE: list[str] = []


@pytest.fixture(scope="module")
def router() -> Iterator[str]:
    with scripted_engines(1) as (engine,), \
            running_router(backends=[engine.url], max_body_bytes=4096) as router:
        ENGINE[:] = [engine.url]
        yield router.url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_keep_alive_pipelining_and_other_routes_on_one_connection(router: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[str] = []  # which requests the lean path took (a spy around the real method)
    run = HotExchange.run

    async def spied(self: HotExchange) -> None:
        served.append(self.cycle.scope["path"])
        await run(self)

    monkeypatch.setattr(HotExchange, "run", spied)
    with connect(router) as sock:
        reader = Reader(sock)
        # Three requests in one write: two hot ones around a GET that uvicorn's ASGI path serves.
        sock.sendall(post("/v1/completions", BODY, "x-request-id: one")
                     + b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n"
                     + post("/v1/chat/completions", orjson.dumps(
                         {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}),
                         "x-request-id: three"))
        first, health, third = reader.answers(3)
        assert (first.status, health.status, third.status) == (200, 200, 200)
        assert first.headers["x-request-id"] == "one" and third.headers["x-request-id"] == "three"
        assert orjson.loads(first.body)["choices"] and orjson.loads(third.body)["choices"]
        assert "x-cache-router-backend" in first.headers and "date" in first.headers
        sock.sendall(post("/v1/completions", BODY))  # and the connection is still good
        assert reader.answers(1)[0].status == 200
    assert served == ["/v1/completions", "/v1/chat/completions", "/v1/completions"]


def test_expect_100_continue(router: str) -> None:
    with connect(router) as sock:
        reader = Reader(sock)
        sock.sendall(post("/v1/completions", b"", "expect: 100-continue").replace(
            b"content-length: 0", f"content-length: {len(BODY)}".encode()))
        sock.settimeout(5)
        reader.parser.feed_data(sock.recv(65536))  # the interim answer, before any body byte
        assert reader.interim == [100]
        sock.sendall(BODY)
        assert reader.answers(1)[0].status == 200


def test_chunked_body_and_the_size_limit(router: str) -> None:
    with connect(router) as sock:
        reader = Reader(sock)
        head = b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
        half = len(BODY) // 2
        sock.sendall(head + b"%x\r\n%b\r\n" % (half, BODY[:half]))
        time.sleep(0.1)  # the rest arrives later, in its own read
        sock.sendall(b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY) - half, BODY[half:]))
        assert reader.answers(1)[0].status == 200
        # Past the limit (4 KiB here) a chunked body is refused while it is still coming.
        sock.sendall(head + b"1000\r\n" + b"x" * 0x1000 + b"\r\n1000\r\n" + b"x" * 0x1000 + b"\r\n")
        (refused,) = reader.answers(1)
        assert refused.status == 413
        assert orjson.loads(refused.body)["error"]["code"] == "payload_too_large"


def test_declared_length_over_the_limit_is_refused_before_the_body(router: str) -> None:
    with connect(router) as sock:
        reader = Reader(sock)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 1000000000\r\n\r\n")
        (refused,) = reader.answers(1, timeout=5)  # no body byte was sent
        assert refused.status == 413
        assert set(orjson.loads(refused.body)["error"]) >= {"message", "type", "code"}


def test_a_bad_request_keeps_the_connection(router: str) -> None:
    with connect(router) as sock:
        reader = Reader(sock)
        sock.sendall(post("/v1/completions", b"{not json"))
        (bad,) = reader.answers(1)
        assert bad.status == 400 and orjson.loads(bad.body)["error"]["type"] == "invalid_request_error"
        sock.sendall(post("/v1/completions", BODY))
        assert reader.answers(1)[0].status == 200


def test_connection_close_is_honoured(router: str) -> None:
    with connect(router) as sock:
        reader = Reader(sock)
        sock.sendall(post("/v1/completions", BODY, "connection: close"))
        (ok,) = reader.answers(1)
        assert ok.status == 200 and ok.headers["connection"] == "close"
        sock.settimeout(1)  # well before uvicorn's keep-alive timeout (5 s) would close it
        assert sock.recv(65536) == b""  # the router closed its end


def test_a_client_that_leaves_mid_body_costs_nothing(router: str) -> None:
    for _ in range(3):
        with connect(router) as sock:
            sock.sendall(post("/v1/completions", BODY)[:-20])  # 20 bytes short, then gone
    with connect(router) as sock:
        sock.sendall(post("/v1/completions", BODY))
        assert Reader(sock).answers(1)[0].status == 200
    assert metric(router, "cache_router_in_flight", backend=ENGINE[0]) == 0


CASES = {
    "answer": post("/v1/completions", BODY, "x-request-id: same"),
    "stream": post("/v1/completions", orjson.dumps({**orjson.loads(BODY), "stream": True}), "x-request-id: same"),
    "bad json": post("/v1/completions", b"[1,", "x-request-id: same"),
    "unknown model": post("/v1/chat/completions", orjson.dumps(
        {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), "x-request-id: same"),
}


def test_hot_and_asgi_paths_answer_alike() -> None:
    seen: dict[str, dict[str, Answer]] = {}
    with scripted_engines(1) as (engine,):
        for server in ("hot", "asgi"):
            with running_router(backends=[engine.url], server=server) as router, connect(router.url) as sock:
                reader = Reader(sock)
                for name, request in CASES.items():
                    sock.sendall(request)
                    (got,) = reader.answers(1)
                    got.headers.pop("date")
                    seen.setdefault(name, {})[server] = got
    for name, by in seen.items():
        hot, asgi = by["hot"], by["asgi"]
        assert (hot.status, hot.headers, hot.body) == (asgi.status, asgi.headers, asgi.body), name
    assert seen["stream"]["hot"].headers["transfer-encoding"] == "chunked"
    assert [a.status for a in (seen[n]["hot"] for n in CASES)] == [200, 200, 400, 404]


def test_a_client_gone_while_routing_is_not_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection: routing awaits something that swallows the cancel (as a library on the
    # way can; seen with the Redis index under load), so the cancel alone does not stop it.
    real = hot.route_body

    async def route_swallowing_the_cancel(*args: Any) -> Any:
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            pass
        return await real(*args)

    monkeypatch.setattr(hot, "route_body", route_swallowing_the_cancel)
    with scripted_engines(1) as (engine,), running_router(backends=[engine.url]) as router:
        with connect(router.url) as sock:
            sock.sendall(post("/v1/completions", BODY))
            time.sleep(0.1)  # routing has begun; the client gives up
        time.sleep(1.0)  # past the routing, and past an answer had it been sent
        assert engine.requests == []  # nothing was sent upstream for a client that had left
        with connect(router.url) as sock:  # and the router serves the next one
            sock.sendall(post("/v1/completions", BODY))
            assert Reader(sock).answers(1)[0].status == 200
