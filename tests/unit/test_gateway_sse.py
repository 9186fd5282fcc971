"""The SSE tap: what the client receives does not depend on how the upstream's bytes were
split into chunks, the usage object is found, and the router's own usage chunk is dropped."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from router.proxy.sse import SseTap, cached_tokens, error_event, usage_of_body

USAGE = {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}}


def _stream(n: int, *, usage: bool, sep: bytes = b"\n\n") -> bytes:
    events = [orjson.dumps({"choices": [{"index": 0, "text": f"piece{i}"}], "usage": None}) for i in range(n)]
    if usage:
        events.append(orjson.dumps({"choices": [], "usage": USAGE}))
    return b"".join(b"data: " + e + sep for e in events) + b"data: [DONE]" + sep


def _run(tap: SseTap, data: bytes, cuts: list[int]) -> bytes:
    out = []
    prev = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out.append(tap.feed(data[prev:cut]))
        prev = cut
    out.append(tap.flush())
    return b"".join(out)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 6), strip=st.booleans(), crlf=st.booleans(),
       cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_output_is_independent_of_chunking(n: int, strip: bool, crlf: bool, cuts: list[int]) -> None:
    sep = b"\r\n\r\n" if crlf else b"\n\n"
    data = _stream(n, usage=True, sep=sep)
    cuts = [c for c in cuts if c < len(data)]
    whole, split = SseTap(strip_usage=strip), SseTap(strip_usage=strip)
    expected = _run(whole, data, [])
    assert _run(split, data, cuts).replace(b"\r\n", b"\n") == expected.replace(b"\r\n", b"\n")
    assert split.usage == USAGE and split.done
    assert (b'"usage":{' in expected) is not strip
    assert expected.count(b"piece") == n


def test_complete_events_pass_through_unchanged_and_partial_ones_wait() -> None:
    tap = SseTap(strip_usage=False)
    first = b'data: {"choices":[{"text":"a"}]}\n\n'
    assert tap.feed(first) == first
    assert tap.feed(b'data: {"choi') == b""
    assert tap.feed(b'ces":[]}\n\ndata: [DONE]\n\n') == b'data: {"choices":[]}\n\ndata: [DONE]\n\n'
    assert tap.done and tap.usage is None


def test_non_streaming_usage_and_error_event() -> None:
    body = orjson.dumps({"choices": [], "usage": USAGE})
    assert cached_tokens(usage_of_body(body)) == 32
    assert usage_of_body(b"not json") is None
    assert cached_tokens({"prompt_tokens": 3}) is None
    event = error_event("broke", "stream_broken")
    lines = [e for e in event.split(b"\n\n") if e]
    assert orjson.loads(lines[0][len(b"data: "):])["error"]["code"] == "stream_broken"
    assert lines[1] == b"data: [DONE]"
