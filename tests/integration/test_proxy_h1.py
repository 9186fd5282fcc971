"""router.proxy.h1 against real servers on loopback: uvicorn for a real engine's HTTP stack,
and a scripted asyncio socket server for what uvicorn will not do on request (close a
kept-alive connection just as a request arrives, cut an answer, flood a slow reader).
Every test runs on both the default event loop and uvloop."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop

from router.config import ProxyConfig, TimeoutsConfig
from router.proxy.client import ConnectFailed, StreamBroken
from router.proxy.h1 import HIGH_WATER, H1Upstream
from tests.support.servers import free_port, serving

RUN = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
Runner = Callable[[Awaitable[None]], None]
JSON = {"content-type": "application/json", "x-request-id": "t-1"}


def _client(connect_s: float = 2.0, **proxy: Any) -> H1Upstream:
    return H1Upstream(ProxyConfig(client="h1", **proxy), TimeoutsConfig(connect_s=connect_s))


async def _post(client: H1Upstream, url: str, body: bytes = b"{}") -> tuple[int, bytes]:
    resp = await client.open(url, body, JSON)
    try:
        return resp.status, await resp.read()
    finally:
        await resp.aclose()


# -- a real uvicorn engine ------------------------------------------------------------------------
class Engine:
    """Raw ASGI: echoes what it was sent and which client port sent it; /stream answers chunked
    (and, given a number as the body, holds the answer open that many seconds before its end)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append({"port": scope["client"][1], "headers": headers, "body": body})
        if scope["path"] == "/stream":  # no content-length: uvicorn frames it chunked
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for i in range(20):
                await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
            if body:  # a number: hold the answer open this long before its end
                await asyncio.sleep(float(body))
            await send({"type": "http.response.body", "body": b""})
            return
        out = orjson.dumps({"n": len(self.seen), "echo": body.decode()})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})


@RUN
def test_keep_alive_reuses_one_connection_and_writes_the_request(run: Runner) -> None:
    engine = Engine()
    with serving(engine) as server:
        async def go() -> None:
            client = _client()
            for i in range(5):
                status, body = await _post(client, server.url + "/v1/completions", f'{{"i":{i}}}'.encode())
                assert status == 200 and orjson.loads(body) == {"n": i + 1, "echo": f'{{"i":{i}}}'}
            await client.aclose()
        run(go())
    assert len({s["port"] for s in engine.seen}) == 1  # one socket carried all five
    h = engine.seen[0]["headers"]
    assert h["host"] == f"127.0.0.1:{server.port}" and h["accept-encoding"] == "identity"
    assert h["content-length"] == "7" and h["x-request-id"] == "t-1" and h["content-type"] == "application/json"


@RUN
def test_chunked_answer_is_decoded_and_the_connection_reused(run: Runner) -> None:
    engine = Engine()
    with serving(engine) as server:
        async def go() -> None:
            client = _client()
            for _ in range(2):
                resp = await client.open(server.url + "/stream", b"", JSON)
                assert resp.status == 200 and (b"content-type", b"text/event-stream") in resp.headers
                got = b"".join([c async for c in resp.chunks()])
                await resp.aclose()
                assert got == b"".join(f"data: {i}\n\n".encode() for i in range(20))
            await client.aclose()
        run(go())
    assert len({s["port"] for s in engine.seen}) == 1


@RUN
def test_server_closing_idle_connections_is_not_an_error(run: Runner) -> None:
    engine = Engine()
    with serving(engine, timeout_keep_alive=0.2) as server:  # uvicorn closes idle sockets after 0.2 s
        async def go() -> None:
            client = _client()
            for _ in range(3):
                assert (await _post(client, server.url + "/v1/completions"))[0] == 200
                await asyncio.sleep(0.5)
            assert not client._conns  # each closed socket left the pool when the server closed it
            await client.aclose()
        run(go())
    assert len({s["port"] for s in engine.seen}) == 3


# -- a scripted socket server ---------------------------------------------------------------------
Handler = Callable[["Scripted", int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """An asyncio TCP server on its own thread; ``handler(server, conn_no, reader, writer)`` per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = free_port()
        self.connections = 0
        self.requests: list[tuple[int, bytes]] = []  # (connection number, body)
        self.closed = threading.Event()  # set when a handler saw its client go away
        self.sent = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"scripted-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(self, self.connections, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.closed.set()
            finally:
                writer.close()

        server = self._loop.run_until_complete(asyncio.start_server(serve, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def request(self, conn: int, reader: asyncio.StreamReader) -> bool:
        """Read one request; False at a clean EOF between requests."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        self.requests.append((conn, await reader.readexactly(length)))
        return True

    def __enter__(self) -> Scripted:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def _ok(body: bytes = b'{"ok":true}') -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


@RUN
def test_stale_pooled_connection_is_resent_once_on_a_fresh_one(run: Runner) -> None:
    async def handler(s: Scripted, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.request(conn, reader)
        writer.write(_ok())
        await s.request(conn, reader)  # the keep-alive race: closed as the next request arrives, no byte sent

    with Scripted(handler) as server:
        async def go() -> None:
            client = _client()
            assert await _post(client, server.url + "/a", b"1") == (200, b'{"ok":true}')
            assert await _post(client, server.url + "/a", b"2") == (200, b'{"ok":true}')
            await client.aclose()
        run(go())
    assert server.requests == [(1, b"1"), (1, b"2"), (2, b"2")]  # resent once, on a new connection


@RUN
def test_idle_timeout_408_on_a_pooled_connection_is_resent_but_a_fresh_408_is_an_answer(run: Runner) -> None:
    timeout_408 = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"

    async def handler(s: Scripted, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.request(conn, reader)
        writer.write(timeout_408 if conn == 3 else _ok())
        await s.request(conn, reader)
        writer.write(timeout_408)  # the server's idle timeout met the next request

    with Scripted(handler) as server:
        async def go() -> None:
            client = _client()
            assert (await _post(client, server.url + "/a", b"1"))[0] == 200
            assert (await _post(client, server.url + "/a", b"2"))[0] == 200  # resent on connection 2
            await client.aclose()
            client = _client()
            assert (await _post(client, server.url + "/a", b"3"))[0] == 408  # connection 3: a real answer
            await client.aclose()
        run(go())
    assert server.requests == [(1, b"1"), (1, b"2"), (2, b"2"), (3, b"3")]


@RUN
def test_fresh_connection_closed_without_an_answer_is_broken_and_not_resent(run: Runner) -> None:
    async def handler(s: Scripted, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.request(conn, reader)

    with Scripted(handler) as server:
        async def go() -> None:
            client = _client()
            with pytest.raises(StreamBroken):
                await client.open(server.url + "/a", b"1", JSON)
            await client.aclose()
        run(go())
    assert server.requests == [(1, b"1")]


@RUN
def test_answer_cut_midway_is_broken_and_not_resent(run: Runner) -> None:
    async def handler(s: Scripted, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.request(conn, reader)
        writer.write(_ok())
        await s.request(conn, reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        await writer.drain()

    with Scripted(handler) as server:
        async def go() -> None:
            client = _client()
            assert (await _post(client, server.url + "/a", b"1"))[0] == 200
            resp = await client.open(server.url + "/a", b"2", JSON)  # reused: the head arrives, then EOF
            assert resp.status == 200
            with pytest.raises(StreamBroken):
                await resp.read()
            await client.aclose()
        run(go())
    assert server.requests == [(1, b"1"), (1, b"2")]


@RUN
def test_interim_1xx_read_until_close_and_204(run: Runner) -> None:
    async def handler(s: Scripted, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.request(conn, reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + _ok(b"after-100"))
        await s.request(conn, reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await s.request(conn, reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"the-end")  # no framing: the body ends when the server closes

    with Scripted(handler) as server:
        async def go() -> None:
            client = _client()
            assert await _post(client, server.url + "/a", b"1") == (200, b"after-100")
            assert await _post(client, server.url + "/a", b"2") == (204, b"")
            assert await _post(client, server.url + "/a", b"3") == (200, b"until-the-end")
            assert not client._conns
            await client.aclose()
        run(go())
    assert [c for c, _ in server.requests] == [1, 1, 1]


@RUN
def test_slow_consumer_pauses_reading_and_memory_stays_bounded(run: Runner) -> None:
    total, piece = 64 * 1024 * 1024, b"x" * (256 * 1024)

    async def handler(s: Scripted, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.request(conn, reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(total // len(piece)):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            s.sent += len(piece)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    with Scripted(handler) as server:
        async def go() -> None:
            client = _client()
            resp = await client.open(server.url + "/a", b"{}", JSON)
            chunks = resp.chunks()
            got = len(await anext(chunks))
            await asyncio.sleep(0.5)  # a slow SSE client: nothing pulled for a while
            buffered, sent = resp.size, server.sent
            # uvloop and asyncio read up to 256 KiB per call: the bound overshoots by at most one read
            assert buffered <= HIGH_WATER + 256 * 1024, buffered
            assert sent < total // 2, sent  # the engine was pushed back (kernel buffers hold the rest)
            async for chunk in chunks:
                got += len(chunk)
            assert got == total  # reading resumed once drained, and nothing was lost
            await resp.aclose()
            await client.aclose()
        run(go())


@RUN
def test_closing_an_unfinished_answer_drops_the_socket(run: Runner) -> None:
    async def handler(s: Scripted, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.request(conn, reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(1000):  # an endless stream until the client goes
            writer.write(b"%x\r\n%s\r\n" % (len(b"data: %d\n\n" % i), b"data: %d\n\n" % i))
            await writer.drain()
            await asyncio.sleep(0.01)
            if reader.at_eof():
                s.closed.set()
                return

    with Scripted(handler) as server:
        async def go() -> None:
            client = _client()
            resp = await client.open(server.url + "/a", b"{}", JSON)
            assert (await anext(resp.chunks())).startswith(b"data: 0")
            await resp.aclose()
            assert not client._conns and not client._idle  # not returned to the pool
            await client.aclose()
        run(go())
        assert server.closed.wait(3), "the server never saw the disconnect"


@RUN
def test_connect_refused_and_bad_headers(run: Runner) -> None:
    async def go() -> None:
        client = _client()
        with pytest.raises(ConnectFailed):
            await client.open(f"http://127.0.0.1:{free_port()}/v1/completions", b"{}", JSON)
        with pytest.raises(ValueError):
            await client.open("http://127.0.0.1:1/a", b"{}", {"x-evil": "a\r\nhost: b"})
        with pytest.raises(ValueError):
            await client.open("http://127.0.0.1:1/a", b"{}", {"Content-Length": "1"})
        assert not client._conns
        await client.aclose()
    run(go())


@RUN
def test_pool_limits_wait_expiry_and_no_keepalive(run: Runner) -> None:
    engine = Engine()
    with serving(engine) as server:
        url = server.url + "/stream"

        async def go() -> None:
            client = _client(connect_s=1.0, max_connections=1, keepalive_expiry_s=0.2)
            held = await client.open(url, b"1.5", JSON)
            t0 = time.monotonic()
            with pytest.raises(ConnectFailed):  # the only connection is busy: waits connect_s, then gives up
                await client.open(url, b"", JSON)
            assert 0.9 < time.monotonic() - t0 < 1.4
            waiting = asyncio.ensure_future(client.open(url, b"", JSON))
            await held.read()  # the answer completes (0.5 s on): the connection goes back, the waiter takes it
            second = await waiting
            await second.read()
            await asyncio.sleep(0.3)  # past keepalive_expiry_s: the next request connects anew
            assert (await _post(client, url, b""))[0] == 200
            await client.aclose()

            no_keep = _client(max_keepalive=0)
            for _ in range(2):
                assert (await _post(no_keep, url, b""))[0] == 200
            await no_keep.aclose()
        run(go())
    ports = [s["port"] for s in engine.seen]
    assert ports[0] == ports[1] != ports[2]  # the waiter reused the socket; expiry dropped it
    assert ports[3] != ports[4]  # max_keepalive=0: never kept


@RUN
def test_https_upstream_verified_against_the_trust_store(run: Runner, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    engine = Engine()
    with serving(engine, ssl_certfile=str(cert), ssl_keyfile=str(key)) as server:
        url = server.url.replace("http://", "https://") + "/v1/completions"

        async def go() -> None:
            untrusted = _client()
            with pytest.raises(ConnectFailed):  # the certificate is not in the default trust store
                await untrusted.open(url, b"{}", JSON)
            await untrusted.aclose()
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read by ssl.create_default_context()
            trusting = _client()
            for _ in range(2):
                assert (await _post(trusting, url))[0] == 200
            await trusting.aclose()
        run(go())
    assert len(engine.seen) == 2 and engine.seen[0]["port"] == engine.seen[1]["port"]


@RUN
def test_sent_runs_once_per_request(run: Runner) -> None:
    """``sent`` (the router records a prompt's keys there) runs once per request: on a pooled
    connection right after the request is written; with no idle connection before connecting
    (a connect may wait, and no other request must be routed without seeing the keys); on a
    refused connect it ran once and the error still surfaces."""
    engine = Engine()
    calls: list[tuple[str, int]] = []

    async def go() -> None:
        client = _client()
        try:
            url = server.url + "/a"
            await _read(await client.open(url, b'{"n": 1}', JSON, sent=lambda: calls.append(("cold", len(engine.seen)))))
            for n in (2, 3):
                resp = await client.open(url, b'{"n": %d}' % n, JSON, sent=lambda n=n: calls.append(("warm", n)))
                await _read(resp)
            with pytest.raises(ConnectFailed):
                await client.open(f"http://127.0.0.1:{free_port()}/a", b"{}", JSON,
                                  sent=lambda: calls.append(("refused", 0)))
        finally:
            await client.aclose()

    async def _read(resp: Any) -> None:
        try:
            await resp.read()
        finally:
            await resp.aclose()

    with serving(engine) as server:
        run(go())
    assert calls == [("cold", 0), ("warm", 2), ("warm", 3), ("refused", 0)]
    assert [orjson.loads(s["body"])["n"] for s in engine.seen if s.get("body")] == [1, 2, 3]
