"""One engine replica as the router sees it: identity, what it serves, health, load.

This is the shared vocabulary between the fleet (which keeps these up to date from
probes, scrapes and request outcomes) and the scheduler (which reads a frozen
``Candidate`` snapshot of them). Only the fleet mutates a Backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.types import BackendId


@dataclass
class EngineLoad:
    """Load the engine itself reports on /metrics (vLLM or SGLang names), with when it was read."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # 0..1
    scraped_at: float = 0.0  # monotonic seconds; 0: never


@dataclass
class Backend:
    id: BackendId
    url: str
    models: frozenset[str] = frozenset()
    """Models and LoRA adapters served (from config, else from its /v1/models)."""
    base_model: str | None = None
    """The base model's name (the /v1/models entry without a ``parent``): the key namespace
    of blocks that carry no LoRA name."""
    healthy: bool = False
    """Active probe verdict (starts False until the first probe passes)."""
    draining: bool = False
    in_flight: int = 0
    """Requests dispatched and not yet finished streaming, from this router."""
    prefilling: int = 0
    """Of ``in_flight``: requests not yet answered with a first byte (queued or prefilling)."""
    prefill_tokens: int = 0
    """Their predicted uncached prompt tokens: prefill work the replica has still to do."""
    slots: int | None = None
    """How many requests the engine runs at once, as far as its /metrics showed: the highest
    running count seen in two scrapes in a row that both showed requests waiting (None until then)."""
    prefill_started: float = 0.0
    """When the replica's current prefill began, as far as this router can tell (clock of the
    fleet): the dispatch that found nothing prefilling, or the last first byte while others wait."""
    shared_in_flight: int = 0
    """In-flight counts of the other router replicas (Redis), when shared."""
    load: EngineLoad = field(default_factory=EngineLoad)
    block_size: int | None = None
    capacity_blocks: int | None = None
    precise: bool = False
    """True while KV events keep this replica's index entries exact."""
    generation: int = 0
    """Bumped when the replica restarts (cache emptied): entries from before are stale."""
