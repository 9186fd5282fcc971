"""``cache-router serve | check-config | demo``: the command line.

Flags override the config file; the merged config is validated once (unknown keys are
errors). ``serve`` runs uvicorn with uvloop and httptools, the fastest pairing measured.

Containers configure the router through the environment as well: ``CACHE_ROUTER_CONFIG``
(the config file's path, when ``--config`` is not given) and ``CACHE_ROUTER_REDIS_URL``
(the index, when ``--redis-url`` is not given: a Secret's value never goes on a command line).
Precedence: flag, then environment, then file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from router.config import ConfigError, RouterConfig, load_config
from router.index.peers import PEER_DIR_ENV


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cache-router", description="A cache-aware fleet router for LLM inference.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the router")
    serve.add_argument("--config", help="YAML config file")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--backend", action="append", metavar="URL", help="engine replica base URL (repeatable)")
    serve.add_argument("--tokenizer", metavar="DIR", help="model directory (tokenizer.json, chat template)")
    serve.add_argument("--block-size", type=int)
    serve.add_argument("--policy")
    serve.add_argument("--redis-url")
    serve.add_argument("--log-level")
    serve.add_argument("--health-port", type=int, help="also answer GET /health here, from a thread (liveness probes)")
    serve.add_argument("--workers", type=int, help="router processes sharing the port and the index (the Redis one, or in-process writes exchanged between them)")
    check = sub.add_parser("check-config", help="validate a config file and print a summary")
    check.add_argument("file")
    sub.add_parser("demo", help="start simulated engines and the router, compare against round robin",
                   add_help=False)
    return p


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    overrides: dict[str, Any] = {
        "host": args.host, "port": args.port, "tokenizer": args.tokenizer, "block_size": args.block_size,
        "policy": args.policy, "redis_url": args.redis_url or os.environ.get(REDIS_URL_ENV) or None,
        "log_level": args.log_level, "workers": args.workers, "health_port": args.health_port,
    }
    if args.backend:
        overrides["backends"] = [{"url": u} for u in args.backend]
    return load_config(args.config or os.environ.get(CONFIG_ENV) or None, **overrides)


CONFIG_ENV = "CACHE_ROUTER_CONFIG"
REDIS_URL_ENV = "CACHE_ROUTER_REDIS_URL"


def redacted(url: str) -> str:
    """A URL with its password replaced, for logs and summaries."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def summary(config: RouterConfig) -> str:
    lines = [
        f"listen     {config.host}:{config.port}",
        f"policy     {config.policy}",
        f"tokenizer  {config.tokenizer or '(none: approximate character mode)'}",
        f"block size {config.block_size}",
        f"index      {'redis ' + redacted(config.redis_url) if config.redis_url else 'in-process'}",
        f"backends   {len(config.backends)}",
    ]
    lines += [f"  - {b.url}" + (f" models={','.join(b.models)}" if b.models else "") for b in config.backends]
    return "\n".join(lines)


def serve(config: RouterConfig) -> int:
    import uvicorn

    from router.api.protocol import UVICORN_OPTIONS
    from router.app import create_app

    _setup_logging(config)
    # uvicorn re-raises SIGTERM once its graceful shutdown is done (exit status -15). A drained
    # shutdown is a success: a no-op handler here is what uvicorn restores and re-raises into.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    options: dict[str, Any] = {
        "host": config.host, "port": config.port, "loop": "uvloop",
        "log_level": config.log_level, "lifespan": "on", "access_log": False,
        "timeout_graceful_shutdown": config.shutdown_timeout_s,
        # httptools, the hot routes without ASGI, an answer's head and body in one system call
        **UVICORN_OPTIONS,
    }
    if config.workers > 1:
        # Workers are spawned processes: they rebuild the validated config from the environment.
        os.environ[_CONFIG_ENV] = config.model_dump_json()
        with contextlib.ExitStack() as stack:
            if config.redis_url is None:  # they share the in-process index's writes (router.index.peers)
                os.environ[PEER_DIR_ENV] = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="cache-router-workers-"))
            uvicorn.run("router.cli:worker_app", factory=True, workers=config.workers, **options)
        return 0
    uvicorn.run(create_app(config, freeze_gc=True), **options)
    return 0


_CONFIG_ENV = "CACHE_ROUTER_WORKER_CONFIG"


def _setup_logging(config: RouterConfig) -> None:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # httpx logs every request at INFO: one line per proxied request and probe is noise and cost.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def worker_app() -> Any:
    """The app of one worker process (``serve --workers N``), from the parent's config."""
    from router.app import create_app

    config = RouterConfig.model_validate_json(os.environ[_CONFIG_ENV])
    _setup_logging(config)
    return create_app(config, freeze_gc=True)


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["demo"]:
        from router.demo import main as demo_main

        result: int = demo_main(args_list[1:])
        return result
    args = _parser().parse_args(args_list)
    try:
        if args.command == "check-config":
            config = load_config(args.file)
            print(f"{args.file}: OK")
            print(summary(config))
            return 0
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"invalid config: {exc}", file=sys.stderr)
        return 1
    return serve(config)
