"""Simulated vLLM engines, faithful to ``shared/specs/vllm-engine.md``: API, metrics, KV events, prefix cache.

Start a fleet for a test (engines on free loopback ports)::

    from loadtest.engine import SimFleet

    with SimFleet(4, block_size=16, cache_blocks=256, kv_events="bind") as fleet:      # or: async with
        fleet.urls                      # ["http://127.0.0.1:40001", ...]
        spec = fleet[0]                 # EngineSpec: url, port, kv_events, kv_connect, kv_replay, kv_topic
        fleet.cache(0)                  # {uint64 hash: {"digest", "parent", "token_ids", "lora_name", "ref_cnt"}}
        fleet.stats(0)                  # requests, prompt/cached/generation tokens, busy_seconds, event_seq, ...
        fleet.set_faults(0, error_rate=0.5, error_status=503, hang=False, die_after_tokens=3,
                         stall_after_tokens=None, health_delay_s=0.0, health_fail=False)
        fleet.restart(0)                # empty cache, counters and KV-event seq back to 0
        fleet.reset_prefix_cache(0)     # as vLLM's POST /reset_prefix_cache

Options: ``zero=True`` (default: no simulated time; pass ``zero=False`` and timing flags in
``extra_args`` such as ``["--prefill-ms-per-token", "0.05", "--decode-ms", "2"]``),
``max_num_seqs``, ``loras=("adapter",)``, ``kv_events="tcp://127.0.0.1:P"`` (engines connect to a
bound subscriber, topic ``kv-<http port>``), ``kv_bytes_hashes``, ``kv_positional``,
``mode="process"`` (a ``python -m loadtest engine`` subprocess: own GIL, ``kill()`` for fault
tests). Async twins: ``acache``, ``astats``, ``aset_faults``, ``arestart``.

Each engine also answers (not in vLLM, for tests and the load generator): ``GET /sim/cache``,
``GET /sim/stats``, ``GET|POST /sim/faults``, ``POST /sim/restart?downtime_s=S``.
One engine per process (to SIGKILL a single replica): ``SimFleet(1, mode="process")`` per replica;
``fleet.kill()`` then ``fleet.revive()`` restarts the process on the same HTTP and event ports.

Command line: ``python -m loadtest engine --port P --engines N [--block-size B] [--cache-blocks C]
[--max-num-seqs S] [--kv-events-port K] [--zero] [--model NAME]`` (``--help`` for the rest).

Modules: ``cache`` (block pool and hashes), ``timing`` (slots, queue, compute time),
``engine`` (one engine), ``events`` (ZMQ publisher), ``metrics``, ``faults``, ``app`` (HTTP),
``host`` (many engines in one loop), ``cli``, ``fleet`` (``SimFleet``), ``bench``.
"""

from loadtest.engine.cache import as_int, block_digest, chain_digests
from loadtest.engine.fleet import SimFleet
from loadtest.engine.host import EngineSpec

__all__ = ["EngineSpec", "SimFleet", "as_int", "block_digest", "chain_digests"]
