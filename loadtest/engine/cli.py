"""``python -m loadtest engine``: N simulated vLLM engines on consecutive ports, in one process.

    python -m loadtest engine --port 8001 --engines 4 --block-size 16 --cache-blocks 512 \\
        --kv-events-port 5557 --zero

Engine i serves HTTP on P+i and publishes KV events on K+i (its replay socket on R+i,
default R = K+N). ``--port 0`` takes free ports. Once every engine answers, one JSON line
``{"ready": true, "engines": [...]}`` is printed on stdout (``EngineSpec`` fields).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import replace

from loadtest.engine import faults as faults_mod
from loadtest.engine.collector import IdleCollector
from loadtest.engine.engine import EngineConfig
from loadtest.engine.host import EventsPlan, Host
from loadtest.engine.timing import TimingConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = EngineConfig()
    t = TimingConfig()
    p.add_argument(
        "--port", default="8001", help="first HTTP port (0: free ports), or one port per engine: P1,P2,..."
    )
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--model", default=d.model, help="served model name")
    p.add_argument("--lora", action="append", default=[], help="a LoRA adapter name to serve (repeatable)")
    p.add_argument("--tokenizer", default=None, help="model directory (default: the shipped sim-model)")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument(
        "--cache-blocks", type=int, default=d.cache_blocks, help="KV capacity in blocks per engine"
    )
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the generated replies")
    g = p.add_argument_group("timing")
    g.add_argument("--max-num-seqs", type=int, default=t.max_num_seqs, help="running slots per engine")
    g.add_argument("--prefill-base-ms", type=float, default=t.prefill_base_ms)
    g.add_argument(
        "--prefill-ms-per-token", type=float, default=t.prefill_ms_per_token, help="per uncached token"
    )
    g.add_argument("--decode-ms", type=float, default=t.decode_ms, help="inter-token interval")
    g.add_argument(
        "--decode-ms-per-seq", type=float, default=t.decode_ms_per_seq, help="added per running request"
    )
    g.add_argument("--zero", action="store_true", help="zero-delay mode: no prefill or decode time")
    e = p.add_argument_group("KV events (vLLM wire format over ZMQ)")
    e.add_argument(
        "--kv-events-port", default=None, help="first PUB port to bind (0: free ports), or P1,P2,..."
    )
    e.add_argument(
        "--kv-replay-port", default=None, help="first replay port (default: K+N; 0: free), or P1,P2,..."
    )
    e.add_argument("--no-kv-replay", action="store_true")
    e.add_argument(
        "--kv-events-connect",
        default=None,
        metavar="ENDPOINT",
        help="connect to a subscriber's bound endpoint instead of binding",
    )
    e.add_argument("--kv-bind-host", default=None, help="event bind address (default: --host; '*' as vLLM)")
    e.add_argument("--kv-topic-prefix", default=None, help="topic = prefix + HTTP port")
    e.add_argument(
        "--kv-bytes-hashes", action="store_true", help="full digests as bytes (vLLM int hashes off)"
    )
    e.add_argument("--kv-positional", action="store_true", help="older positional-array events")
    faults_mod.add_arguments(p)
    p.add_argument("--log-level", default="warning")
    return p


def port_list(value: str | None, n: int, offset: int = 0) -> list[int] | None:
    """``"P"`` -> P+offset+i for each engine (0: free ports); ``"P1,P2,..."`` -> exactly those."""
    if value is None:
        return None
    if "," in value:
        ports = [int(p) for p in value.split(",")]
        if len(ports) != n:
            raise ValueError(f"{value!r} lists {len(ports)} ports for {n} engines")
        return ports
    base = int(value)
    return [0 if base == 0 else base + offset + i for i in range(n)]


def plan_from_args(args: argparse.Namespace) -> EventsPlan | None:
    n = args.engines
    if args.kv_events_port is None and args.kv_events_connect is None:
        return None
    ports = port_list(args.kv_events_port, n) or []
    replay: list[int] = []
    if not args.no_kv_replay:
        if args.kv_replay_port is not None:
            replay = port_list(args.kv_replay_port, n) or []
        elif args.kv_events_port is not None and "," not in args.kv_events_port:
            replay = port_list(args.kv_events_port, n, offset=n) or []
    return EventsPlan(
        ports=ports,
        connect=args.kv_events_connect,
        replay_ports=replay,
        bind_host=args.kv_bind_host or args.host,
        topic_prefix=args.kv_topic_prefix,
        int_hashes=not args.kv_bytes_hashes,
        positional=args.kv_positional,
    )


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    timing = TimingConfig(
        prefill_base_ms=args.prefill_base_ms,
        prefill_ms_per_token=args.prefill_ms_per_token,
        decode_ms=args.decode_ms,
        decode_ms_per_seq=args.decode_ms_per_seq,
        max_num_seqs=args.max_num_seqs,
        zero=args.zero,
    )
    return replace(
        EngineConfig(),
        model=args.model,
        block_size=args.block_size,
        cache_blocks=args.cache_blocks,
        timing=timing,
        loras=tuple(args.lora),
        seed=args.seed,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
    )


async def serve(args: argparse.Namespace) -> None:
    ports = port_list(args.port, args.engines) or []
    host = Host(
        config_from_args(args),
        ports,
        host=args.host,
        events=plan_from_args(args),
        faults=faults_mod.from_args(args),
        tokenizer_dir=args.tokenizer,
    )
    await host.start()
    host.install_signal_handlers()
    # This process is the whole fleet: a full collection here would stall every engine at once.
    collector = IdleCollector(host.idle)
    collector.start()
    print(json.dumps({"ready": True, "engines": [s.to_dict() for s in host.specs]}), flush=True)
    try:
        await host.wait()
    finally:
        await collector.stop()
        await host.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.engines < 1:
        print("--engines must be at least 1", file=sys.stderr)
        return 2
    try:
        faults_mod.from_args(args)
        for value in (args.port, args.kv_events_port, args.kv_replay_port):
            port_list(value, args.engines)
    except ValueError as exc:
        print(f"bad option: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        runner(serve(args))
    except OSError as exc:  # a port in use, an address not on this host
        print(f"cannot start the simulated engines: {exc}", file=sys.stderr)
        return 1
    return 0
