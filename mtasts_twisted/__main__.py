"""``python -m mtasts_twisted``: the same as the ``mtasts-twisted`` command."""

import sys

from mtasts_twisted.cli import main

sys.exit(main())
