"""``python -m fastkd.bench``: see :mod:`fastkd.bench.cli` and ``--help``."""

import sys

from .cli import main

sys.exit(main())
