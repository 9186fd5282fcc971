"""``python -m loadtest <command>``: engine | run | compare | overhead | bench-engine.

Each command lives in its own module and is imported only when asked for, so
``python -m loadtest engine`` does not pay for matplotlib.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "engine": ("loadtest.engine.cli", "simulated vLLM engines on consecutive ports"),
    "run": ("loadtest.runner.cli", "drive one workload against one target, write JSON + report"),
    "compare": ("loadtest.compare", "the same workload and seed against several routers or policies"),
    "overhead": ("loadtest.overhead", "router overhead against nginx and the Rust routers (wrk)"),
    "bench-engine": ("loadtest.engine.bench", "how many simulated engines / requests per second one core sustains"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print("usage: python -m loadtest {" + ",".join(COMMANDS) + "} ...\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<13} {text}")
        return 0 if args[:1] in ([], ["-h"], ["--help"]) else 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    result: int = module.main(args[1:])
    return result


if __name__ == "__main__":
    sys.exit(main())
