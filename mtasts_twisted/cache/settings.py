"""
The timings of the policy cache (L{CacheSettings}) and of its refresher
(L{RefresherSettings}): frozen values, in seconds.
"""

from __future__ import annotations

import attrs

__all__ = ["CacheSettings", "RefresherSettings"]


@attrs.frozen
class CacheSettings:
    """
    Timings of the policy cache, in seconds.

    @ivar backoff: how long a failed fetch is not retried for the same id.
    @ivar front_size: entries kept in the in-memory front.
    @ivar flush_interval: how often batched C{last_use} times are written.
    @ivar flush_batch: C{last_use} writes in flight at once while flushing
        (so a flush of many domains holds a bounded amount of memory).
    @ivar max_pending_use: domains with a batched C{last_use} that start a
        flush before C{flush_interval} ends.
    """

    backoff: float = 5 * 60
    front_size: int = 10000
    flush_interval: float = 60.0
    flush_batch: int = 256
    max_pending_use: int = 1024


@attrs.frozen
class RefresherSettings:
    """
    Timings of L{PolicyRefresher}, in seconds.

    @ivar interval: how often a refresh run starts.
    @ivar stale_after: refresh policies not updated for this long.
    @ivar spread: refreshes of one run are spread at random over this window.
    @ivar unused_after: delete entries not used for this long.
    """

    interval: float = 3600.0
    stale_after: float = 12 * 3600.0
    spread: float = 3 * 3600.0
    unused_after: float = 180 * 86400.0
