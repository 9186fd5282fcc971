"""``python -m loadtest.engine`` and the ``cache-router-sim`` script: same as ``python -m loadtest engine``."""

from __future__ import annotations

import sys

from loadtest.engine.cli import main as _cli_main


def main(argv: list[str] | None = None) -> int:
    return _cli_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
