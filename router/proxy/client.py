"""The one shared HTTP client to the engines, behind a small interface.

``UpstreamClient.open`` sends a POST and returns once the status line and headers are in;
the body is pulled chunk by chunk with ``UpstreamResponse.chunks()``. Everything the
transport can raise is translated here into the three exceptions below, so the choice of
client never leaks into the rest of the proxy. ``make_client`` picks it from
``proxy.client``: "h1" (``router.proxy.h1``, a lean HTTP/1.1 client on asyncio.Protocol and
httptools), "aiohttp" (its C parser made a proxied request 5-15x cheaper in CPU than httpx
here), or httpx as the pure-Python alternative; the figures are at ProxyConfig.client.

Timeouts: the transport enforces connect and pool waits; time to first byte, idle gaps
and the total are enforced by ``router.proxy.forward`` with asyncio deadlines, because they
change meaning between the first chunk and the rest and httpx's per-request read timeout
cannot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

import aiohttp
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

    async def read(self) -> bytes:
        """The whole remaining body (a non-streaming answer), with the errors of ``chunks``."""
        ...

    async def aclose(self) -> None: ...


class UpstreamClient(Protocol):
    async def open(self, url: str, body: bytes, headers: Mapping[str, str], *,
                   sent: Callable[[], None] | None = None) -> UpstreamResponse:
        """POST ``body``; ``sent`` is called once the request is on its way (h1: right after the
        write; the library clients: just before they send), for work that must not delay it."""
        ...

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

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

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

    async def open(self, url: str, body: bytes, headers: Mapping[str, str], *,
                   sent: Callable[[], None] | None = None) -> UpstreamResponse:
        request = self._client.build_request("POST", url, content=body, headers=headers)
        if sent is not None:
            sent()
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


class _AiohttpResponse:
    __slots__ = ("_done", "_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._done = False
        self.status = resp.status
        self.headers: list[tuple[bytes, bytes]] = list(resp.raw_headers)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                if chunk:
                    yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise TimedOut(type(exc).__name__) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise StreamBroken(type(exc).__name__) from None
        self._done = True

    async def read(self) -> bytes:
        # One await for the whole body instead of an async generator step per chunk.
        try:
            body = await self._resp.read()
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise TimedOut(type(exc).__name__) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise StreamBroken(type(exc).__name__) from None
        self._done = True
        return body

    async def aclose(self) -> None:
        if self._done:
            self._resp.release()  # read to the end: the connection goes back to the pool
        else:
            # Unfinished: drop the connection, so the engine sees the disconnect and aborts.
            self._resp.close()


class AiohttpUpstream:
    """aiohttp.ClientSession on one connector sized for thousands of concurrent streams."""

    def __init__(self, proxy: ProxyConfig, timeouts: TimeoutsConfig) -> None:
        connector = aiohttp.TCPConnector(limit=proxy.max_connections, limit_per_host=0,
                                         keepalive_timeout=proxy.keepalive_expiry_s, ttl_dns_cache=300)
        # sock_read is a backstop only: forward.py enforces first-byte and idle deadlines itself.
        read = max(timeouts.first_byte_s, timeouts.idle_s) + 1.0
        timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.connect_s,
                                        sock_connect=timeouts.connect_s, sock_read=read)
        # identity + no decompression: bytes are relayed raw and tapped for usage.
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                              headers={"accept-encoding": "identity"}, trust_env=False,
                                              skip_auto_headers=("User-Agent",))

    async def open(self, url: str, body: bytes, headers: Mapping[str, str], *,
                   sent: Callable[[], None] | None = None) -> UpstreamResponse:
        if sent is not None:
            sent()
        try:
            resp = await self._session.post(url, data=body, headers=headers, allow_redirects=False)
        except aiohttp.ClientConnectorError as exc:  # refused, unreachable, DNS: nothing was sent
            raise ConnectFailed(type(exc).__name__) from None
        except aiohttp.ConnectionTimeoutError as exc:
            raise ConnectFailed(type(exc).__name__) from None
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise TimedOut(type(exc).__name__) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise StreamBroken(type(exc).__name__) from None
        return _AiohttpResponse(resp)

    async def aclose(self) -> None:
        await self._session.close()


def make_client(proxy: ProxyConfig, timeouts: TimeoutsConfig) -> UpstreamClient:
    """The configured client; call inside the running event loop (aiohttp binds to it)."""
    if proxy.client == "h1":
        from router.proxy.h1 import H1Upstream  # h1 imports this module's exceptions

        return H1Upstream(proxy, timeouts)
    if proxy.client == "httpx":
        return HttpxUpstream(proxy, timeouts)
    return AiohttpUpstream(proxy, timeouts)
