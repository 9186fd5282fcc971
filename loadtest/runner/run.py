"""Drive one workload against one target and measure it: ``run_workload``.

A target is one OpenAI-compatible URL (a router, or a single engine), or several engine
URLs, which the runner then takes in turn itself (direct round robin: no proxy).
Arrivals are open-loop (Poisson at ``rate`` requests/s, or the trace's own clock) or
closed-loop (``concurrency`` conversations in flight). Every run is bounded by a
request count and, optionally, a duration: no request starts after the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest.engine.collector import settle, young_only
from loadtest.runner.ceiling import SentPrompt, ceiling
from loadtest.runner.client import RequestRecord, new_session, send
from loadtest.runner.engines import EngineUsage, FleetWatch, discover_engines
from loadtest.runner.summary import summarize
from loadtest.workloads import Api, Conversation, History, Workload
from loadtest.workloads.text import SIM_MODEL_DIR, load_tokenizer

log = logging.getLogger(__name__)
DEFAULT_BLOCK_SIZE = 16  # vLLM's default; used only when no engine reports cache_config_info


@dataclass
class RunOptions:
    """How to send a workload. ``rate`` and ``concurrency`` exclude each other; neither: trace clock or 8."""

    api: Api = "completions"
    stream: bool = True
    rate: float | None = None
    concurrency: int | None = None
    duration_s: float | None = None
    max_requests: int | None = None
    engines: list[str] | None = None      # engine URLs to read /metrics from; None: the direct targets or discovery
    model: str | None = None              # None: the target's first /v1/models entry
    block_size: int | None = None         # None: from the engines' vllm:cache_config_info
    tokenizer_dir: str = str(SIM_MODEL_DIR)
    request_timeout_s: float = 120.0
    think_time_s: float = 0.0             # multi-turn: pause between a reply and the next turn
    ramp_s: float = 0.0                   # closed loop: client i sends its first request at i * ramp_s / concurrency
    sample_interval_s: float = 0.25       # engine queue sampling for busy share
    progress: bool = True

    def arrival(self, workload: Workload) -> str:
        if self.rate is not None and self.concurrency is not None:
            raise ValueError("give either rate (open loop) or concurrency (closed loop), not both")
        if self.concurrency is not None:
            return "closed"
        if self.rate is not None:
            return "poisson"
        return "trace" if workload.timed else "closed"


@dataclass
class RunResult:
    """Everything measured in one run. ``to_dict`` is what ``--out FILE.json`` holds."""

    name: str
    targets: list[str]
    workload: str
    seed: int
    workload_params: dict[str, Any]
    options: dict[str, Any]
    arrival: str
    engine_urls: list[str]
    block_size: int
    started_at: str
    records: list[RequestRecord]
    engines: list[EngineUsage]
    summary: dict[str, Any]

    def to_dict(self, records: bool = True) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not records:
            out.pop("records")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        values = dict(data)
        values["records"] = [RequestRecord(**r) for r in values.get("records", [])]
        values["engines"] = [EngineUsage(**e) for e in values.get("engines", [])]
        return cls(**values)


@dataclass
class _Run:
    """Mutable state of one run in flight."""

    workload: Workload
    targets: list[str]
    options: RunOptions
    model: str
    session: aiohttp.ClientSession  # the measured requests; the httpx client only reads metrics
    budget: int
    deadline: float
    t0: float = field(default_factory=time.perf_counter)
    records: list[RequestRecord] = field(default_factory=list)
    sent: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    replies: dict[int, str] = field(default_factory=dict)
    progress: Progress | None = None
    task_id: Any = None
    failed: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        self._urls = itertools.cycle(self.targets)
        self.stopped = asyncio.Event()

    def stop(self) -> None:
        """Start nothing more; requests in flight finish and the run is reported as far as it got."""
        self.deadline = 0.0
        self.stopped.set()

    def may_send(self) -> bool:
        return len(self.records) < self.budget and time.perf_counter() < self.deadline

    async def conversation(self, conv: Conversation, scheduled_s: float | None = None) -> None:
        history = History(conv)
        for i in range(len(conv.turns)):
            if i and self.options.think_time_s:
                await asyncio.sleep(self.options.think_time_s)
            if not self.may_send():
                return
            path, body = history.body(i, self.options.api, self.model)
            record = RequestRecord(len(self.records), conv.id, i, time.perf_counter() - self.t0, next(self._urls))
            if i == 0 and scheduled_s is not None:
                # Open loop: how late the generator sent it. Latencies are timed from the real send, so a
                # late generator would hide queueing (coordinated omission); the report flags it.
                record.late_s = max(0.0, record.start_s - scheduled_s)
            self.records.append(record)
            self.sent.append((record.index, path, body))
            reply = await send(self.session, record, path, body, self.options.stream, self.options.request_timeout_s)
            self.replies[record.index] = reply
            self.failed += 0 if record.ok else 1
            if self.progress is not None:
                self.progress.update(self.task_id, advance=1, description=f"{self.label} errors={self.failed}")
            if not record.ok:
                return  # later turns need this reply; the conversation ends here
            history.replies.append(reply)

    async def open_loop(self, starts: Sequence[float]) -> None:
        tasks: list[asyncio.Task[None]] = []
        for conv, at in zip(self.workload.conversations, starts, strict=False):
            delay = self.t0 + at - time.perf_counter()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopped.wait(), delay)
            if not self.may_send():
                break
            tasks.append(asyncio.create_task(self.conversation(conv, at), name=f"loadtest-conv-{conv.id}"))
        await asyncio.gather(*tasks)

    async def closed_loop(self, concurrency: int) -> None:
        """``concurrency`` clients, each sending its next conversation when the last one ends.

        With ``ramp_s`` the clients join one by one, evenly over that time, as load tools ramp
        up; at 0 they all send at once, and on a cold fleet every policy's TTFT p99 is then
        the same synchronized burst (placed evenly by all of them), not the policy.
        """
        pending = iter(self.workload.conversations)

        async def worker(i: int) -> None:
            # Never past the run's deadline: a client still waiting to join when --duration
            # ends must not hold the run open for the rest of the ramp.
            delay = min(i * self.options.ramp_s / concurrency, self.deadline - time.perf_counter())
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopped.wait(), delay)
            for conv in pending:
                if not self.may_send():
                    return
                await self.conversation(conv)

        await asyncio.gather(*(asyncio.create_task(worker(i), name=f"loadtest-worker-{i}")
                               for i in range(concurrency)))


def poisson_starts(workload: Workload, rate: float) -> list[float]:
    """Conversation start times so that requests (all turns) arrive at ``rate`` per second."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    mean_turns = workload.n_requests / max(1, len(workload.conversations))
    rng = random.Random(f"arrivals:{workload.seed}")
    t, out = 0.0, []
    for _ in workload.conversations:
        out.append(t)
        t += rng.expovariate(rate / mean_turns)
    return out


def _on_interrupt(run: _Run) -> bool:
    """First Ctrl-C stops sending and still reports; the second one interrupts as usual."""
    loop = asyncio.get_running_loop()

    def first() -> None:
        log.warning("interrupted: no new requests; waiting for those in flight (Ctrl-C again to abort)")
        loop.remove_signal_handler(signal.SIGINT)
        run.stop()

    try:
        loop.add_signal_handler(signal.SIGINT, first)
    except (RuntimeError, ValueError, NotImplementedError):  # not the main thread, or no signals here
        return False
    return True


async def _model_of(client: httpx.AsyncClient, url: str) -> str:
    try:
        resp = await client.get(url.rstrip("/") + "/v1/models", timeout=5.0)
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return "sim-model"


def _sent_prompts(run: _Run, tokenizer_dir: str) -> tuple[list[SentPrompt], list[int]]:
    """Token ids of every prompt as the engine tokenizes it (blocking: run in a thread)."""
    tok = load_tokenizer(tokenizer_dir)
    prompts: list[SentPrompt] = []
    lengths: list[int] = []
    for index, _path, body in run.sent:
        if "messages" in body:
            ids = tok.encode_chat(body["messages"])
        elif isinstance(body["prompt"], list):
            ids = list(body["prompt"])
        else:
            ids = tok.encode_completion(body["prompt"])
        reply = run.replies.get(index) or ""
        after = ids + tok.encode(reply, add_special_tokens=False) if reply else None
        prompts.append(SentPrompt(ids, after))
        lengths.append(len(ids))
    return prompts, lengths


async def run_workload(workload: Workload, target: str | Sequence[str], options: RunOptions | None = None,
                       *, name: str | None = None) -> RunResult:
    """Send ``workload`` to ``target`` (one URL, or several engines taken in turn) and measure it."""
    opts = options or RunOptions()
    targets = [target] if isinstance(target, str) else list(target)
    arm = name or (targets[0] if len(targets) == 1 else "direct-round-robin")
    arrival = opts.arrival(workload)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(opts.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client, \
            new_session(opts.request_timeout_s) as session:
        engine_urls = list(opts.engines or (targets if len(targets) > 1 else await discover_engines(client, targets[0])))
        model = opts.model or await _model_of(client, targets[0])
        watch = FleetWatch(engine_urls, client, interval_s=opts.sample_interval_s)
        # The generator is the measuring instrument: its full collections (55-155 ms measured here)
        # would land on whatever requests are in flight. Collect before the clock starts, and only
        # young generations while it runs.
        settle()
        await watch.start()
        budget = min(workload.n_requests, opts.max_requests or workload.n_requests)
        deadline = time.perf_counter() + (opts.duration_s if opts.duration_s is not None else 1e9)
        run = _Run(workload, targets, opts, model, session, budget, deadline)
        console = Console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, disable=not opts.progress, transient=False) as progress:
            run.label = f"{arm}: {workload.name}"
            run.progress, run.task_id = progress, progress.add_task(run.label, total=budget)
            run.t0 = time.perf_counter()
            cpu0 = time.process_time()
            interruptible = _on_interrupt(run)
            try:
                with young_only():
                    if arrival == "closed":
                        await run.closed_loop(opts.concurrency or 8)
                    else:
                        starts = (poisson_starts(workload, opts.rate or 1.0) if arrival == "poisson"
                                  else [c.arrival_s or 0.0 for c in workload.conversations])
                        await run.open_loop(starts)
            finally:
                if interruptible:
                    asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        wall = time.perf_counter() - run.t0
        cpu = time.process_time() - cpu0
        await watch.stop()
    reported = {s.block_size for s in watch.after.values() if s.block_size}
    block_size = opts.block_size or (reported.pop() if len(reported) == 1 else DEFAULT_BLOCK_SIZE)
    prompts, lengths = await asyncio.to_thread(_sent_prompts, run, opts.tokenizer_dir)
    top = ceiling(prompts, block_size)
    summary = summarize(run.records, watch.usage(), engine_urls, wall, top.rate)
    by_index = dict(zip((i for i, _, _ in run.sent), lengths, strict=True))
    summary["token_count_mismatches"] = sum(
        1 for r in run.records if r.prompt_tokens is not None and r.prompt_tokens != by_index.get(r.index))
    summary["ceiling_block_size"] = block_size
    # Near 1.0 the generator itself was CPU-bound and its latencies include its own queueing.
    summary["client_cpu_share"] = cpu / wall if wall > 0 else 0.0
    # The run's zero on the host's monotonic clock (perf_counter is CLOCK_MONOTONIC on Linux, shared
    # by every process): lets a record's start_s be lined up with other processes' stall logs.
    summary["t0_monotonic"] = run.t0
    return RunResult(
        name=arm,
        targets=targets, workload=workload.name, seed=workload.seed, workload_params=dict(workload.params),
        options=dataclasses.asdict(opts), arrival=arrival, engine_urls=engine_urls, block_size=block_size,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"), records=run.records,
        engines=watch.usage(), summary=summary)
