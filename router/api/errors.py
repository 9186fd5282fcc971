"""Error rendering: the one place a RouterError becomes an HTTP answer.

Every error leaves as ``{"error": {"message", "type", "code", "param"}}`` with the error's
status; 503 and 429 always carry ``Retry-After``. Unknown routes and methods get the same
shape. Anything else that escapes an endpoint is a bug: it is logged by type and traceback
only (exception messages can quote the prompt) and answered with a 500.
"""

from __future__ import annotations

import functools
import logging
import math
import traceback
from collections.abc import Awaitable, Callable

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from router.errors import BadRequest, NotFound, RouterError

log = logging.getLogger("cache_router.api")

Endpoint = Callable[[Request], Awaitable[Response]]


def error_parts(exc: RouterError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """An error's answer as status, headers and body (``error_response``, and the lean
    server path of ``router.api.hot`` that writes them to the socket itself)."""
    headers = [(b"content-type", b"application/json")]
    if exc.status in (429, 503):
        retry = exc.retry_after if exc.retry_after is not None else 1.0
        headers.append((b"retry-after", str(max(1, math.ceil(retry))).encode()))
    return exc.status, headers, orjson.dumps(exc.to_dict())


def error_response(exc: RouterError) -> Response:
    status, headers, body = error_parts(exc)
    response = Response(body, status_code=status)
    response.raw_headers += headers
    return response


def log_internal(exc: BaseException, where: str) -> RouterError:
    """Log a bug by type and traceback only; the error its client gets."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unhandled %s in %s (message withheld: it may quote the prompt)\n%s",
              type(exc).__name__, where, frames)
    return RouterError("internal error in the router; see its logs")


def internal_error(exc: BaseException, where: str) -> Response:
    return error_response(log_internal(exc, where))


def guarded(endpoint: Endpoint) -> Endpoint:
    """Render RouterErrors; turn anything unexpected into a logged 500."""

    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except RouterError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is listening; uvicorn drops it
        except Exception as exc:
            return internal_error(exc, request.url.path)

    return wrapper


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (no route matched) in OpenAI's shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        err: RouterError = NotFound(f"no route {request.method} {request.url.path}")
        err.code = "route_not_found"
    elif status == 405:
        err = BadRequest(f"method {request.method} not allowed on {request.url.path}")
        err.status, err.code = 405, "method_not_allowed"
    elif status < 500:
        err = BadRequest(str(getattr(exc, "detail", "bad request")))
        err.status = status
    else:
        return internal_error(exc, request.url.path)
    return error_response(err)


async def unhandled(request: Request, exc: Exception) -> Response:
    return internal_error(exc, request.url.path)
