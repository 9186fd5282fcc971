"""Reading the usage out of an SSE stream while passing it through.

The tap forwards every complete event as soon as its closing blank line arrives; only an
incomplete event's bytes wait (a client cannot parse half an event anyway). Chunks that do
carry no usage object are forwarded without being parsed. When the router asked for
usage itself (``stream_options.include_usage``) and the client did not, the usage-only
chunk (``"choices": []``) is dropped from what the client receives.
"""

from __future__ import annotations

from typing import Any

import orjson

_SEP = b"\n\n"
_SEP_CRLF = b"\r\n\r\n"
_DONE = b"data: [DONE]"


def _has_usage(data: bytes) -> bool:
    # vLLM puts "usage":null in every chunk when usage is on; only an object is worth parsing.
    return b'"usage":{' in data or b'"usage": {' in data


class SseTap:
    __slots__ = ("_buf", "_strip", "done", "usage")

    def __init__(self, *, strip_usage: bool) -> None:
        self._strip = strip_usage
        self._buf = b""
        self.usage: dict[str, Any] | None = None
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to forward now (possibly empty)."""
        buf = self._buf + chunk if self._buf else chunk
        end = max(buf.rfind(_SEP) + 2 if buf.rfind(_SEP) >= 0 else -1,
                  buf.rfind(_SEP_CRLF) + 4 if buf.rfind(_SEP_CRLF) >= 0 else -1)
        if end < 0:
            self._buf = buf
            return b""
        ready, self._buf = buf[:end], buf[end:]
        if not self.done and _DONE in ready:
            self.done = True
        if not _has_usage(ready):
            return ready
        return self._scan(ready)

    def flush(self) -> bytes:
        """Whatever is left when the upstream ends (an unterminated last event)."""
        rest, self._buf = self._buf, b""
        if rest and _DONE in rest:
            self.done = True
        return self._scan(rest) if _has_usage(rest) else rest

    def _scan(self, ready: bytes) -> bytes:
        out: list[bytes] = []
        for event in ready.replace(_SEP_CRLF, _SEP).split(_SEP):
            if not event.strip():
                continue
            if _has_usage(event) and self._take_usage(event):
                continue
            out.append(event + _SEP)
        return b"".join(out)

    def _take_usage(self, event: bytes) -> bool:
        """Record the usage; True when the event should be dropped for the client."""
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            try:
                data = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return False
            if not isinstance(data, dict):
                return False
            usage = data.get("usage")
            if isinstance(usage, dict):
                self.usage = usage
                return self._strip and not data.get("choices")
        return False


def usage_of_body(body: bytes) -> dict[str, Any] | None:
    """The usage of a non-streaming JSON answer, if any."""
    if b'"usage"' not in body:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = data.get("usage") if isinstance(data, dict) else None
    return usage if isinstance(usage, dict) else None


def cached_tokens(usage: dict[str, Any] | None) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens``; None when the engine did not say."""
    if usage is None:
        return None
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return None
    cached = details.get("cached_tokens")
    return cached if isinstance(cached, int) and not isinstance(cached, bool) else None


def error_event(message: str, code: str) -> bytes:
    """The SSE tail a client gets when a stream breaks after its first byte."""
    payload = orjson.dumps({"error": {"message": message, "type": "upstream_error", "code": code}})
    return b"data: " + payload + b"\n\n" + _DONE + b"\n\n"
