"""
Access to the conformance vectors in ``tests/conformance/vectors.json``.

The vectors ship with the tests (a copy of the shared conformance data; see
``tests/conformance/README.md`` for where they come from), so every clone
runs them.  A missing or unreadable file is an error, never a skip.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: The vectors file, beside this module.
VECTORS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conformance", "vectors.json")


def load_vectors(group: str) -> list[dict[str, Any]]:
    """
    Return the vectors of C{group} (e.g. C{"sts_policy"}).

    @raise OSError: the vectors file is missing or unreadable.
    @raise KeyError: the file has no such group.
    """
    with open(VECTORS_PATH, encoding="utf-8") as f:
        vectors: list[dict[str, Any]] = json.load(f)[group]
    return vectors
