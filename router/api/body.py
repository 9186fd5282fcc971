"""Reading a request body under the size limit: Content-Length first, then the bytes as they stream."""

from __future__ import annotations

from starlette.requests import Request

from router.errors import BadRequest, PayloadTooLarge


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest("Content-Length is not an integer") from None
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    total = 0
    # A chunked or lying client is cut off as soon as it passes the limit, not after.
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
