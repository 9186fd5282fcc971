"""Reading a request body under the size limit: Content-Length first, then the bytes as they stream."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import ClientDisconnect, Request

from router.errors import BadRequest, PayloadTooLarge


def check_declared(headers: Mapping[str, str], limit: int) -> None:
    """Refuse a body whose Content-Length is over ``limit`` (or not a number) before reading it."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest("Content-Length is not an integer") from None
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes exceeds the limit of {limit}")


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    check_declared(request.headers, limit)
    chunks: list[bytes] = []
    total = 0
    # A chunked or lying client is cut off as soon as it passes the limit, not after.
    # ASGI receive() directly rather than Starlette's request.stream(): the same messages
    # without an async generator per request on the hot path.
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
