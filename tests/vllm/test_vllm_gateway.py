"""Through the router: its ``x-cache-router-matched-tokens`` equals a real vLLM's cached_tokens.

The whole product path on a real engine: ``create_app`` (cache_aware, the tiny model's
tokenizer, block size 32, one replica, approximate mode) on a real uvicorn, the ``openai``
client in front, a real vLLM behind. Request by request, the router's predicted matched
tokens (response header, and ``POST /debug/route`` before sending) must equal the
``usage.prompt_tokens_details.cached_tokens`` the engine returns through the router.
Each test starts from an empty engine cache and a new router, and stays under the
engine's 64 blocks, so the router's picture and the engine's cache can be compared exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from router.hashing.tokenizer import ModelTokenizer
from tests.support.router import router_config, running_router
from tests.support.servers import UvicornThread
from tests.vllm.engine import BLOCK_SIZE, SERVED_MODEL, VllmEngine
from tests.vllm.prediction import Words

pytestmark = pytest.mark.vllm

ADMIN_TOKEN = "vllm-test-admin"


@dataclass(frozen=True)
class Hop:
    label: str
    header: int  # x-cache-router-matched-tokens
    dry_run: int  # /debug/route matched_tokens for the engine, just before sending
    cached: int  # the engine's cached_tokens, passed through the router
    backend: str

    @property
    def ok(self) -> bool:
        return self.header == self.cached == self.dry_run


class RouterClient:
    """The openai client through the router, plus a dry run of each request first."""

    def __init__(self, router: UvicornThread, engine: VllmEngine) -> None:
        self.router = router
        self.engine = engine
        self.client = openai.OpenAI(
            base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60.0
        )
        self.http = httpx.Client(base_url=router.url, timeout=30.0)
        self.hops: list[Hop] = []

    def dry_run(self, body: dict[str, Any]) -> int:
        response = self.http.post(
            "/debug/route", json=body, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert response.status_code == 200, response.text
        replicas = {r["backend"]: r["matched_tokens"] for r in response.json()["replicas"]}
        return int(replicas.get(self.engine.url, 0))

    def completion(self, label: str, prompt: str, *, stream: bool = False, salt: str | None = None) -> Hop:
        extra = {"cache_salt": salt} if salt is not None else {}
        dry = self.dry_run({"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 1, **extra})
        if stream:
            raw = self.client.completions.with_raw_response.create(
                model=SERVED_MODEL, prompt=prompt, max_tokens=1, stream=True,
                stream_options={"include_usage": True}, extra_body=extra,
            )  # fmt: skip
            usage = [c.usage for c in raw.parse() if c.usage is not None][-1]
        else:
            raw = self.client.completions.with_raw_response.create(
                model=SERVED_MODEL, prompt=prompt, max_tokens=1, extra_body=extra
            )
            usage = raw.parse().usage
        return self._hop(label, raw.headers, usage, dry)

    def chat(self, label: str, messages: list[dict[str, Any]], *, stream: bool = False) -> Hop:
        dry = self.dry_run({"model": SERVED_MODEL, "messages": messages, "max_tokens": 1})
        if stream:
            raw = self.client.chat.completions.with_raw_response.create(
                model=SERVED_MODEL, messages=messages, max_tokens=1, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True},
            )  # fmt: skip
            usage = [c.usage for c in raw.parse() if c.usage is not None][-1]
        else:
            raw = self.client.chat.completions.with_raw_response.create(
                model=SERVED_MODEL, messages=messages, max_tokens=1,  # type: ignore[arg-type]
            )  # fmt: skip
            usage = raw.parse().usage
        return self._hop(label, raw.headers, usage, dry)

    def _hop(self, label: str, headers: httpx.Headers, usage: Any, dry: int) -> Hop:
        assert usage is not None and usage.prompt_tokens_details is not None, "no usage through the router"
        hop = Hop(
            label, int(headers["x-cache-router-matched-tokens"]), dry,
            usage.prompt_tokens_details.cached_tokens or 0, headers["x-cache-router-backend"],
        )  # fmt: skip
        self.hops.append(hop)
        return hop

    def table(self) -> str:
        lines = [f"{'request':<30} {'header':>6} {'dry-run':>7} {'cached':>6}"]
        lines += [
            f"{h.label:<30} {h.header:>6} {h.dry_run:>7} {h.cached:>6}{'' if h.ok else '  <-- MISMATCH'}"
            for h in self.hops
        ]
        return "\n".join(lines) + f"\n(engine log: {self.engine.log_path})"

    def assert_all_match(self) -> None:
        assert all(h.backend == self.engine.url for h in self.hops), self.table()
        assert all(h.ok for h in self.hops), "router prediction != engine cached_tokens:\n" + self.table()

    def close(self) -> None:
        self.client.close()
        self.http.close()


@pytest.fixture
def via_router(fresh_engine: VllmEngine, tiny_model_dir: Path, tmp_path: Path) -> Iterator[RouterClient]:
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN)
    config = router_config(
        [{"url": fresh_engine.url}], policy="cache_aware", tokenizer=str(tiny_model_dir), block_size=BLOCK_SIZE,
        index={"mode": "approximate"}, auth={"admin_token_file": str(token_file)},
    )  # fmt: skip
    with running_router(config) as router:
        client = RouterClient(router, fresh_engine)
        yield client
        client.close()


@pytest.fixture
def words(tiny_model_dir: Path) -> Words:
    return Words(ModelTokenizer.from_dir(tiny_model_dir), seed=11)


def test_completions_through_the_router(via_router: RouterClient, words: Words) -> None:
    prefix = words.text(100)
    a, b, c = prefix + words.text(12), prefix + words.text(45), prefix + words.text(2)
    via_router.completion("A", a)
    via_router.completion("B", b)
    via_router.completion("C (stream)", c, stream=True)
    via_router.completion("A again", a)
    via_router.completion("B again (stream)", b, stream=True)
    exact = " " + " ".join(words.text(95).split())  # 96 tokens with BOS: the last-token cap
    via_router.completion("96 tokens", exact)
    via_router.completion("96 tokens again", exact)
    via_router.completion("salt x", a, salt="x")
    via_router.completion("salt y", a, salt="y")
    via_router.completion("salt x again", a, salt="x")
    via_router.assert_all_match()
    assert [h.cached for h in via_router.hops] == [0, 96, 96, 96, 128, 0, 64, 0, 0, 96], via_router.table()


def test_chat_through_the_router(via_router: RouterClient, words: Words) -> None:
    system = {"role": "system", "content": "You are terse." + words.text(60)}
    history: list[dict[str, Any]] = [system]
    for turn in range(4):
        history.append({"role": "user", "content": f"Q{turn}." + words.text(10 + 11 * turn)})
        via_router.chat(
            f"turn {turn}" + (" (stream)" if turn % 2 else ""), list(history), stream=bool(turn % 2)
        )
        history.append({"role": "assistant", "content": words.text(6).strip()})
    other = [system, {"role": "user", "content": "Another user." + words.text(20)}]
    via_router.chat("other user, same system", other)
    via_router.chat("other user again (stream)", other, stream=True)
    via_router.assert_all_match()
    assert all(h.cached > 0 for h in via_router.hops[1:]), via_router.table()
