"""How the status page writes a time: the one format of every page."""

from __future__ import annotations

import time

__all__ = ["format_time"]


def format_time(when: float | None) -> str:
    """C{YYYY-MM-DD HH:MM:SS} UTC, or C{-} for L{None}."""
    if not when:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))
