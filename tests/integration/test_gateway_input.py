"""Bad input through a real router: every answer a 4xx in OpenAI's error shape, never a 5xx,
and a rejected request never reaches a replica."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import SIM_MODEL
from tests.support.router import HTTP, ScriptedEngine, running_router, scripted_engines
from tests.support.servers import UvicornThread

LIMIT = 4096
OK_PROMPT = {"model": "sim-model", "prompt": "hello"}


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[UvicornThread, ScriptedEngine]]:
    with scripted_engines(1) as (engine,), \
            running_router(backends=[engine.url], tokenizer=str(SIM_MODEL), max_body_bytes=LIMIT) as router:
        yield router, engine


def _assert_openai_error(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and isinstance(err["code"], str)
    return err  # type: ignore[no-any-return]


BAD_BODIES: list[tuple[str, bytes]] = [
    ("not json", b"{"),
    ("invalid utf-8", b'{"model": "sim-model", "prompt": "\xff\xfe"}'),
    ("array body", b"[1, 2]"),
    ("empty body", b""),
    ("no model", b'{"prompt": "hi"}'),
    ("model not a string", b'{"model": 7, "prompt": "hi"}'),
    ("prompt missing", b'{"model": "sim-model"}'),
    ("prompt a number", b'{"model": "sim-model", "prompt": 3}'),
    ("prompt empty list", b'{"model": "sim-model", "prompt": []}'),
    ("mixed prompt list", b'{"model": "sim-model", "prompt": ["a", 1]}'),
    ("negative token id", b'{"model": "sim-model", "prompt": [1, -2]}'),
    ("token id past vocab", b'{"model": "sim-model", "prompt": [1, 8192]}'),
    ("huge token id", b'{"model": "sim-model", "prompt": [1, 99999999999999999999]}'),
    ("bool token id", b'{"model": "sim-model", "prompt": [true]}'),
    ("max_tokens zero", b'{"model": "sim-model", "prompt": "hi", "max_tokens": 0}'),
    ("max_tokens absurd", b'{"model": "sim-model", "prompt": "hi", "max_tokens": 1000000000000}'),
    ("max_tokens string", b'{"model": "sim-model", "prompt": "hi", "max_tokens": "5"}'),
    ("stream not bool", b'{"model": "sim-model", "prompt": "hi", "stream": "yes"}'),
    ("stream_options not object", b'{"model": "sim-model", "prompt": "hi", "stream_options": 1}'),
    ("cache_salt not string", b'{"model": "sim-model", "prompt": "hi", "cache_salt": 5}'),
    ("deep nesting", b'{"model": "sim-model", "prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}"),
]

BAD_CHAT: list[tuple[str, bytes]] = [
    ("messages missing", b'{"model": "sim-model"}'),
    ("messages empty", b'{"model": "sim-model", "messages": []}'),
    ("message not object", b'{"model": "sim-model", "messages": ["hi"]}'),
    ("bad role", b'{"model": "sim-model", "messages": [{"role": "wizard", "content": "hi"}]}'),
    ("content a number", b'{"model": "sim-model", "messages": [{"role": "user", "content": 5}]}'),
    ("text part without text", b'{"model": "sim-model", "messages": [{"role": "user", "content": [{"type": "text"}]}]}'),
    ("max_completion_tokens negative",
     b'{"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}'),
]


@pytest.mark.parametrize(("case", "body"), BAD_BODIES, ids=[c for c, _ in BAD_BODIES])
def test_bad_completion_bodies_are_400(stack: tuple[UvicornThread, ScriptedEngine], case: str, body: bytes) -> None:
    router, engine = stack
    before = len(engine.requests)
    resp = HTTP.post(router.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    _assert_openai_error(resp, 400)
    assert len(engine.requests) == before


@pytest.mark.parametrize(("case", "body"), BAD_CHAT, ids=[c for c, _ in BAD_CHAT])
def test_bad_chat_bodies_are_400(stack: tuple[UvicornThread, ScriptedEngine], case: str, body: bytes) -> None:
    router, engine = stack
    before = len(engine.requests)
    _assert_openai_error(HTTP.post(router.url + "/v1/chat/completions", content=body), 400)
    assert len(engine.requests) == before


def test_unknown_model_is_404(stack: tuple[UvicornThread, ScriptedEngine]) -> None:
    router, _ = stack
    err = _assert_openai_error(HTTP.post(router.url + "/v1/completions", json={"model": "nope", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found"


def test_body_over_limit_is_413_by_length_and_by_stream(stack: tuple[UvicornThread, ScriptedEngine]) -> None:
    router, engine = stack
    before = len(engine.requests)
    big = {"model": "sim-model", "prompt": "x" * (LIMIT + 10)}
    _assert_openai_error(HTTP.post(router.url + "/v1/completions", json=big), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the router must count as it reads
        yield b'{"model": "sim-model", "prompt": "'
        for _ in range(LIMIT // 512 + 2):
            yield b"y" * 512
        yield b'"}'

    _assert_openai_error(HTTP.post(router.url + "/v1/completions", content=chunked()), 413)
    assert len(engine.requests) == before
    # Right at the limit is fine.
    ok = {"model": "sim-model", "prompt": "z" * (LIMIT - 100)}
    assert HTTP.post(router.url + "/v1/completions", json=ok).status_code == 200


def test_unknown_route_and_method_in_openai_shape(stack: tuple[UvicornThread, ScriptedEngine]) -> None:
    router, _ = stack
    assert _assert_openai_error(HTTP.get(router.url + "/v2/nothing"), 404)["code"] == "route_not_found"
    assert _assert_openai_error(HTTP.get(router.url + "/v1/completions"), 405)["code"] == "method_not_allowed"


def test_valid_shapes_pass(stack: tuple[UvicornThread, ScriptedEngine]) -> None:
    router, _ = stack
    for body in ({"model": "sim-model", "prompt": ["a", "b"]}, {"model": "sim-model", "prompt": [[1, 2], [3]]},
                 {"model": "sim-model", "prompt": [5, 6, 7], "max_tokens": 3, "cache_salt": "s"}):
        assert HTTP.post(router.url + "/v1/completions", json=body).status_code == 200
    chat = {"model": "sim-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert HTTP.post(router.url + "/v1/chat/completions", json=chat).status_code == 200


def test_openapi_document_agrees_with_the_parser(stack: tuple[UvicornThread, ScriptedEngine]) -> None:
    import jsonschema
    import orjson

    router, _ = stack
    doc = HTTP.get(router.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/debug/route", "/v1/models"} <= set(doc["paths"])
    schema = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator(schema)
    for case, body in BAD_BODIES:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            continue
        if case in ("token id past vocab", "huge token id"):
            continue  # the vocabulary bound is the model's, not the schema's
        assert not validator.is_valid(data), case
    for good in ({"model": "m", "prompt": "x"}, {"model": "m", "prompt": [[1], [2, 3]]},
                 {"model": "m", "prompt": ["a"], "max_tokens": 5, "temperature": 0.2}):
        assert validator.is_valid(good), good
