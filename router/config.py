"""The routing config file: one schema, validated once at start.

Every key an operator can set is declared here with its default and why it has that
value. Unknown keys are an error (``extra="forbid"``), never ignored: a typo in a
weight must not silently leave the default in place. Flags on ``cache-router serve``
override the file (see ``router.cli``).

Each section belongs to the part of the router it configures; the part reads its
section and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Policy = Literal["cache_aware", "round_robin", "least_load", "prefix_hash", "random"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class BackendConfig(_Section):
    url: str
    models: list[str] | None = None
    """Models and adapters this replica serves; None: learned from its /v1/models."""
    capacity_blocks: int | None = Field(default=None, gt=0)
    """KV capacity in blocks; None: learned from vllm:cache_config_info num_gpu_blocks."""
    block_size: int | None = Field(default=None, gt=0)
    """None: the model's block size (config, else learned from the engine)."""
    kv_events: str | None = None
    """The engine's bound KV-event PUB endpoint (precise mode, router connects)."""
    kv_replay: str | None = None
    """The engine's bound replay ROUTER endpoint."""
    kv_topic: str | None = None
    """This engine's topic on the router's ``kv_events_bind`` endpoint (engine connects)."""
    draining: bool = False

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("backend url must start with http:// or https://")
        return v.rstrip("/")


class ModelConfig(_Section):
    """Per-model overrides; models not listed use the top-level tokenizer and block size."""

    tokenizer: str | None = None
    block_size: int | None = Field(default=None, gt=0)


class SchedulingConfig(_Section):
    # Weights of the scorers; each scorer returns [0, 1], the profile sums weight * score.
    # prefix dominates so affinity wins among replicas of similar load.
    weights: dict[str, float] = Field(
        default_factory=lambda: {"prefix": 2.0, "load": 1.0, "queue": 0.5, "kv_usage": 0.25}
    )
    """Scorer weights (prefix, load, queue, kv_usage); each scorer returns [0, 1]."""
    load_band: float = Field(default=2.0, ge=0)
    """Affinity is kept only among replicas whose load (in-flight + engine queue) is within
    ``load_band`` + ``load_band_ratio`` * least load of the least loaded replica."""
    load_band_ratio: float = Field(default=0.25, ge=0)
    # cache_aware's time model (router/scheduling/cost.py): expected TTFT on a replica = its
    # queued prefill + running requests + this prompt's uncached prefill; the lowest wins.
    # Only the ratios matter (the scale cancels when replicas are compared). Sized on the
    # simulated vLLM engine of the demo (loadtest/engine/timing.py: 1 ms + 0.04 ms per
    # uncached token on one compute timeline); a 7-8B model on one GPU prefills 10-30k
    # tokens/s (0.03-0.1 ms per token) with a step overhead of about a millisecond.
    prefill_ms_per_token: float = Field(default=0.04, gt=0)
    """cache_aware: prefill time per uncached prompt token (what a cache hit saves)."""
    prefill_base_ms: float = Field(default=1.0, ge=0)
    """cache_aware: fixed prefill cost of every request (a hit still pays it)."""
    running_ms: float = Field(default=0.25, ge=0)
    """cache_aware: delay a request past its first token adds to a new prefill (decode steps
    share the engine); small, as a running decode costs a new prompt far less than a queued prefill."""
    prefill_weight: float = Field(default=1.5, ge=1.0)
    """cache_aware: weight of the request's own prefill against the queue it waits behind. Above 1,
    because a miss's prefill also delays every request that arrives behind it on that engine; at 1
    (its own TTFT only) the simulated multi-turn fleet lost a tenth of its hits for no p99 gain, and
    churn a fifth of them. At 2 a hot prefix's hits queued behind a miss on its holder rather than
    seed an idle replica (8-engine demo: hits waited 8.1 ms at p50 against round robin's 6.3)."""
    session_header: str | None = None
    """If set, requests carrying this header stick to one replica while it stays in the load band."""
    metrics_staleness_s: float = Field(default=5.0, gt=0)
    """Scraped engine load older than this is ignored (only in-flight counts are used)."""
    metrics_interval_s: float = Field(default=1.0, gt=0)
    prefix_hash_load_factor: float = Field(default=1.25, ge=1.0)
    """prefix_hash: a replica above this multiple of the mean load is skipped (bounded load)."""
    prefix_hash_blocks: int = Field(default=1, ge=1)
    """prefix_hash: blocks of the prefix hashed (1 = first block, the same key the fail-open
    fallback uses; more spreads prompts that share only a short system prompt)."""


class HealthConfig(_Section):
    interval_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=1.0, gt=0)
    failure_threshold: int = Field(default=2, ge=1)
    success_threshold: int = Field(default=1, ge=1)
    breaker_failures: int = Field(default=5, ge=1)
    """Consecutive request failures that open a replica's circuit."""
    breaker_cooldown_s: float = Field(default=5.0, gt=0)
    max_retries: int = Field(default=2, ge=0)
    """Other replicas tried when one fails before the first byte reaches the client."""


class TimeoutsConfig(_Section):
    # LLM requests are long: a 32k prompt on a loaded engine can take a minute to first token.
    connect_s: float = Field(default=5.0, gt=0)
    first_byte_s: float = Field(default=300.0, gt=0)
    idle_s: float = Field(default=120.0, gt=0)
    total_s: float = Field(default=1800.0, gt=0)


class ProxyConfig(_Section):
    # One shared keep-alive pool to all engines. A 16-replica fleet streaming 256 answers
    # each needs ~4k sockets; more than that queues on the pool (bounded by connect_s).
    max_connections: int = Field(default=4096, gt=0)
    max_keepalive: int = Field(default=1024, ge=0)
    keepalive_expiry_s: float = Field(default=30.0, gt=0)
    client: Literal["h1", "aiohttp", "httpx"] = "h1"
    """h1 (router/proxy/h1.py: asyncio.Protocol + httptools): 20-27 µs of CPU per upstream POST
    against aiohttp's 109-174 µs (``python -m loadtest.bench.client_cost``: loopback nginx, 100
    and 2k-token bodies, 1 and 32 concurrent). The router's whole CPU per request fell from
    507-841 µs to 413-546 µs (``python -m loadtest.bench.inprocess``, 5 A/B rounds alternating),
    and under wrk (32 connections, nginx backend) 2k-token prompts went from 1,010 to 1,516 req/s
    (873 -> 568 µs CPU per request), 100-token from 1,484 to 1,764 (2026-11-29, a busy 2-core box).
    aiohttp before it: 130-240 µs against httpx's 1.1-2.3 ms."""


class IndexConfig(_Section):
    namespace: str = "cr"
    """Prefix of every Redis key, so deployments (and tests) can share one Redis."""
    ttl_s: float = Field(default=600.0, gt=0)
    """Route-time (approximate-mode) entries expire after this; engines evict on that scale under load."""
    speculative_ttl_s: float = Field(default=5.0, gt=0)
    """Precise mode: route-time entries live this long unless a BlockStored confirms them."""
    default_capacity_blocks: int | None = Field(default=None, gt=0)
    deadline_ms: float = Field(default=50.0, gt=0)
    """Each Redis lookup's deadline; past it the router routes without the index (fail-open).
    Redis answers in well under a millisecond when idle, but a saturated router's loop (and a
    Redis sharing its cores) take tens of ms: at 32 concurrent 2k-token requests on 2 cores,
    5 ms made half the lookups fail, 20 ms 19%, 50 ms 4%. The deadline also stretches by twice
    this process's own event-loop delay (router.looplag); writes get at least 250 ms (nothing
    waits on them). Three misses in a row are an outage (fail fast for a while); one is not."""
    mode: Literal["approximate", "precise", "auto"] = "auto"
    """auto: precise for replicas with KV events configured, approximate for the others."""
    record_cpu_blocks: bool = False
    events_silence_s: float = Field(default=30.0, gt=0)
    """Precise mode: a replica serving requests this long without a KV event loses precise mode.
    A decoding engine stores a block every block_size tokens, so a busy one is never silent for 30 s."""
    selfcheck: bool = True
    """Precise mode: probe each replica at start and refuse precise mode when its keys disagree."""
    events_election: bool = True
    """Precise mode with redis_url: one router (holding a lease in Redis) ingests events for all,
    so N routers do not write every event N times; False: every router ingests (idempotent)."""
    events_lease_s: float = Field(default=5.0, gt=0)
    """The ingester's lease; a dead ingester is replaced within about this long (replay fills the gap)."""
    cluster: bool = False
    """redis_url names a node of a Redis Cluster (a ``redis+cluster://`` URL implies it too)."""


class AdmissionConfig(_Section):
    max_concurrency_per_backend: int | None = Field(default=None, gt=0)
    """Requests in flight per replica before new ones wait in the router's queue. Set it to the
    engines' ``max_num_seqs`` when the fleet runs more concurrent requests than its engines have
    running slots: a request sent to a full engine waits for a whole answer to finish, and the
    slot limit cache_aware learns from /metrics arrives late (docs/results.md, two engines)."""
    queue_size: int = Field(default=1024, ge=0)
    queue_timeout_s: float = Field(default=30.0, gt=0)


class ApiKeyConfig(_Section):
    sha256: str
    tenant: str
    allow_client_salt: bool = False


class AuthConfig(_Section):
    api_keys: list[ApiKeyConfig] | None = None
    """When present, the OpenAI endpoints require ``Authorization: Bearer <key>``; only digests are stored."""
    tenant_header: str | None = None
    """Trust this header (set by an upstream gateway) for the tenant instead of API keys. Opt-in."""
    admin_token_file: str | None = None
    """Absent (and no admin_token_env): admin and debug endpoints are off."""
    admin_token_env: str | None = None
    salt_secret_file: str | None = None
    """The secret every tenant's cache salt is derived from (HMAC); absent: no tenant salts."""
    salt_secret_env: str | None = None
    shared_salt_groups: dict[str, list[str]] = Field(default_factory=dict)
    """Tenants listed under one group name share one salt (and so one another's cache hits)."""


class DiscoveryConfig(_Section):
    """static: ``backends`` as listed; dns: a headless service's records; kubernetes: Ready pods by label
    (``router.fleet.discovery``). Discovered replicas are ``http://<ip>:<port>``."""

    kind: Literal["static", "dns", "kubernetes"] = "static"
    dns_name: str | None = None
    port: int | None = Field(default=None, gt=0, le=65535)
    """The engines' HTTP port (dns, kubernetes)."""
    label_selector: str | None = None
    namespace: str | None = None
    """None: the router pod's own namespace (service-account file)."""
    kv_events_port: int | None = None
    kv_replay_port: int | None = None
    api_server: str | None = None
    """None: in-cluster (KUBERNETES_SERVICE_HOST); set for tests or out-of-cluster use."""
    interval_s: float = Field(default=10.0, gt=0)
    """DNS re-resolve period; pods are watched, not polled."""
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """A replica that left waits this long for its in-flight streams before removal; matches the
    default pod terminationGracePeriodSeconds so streams can finish while the engine shuts down."""

    @model_validator(mode="after")
    def _needs(self) -> DiscoveryConfig:
        if self.kind == "dns" and (self.dns_name is None or self.port is None):
            raise ValueError("discovery.kind=dns needs dns_name and port")
        if self.kind == "kubernetes" and (self.label_selector is None or self.port is None):
            raise ValueError("discovery.kind=kubernetes needs label_selector and port")
        return self


class ExperimentConfig(_Section):
    baseline_fraction: float = Field(default=0.0, ge=0, le=1)
    baseline_policy: Literal["round_robin", "least_load"] = "round_robin"


class RouterConfig(_Section):
    host: str = "127.0.0.1"
    """Listen address. 127.0.0.1 by default: exposing a gateway is a decision (0.0.0.0 in the image)."""
    port: int = Field(default=8080, ge=0, le=65535)
    """Listen port for the OpenAI API, /health, /ready, /metrics and /debug."""
    policy: Policy = "cache_aware"
    """cache_aware (the product); round_robin, least_load, prefix_hash, random: baselines on the same code path."""
    tokenizer: str | None = None
    """Model directory; absent: approximate character mode (keys over characters, said in logs and metrics)."""
    block_size: int = Field(default=16, gt=0)
    """vLLM's default; must equal the engines' (learned per replica from vllm:cache_config_info when a
    backend or model does not set it). A wrong block size means 0% hits, so precise mode checks it."""
    redis_url: str | None = None
    """Shared index for several router replicas (``redis://``, ``rediss://``); absent: in-process index."""
    backends: list[BackendConfig] = Field(default_factory=list)
    """Static replicas (see ``backends[]``); discovery adds more."""
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    """Per-model tokenizer and block size, for fleets serving several models."""
    kv_events_bind: str | None = None
    """Precise mode, engines connect: the router binds this ZMQ SUB endpoint; backends name their ``kv_topic``."""
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    """8 MiB holds a 128k-token prompt with room; larger bodies get 413."""
    log_level: str = "info"
    log_decisions: bool = True
    """One log line per request (ids, model, tokens, matched, replica, reason, latency; never prompt text)."""
    health_port: int | None = Field(default=None, ge=0, le=65535)
    """Also answer ``GET /health`` on this port from a thread, for liveness probes: it answers
    while the event loop is saturated (the main port's /health waits its turn, 0.2-1.7 s on 2
    loaded cores) and says 503 once the loop has not run for 10 s. None: main port only."""
    workers: int = Field(default=1, ge=1, le=64)
    """Router processes sharing the port (uvicorn workers). One is one core: each process has
    its own event loop. They share the index: the Redis one, or without ``redis_url`` the
    in-process one, each worker sending what it records to the others over Unix sockets (and its
    in-flight counts, for the load band). ``/metrics`` shows the worker that answered the scrape."""
    shutdown_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGTERM the router stops accepting and gives in-flight streams this long to finish, then
    cuts them and exits 0. Below the pod's terminationGracePeriodSeconds (chart 120 s, manifests 60 s)."""
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)

    @model_validator(mode="after")
    def _unique_backends(self) -> RouterConfig:
        urls = [b.url for b in self.backends]
        if len(urls) != len(set(urls)):
            raise ValueError("backend urls must be unique")
        return self


class ConfigError(ValueError):
    """The config file is missing, not YAML, or does not match the schema."""


def load_config(path: str | Path | None = None, **overrides: Any) -> RouterConfig:
    """Read the YAML file (if any), apply non-None overrides (flags), validate once."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
        data = raw or {}
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(exc)) from exc
