"""The server protocol (router.api.protocol) on real uvicorn over loopback sockets.

It holds an answer's head until the body's first bytes so both leave in one write; these
tests check that the bytes a client sees are unchanged, and that a head whose body comes
later is not held back (a streamed answer's head must reach the client before its first
token exists).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

from router.api.protocol import UVICORN_HTTP
from tests.support.servers import serving

BODY = b'{"ok":true}'


def _fixed(scope: dict[str, Any]) -> bool:
    return scope["path"] == "/fixed"


def make_app(release: threading.Event) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        while (await receive()).get("more_body"):
            pass
        if _fixed(scope):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
            await send({"type": "http.response.body", "body": BODY})
            return
        # A stream whose first chunk exists only after the client has seen the head.
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(500):
            if release.is_set():
                break
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def _read_until(sock: socket.socket, marker: bytes, limit: float = 5.0) -> bytes:
    sock.settimeout(limit)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_answers_on_one_keep_alive_connection_are_intact() -> None:
    with serving(make_app(threading.Event()), http=UVICORN_HTTP) as server, \
            socket.create_connection(("127.0.0.1", server.port)) as sock:
        for _ in range(3):
            sock.sendall(b"POST /fixed HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
            data = _read_until(sock, BODY)
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert b"content-length: 11" in head.lower()
            assert body == BODY


def test_a_head_whose_body_comes_later_is_sent_at_once() -> None:
    release = threading.Event()
    with serving(make_app(release), http=UVICORN_HTTP) as server, \
            socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /stream HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        head = _read_until(sock, b"\r\n\r\n", limit=3.0)  # times out if the head waits for the body
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"data: 1" not in head
        release.set()
        rest = _read_until(sock, b"0\r\n\r\n")
        assert b"data: 1\n\n" in rest
