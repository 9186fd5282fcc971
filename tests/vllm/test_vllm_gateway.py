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

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from router.hashing.tokenizer import ModelTokenizer
from router.metrics import REGISTRY
from router.types import BackendId
from tests.support.router import router_config, running_router
from tests.support.servers import UvicornThread
from tests.vllm.engine import BLOCK_SIZE, SERVED_MODEL, VllmEngine
from tests.vllm.prediction import Words
from tests.vllm.sync import EngineSync, ingest_of

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
        self.after: Callable[[], None] | None = None  # precise mode: wait for the engine's events
        self.sync: EngineSync | None = None

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

    def chat(self, label: str, messages: list[dict[str, Any]], *, stream: bool = False, **extra: Any) -> Hop:
        """``extra``: vLLM's chat fields (add_generation_prompt, continue_final_message, parts...)."""
        dry = self.dry_run({"model": SERVED_MODEL, "messages": messages, "max_tokens": 1, **extra})
        if stream:
            raw = self.client.chat.completions.with_raw_response.create(
                model=SERVED_MODEL, messages=messages, max_tokens=1, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True}, extra_body=extra,
            )  # fmt: skip
            usage = [c.usage for c in raw.parse() if c.usage is not None][-1]
        else:
            raw = self.client.chat.completions.with_raw_response.create(
                model=SERVED_MODEL, messages=messages, max_tokens=1, extra_body=extra,  # type: ignore[arg-type]
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
        if self.after is not None:
            self.after()
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


def test_stream_without_usage_still_feeds_back_cached_tokens(via_router: RouterClient, words: Words) -> None:
    """The client asks for no usage: the router asks the engine for it, reads cached_tokens, strips it."""
    prompt = words.text(110)
    via_router.completion("first", prompt)
    labels = {"model": SERVED_MODEL, "arm": "main"}
    before = REGISTRY.get_sample_value("cache_router_engine_cached_tokens_total", labels) or 0.0
    # httpx reads the stream to its end. (The sync openai client closes the connection right after
    # [DONE]; the router then sometimes skips its feedback: reported to the gateway.)
    body = {"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 1, "stream": True}
    with via_router.http.stream("POST", "/v1/completions", json=body) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
        predicted = int(response.headers["x-cache-router-matched-tokens"])
    assert events[-1] == "data: [DONE]"
    assert not any('"cached_tokens"' in e for e in events), "usage leaked to a client that did not ask"
    assert predicted == 96
    deadline = time.monotonic() + 5.0  # the router's feedback runs as the stream ends
    while (
        REGISTRY.get_sample_value("cache_router_engine_cached_tokens_total", labels) or 0.0
    ) - before < predicted:
        assert time.monotonic() < deadline, "the router never read the engine's cached_tokens from the stream"
        time.sleep(0.05)
    assert (
        REGISTRY.get_sample_value("cache_router_engine_cached_tokens_total", labels) or 0.0
    ) - before == predicted


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
    prefill = [*other, {"role": "assistant", "content": "Well," + words.text(40)}]
    via_router.chat("prefill", prefill, add_generation_prompt=False, continue_final_message=True)
    via_router.chat("prefill again", prefill, add_generation_prompt=False, continue_final_message=True)
    parts = [
        system,
        {"role": "user", "content": [{"type": "text", "text": t} for t in ("One.", "Two.", "Three.")]},
    ]
    via_router.chat("content parts", parts)
    via_router.chat("content parts again", parts)
    via_router.assert_all_match()
    assert all(h.cached > 0 for h in via_router.hops[1:]), via_router.table()


@pytest.fixture
def via_precise_router(
    fresh_engine: VllmEngine, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[RouterClient]:
    """The router in precise mode: it binds the SUB the engine's PUB connects to (topic kv)."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN)
    backend = {
        "url": fresh_engine.url,
        "kv_topic": fresh_engine.topic,
        "kv_replay": fresh_engine.replay_endpoint,
    }
    config = router_config(
        [backend], policy="cache_aware", tokenizer=str(tiny_model_dir), block_size=BLOCK_SIZE,
        kv_events_bind=fresh_engine.events_endpoint, index={"mode": "precise"},
        auth={"admin_token_file": str(token_file)},
    )  # fmt: skip
    with running_router(config) as router:
        applier = ingest_of(router.server.config.app).applier(BackendId(fresh_engine.url))
        assert applier is not None, "the router ingests no events from the engine"
        sync = EngineSync(fresh_engine.replay_endpoint, applier)
        client = RouterClient(router, fresh_engine)
        client.sync = sync
        for attempt in range(20):  # until the engine's PUB has joined (slow joiner) and the router caught up
            client.client.completions.create(
                model=SERVED_MODEL, prompt=f"warm-up {attempt}" + " x" * 40, max_tokens=1
            )
            sync.settle()
            if applier.state.expected is not None:
                break
        else:
            raise AssertionError("no KV event from the engine reached the router")
        client.after = sync.settle
        yield client
        client.close()


def test_precise_mode_through_eviction_reset_and_restart(
    via_precise_router: RouterClient, words: Words
) -> None:
    """/debug/route and the header equal cached_tokens after BlockRemoved, AllBlocksCleared and a restart."""
    rc = via_precise_router
    url = rc.engine.url
    sync = rc.sync
    assert sync is not None
    shared = words.text(70)
    prompts = [shared + words.text(300) for _ in range(8)]  # 11 blocks each, 2 shared: 74 > 64 blocks
    for i, prompt in enumerate(prompts):
        rc.completion(f"fill {i}", prompt)
    for i in (0, 7, 1):
        rc.completion(f"revisit {i}", prompts[i])
    assert (REGISTRY.get_sample_value("cache_router_kv_events_total", {"backend": url, "type": "BlockRemoved"})
            or 0) > 0, "no eviction reached the router\n" + rc.table()  # fmt: skip

    rc.engine.reset_prefix_cache()
    rc.completion("unrelated, after reset", words.text(50))  # carries AllBlocksCleared
    rc.completion("after reset: 7", prompts[7])
    rc.completion("after reset: 7 again", prompts[7])

    seq_before = sync.applier.state.expected or 0
    rc.engine.restart()  # same ports: the new process connects to the router's SUB again
    sync.engine_restarted()
    wait_ready(rc)
    rc.completion("unrelated, after restart", words.text(60))  # its batch has seq 0
    assert (sync.applier.state.expected or 0) < seq_before, "the router did not follow the sequence back to 0"
    rc.completion("after restart: 1", prompts[1])
    rc.completion("after restart: 1 again", prompts[1])
    rc.assert_all_match()
    cached = {h.label: h.cached for h in rc.hops}
    assert cached["after reset: 7"] == 0 and cached["after restart: 1"] == 0, rc.table()
    assert cached["after reset: 7 again"] == cached["after restart: 1 again"] == 352, rc.table()


def wait_ready(rc: RouterClient, timeout: float = 30.0) -> None:
    """After an engine restart: until the router's health probes see the replica again."""
    deadline = time.monotonic() + timeout
    while rc.http.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "the router never saw the restarted engine healthy"
        time.sleep(0.1)


def test_prompt_options_vllm_honours_move_the_router_keys_too(via_router: RouterClient, words: Words) -> None:
    """``add_special_tokens`` and ``truncate_prompt_tokens`` change the ids vLLM caches; the router's
    keys must follow them, or it predicts hits that never happen (or misses that hit)."""
    prompt = words.text(120)
    sent = [("no BOS", {"add_special_tokens": False}), ("no BOS again", {"add_special_tokens": False}),
            ("with BOS", {}), ("last 70 tokens", {"truncate_prompt_tokens": 70}),
            ("last 70 tokens again", {"truncate_prompt_tokens": 70})]
    for label, extra in sent:
        dry = via_router.dry_run({"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 1, **extra})
        raw = via_router.client.completions.with_raw_response.create(
            model=SERVED_MODEL, prompt=prompt, max_tokens=1, extra_body=extra)
        via_router._hop(label, raw.headers, raw.parse().usage, dry)
    messages = [{"role": "user", "content": words.text(90)}]
    via_router.chat("chat, extra BOS", messages, add_special_tokens=True)
    via_router.chat("chat, extra BOS again", messages, add_special_tokens=True)
    via_router.assert_all_match()
    cached = {h.label: h.cached for h in via_router.hops}
    assert cached["no BOS again"] > 0 and cached["last 70 tokens again"] > 0 and cached["chat, extra BOS again"] > 0
    assert cached["with BOS"] == 0, via_router.table()  # BOS shifts every block: nothing shared with "no BOS"
