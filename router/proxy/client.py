"""The one shared HTTP client to the engines, behind a small interface.

``UpstreamClient.open`` sends a POST and returns once the status line and headers are in;
the body is pulled chunk by chunk with ``UpstreamResponse.chunks()``. Everything the
transport can raise is translated here into the three exceptions below, so the rest of
the proxy (and the choice of httpx today, perhaps aiohttp after measuring) never leaks.

Timeouts: the transport enforces connect and pool waits; time to first byte, idle gaps
and the total are enforced by ``router.proxy.forward`` with asyncio deadlines, because they
change meaning between the first chunk and the rest and httpx's per-request read timeout
cannot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import httpx

from router.config import ProxyConfig, TimeoutsConfig


class UpstreamFailure(Exception):
    """The replica failed before or during the answer; ``reason`` labels RETRIES."""

    reason = "broken"


class ConnectFailed(UpstreamFailure):
    reason = "connect"


class StreamBroken(UpstreamFailure):
    reason = "broken"


class TimedOut(UpstreamFailure):
    reason = "timeout"


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class UpstreamClient(Protocol):
    async def open(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class _HttpxResponse:
    __slots__ = ("_resp", "headers", "status")

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self.status = resp.status_code
        self.headers: list[tuple[bytes, bytes]] = resp.headers.raw

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.aiter_raw():
                if chunk:
                    yield chunk
        except httpx.TimeoutException as exc:
            raise TimedOut(type(exc).__name__) from None
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise StreamBroken(type(exc).__name__) from None

    async def aclose(self) -> None:
        # Closing an unfinished stream drops the connection: the engine sees the
        # disconnect and aborts the request (that is how cancellation propagates).
        await self._resp.aclose()


class HttpxUpstream:
    """httpx.AsyncClient with a pool sized for thousands of concurrent streams."""

    def __init__(self, proxy: ProxyConfig, timeouts: TimeoutsConfig) -> None:
        limits = httpx.Limits(max_connections=proxy.max_connections,
                              max_keepalive_connections=proxy.max_keepalive,
                              keepalive_expiry=proxy.keepalive_expiry_s)
        # read is a backstop only: forward.py enforces first-byte and idle deadlines itself.
        read = max(timeouts.first_byte_s, timeouts.idle_s) + 1.0
        timeout = httpx.Timeout(connect=timeouts.connect_s, read=read, write=timeouts.idle_s,
                                pool=timeouts.connect_s)
        # identity: bytes are relayed raw (aiter_raw) and the SSE tap reads them, so the
        # engine must not compress (httpx would otherwise ask for gzip/br/zstd by default).
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False,
                                         follow_redirects=False, headers={"accept-encoding": "identity"})

    async def open(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        request = self._client.build_request("POST", url, content=body, headers=headers)
        try:
            resp = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            # A pool or connect timeout means nothing reached the replica: safe to retry.
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                raise ConnectFailed(type(exc).__name__) from None
            raise TimedOut(type(exc).__name__) from None
        except httpx.ConnectError as exc:
            raise ConnectFailed(type(exc).__name__) from None
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise StreamBroken(type(exc).__name__) from None
        return _HttpxResponse(resp)

    async def aclose(self) -> None:
        await self._client.aclose()
