"""``python -m fmnist ...``: the CLI without its installed entry point (e.g. from a source tree)."""

import sys

from .cli import main

sys.exit(main())
