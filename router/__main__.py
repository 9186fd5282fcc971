"""``python -m router``: the same as the ``cache-router`` command."""

import sys

from router.cli import main

sys.exit(main())
