"""
Access to the conformance vectors in ``../shared/conformance/vectors.json``.

The file lives beside the repository (CI clones main with ``shared/`` next to
it); C{MTASTS_CONFORMANCE} may point elsewhere.  Without it, tests that need
it skip on a developer machine and fail under C{CI=true}.
"""

import json
import os

from twisted.trial.unittest import SkipTest

_HERE = os.path.dirname(os.path.abspath(__file__))
_CANDIDATES = [
    os.environ.get("MTASTS_CONFORMANCE", ""),
    os.path.join(_HERE, "..", "..", "shared", "conformance", "vectors.json"),
    os.path.join(_HERE, "..", "shared", "conformance", "vectors.json"),
]


def load_vectors(group: str) -> list[dict]:
    """Return the vectors of C{group}; skip (or fail under CI) when absent."""
    for path in _CANDIDATES:
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)[group]
    message = "conformance vectors not found (set MTASTS_CONFORMANCE to vectors.json)"
    if os.environ.get("CI") == "true":
        raise AssertionError(message)
    raise SkipTest(message)
