"""
When each cached policy was last used (C{last_use}), written in batches.

Every lookup that uses a cached policy makes it "used now", which decides
when an unused entry expires.  Writing that on every lookup would make the
store the bottleneck, so L{UseTimes} keeps the newest time per domain in
memory and L{UseTimes.flush} writes one update per domain, at most
C{flush_batch} in flight: a minute of lookups of 50,000 distinct domains
must not queue 50,000 store operations at once.  When more than
C{max_pending_use} domains wait, a flush starts early (bounded memory).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from mtasts_twisted.cache.settings import CacheSettings
from mtasts_twisted.interfaces import IShelf
from mtasts_twisted.store import JSONDict, UpdateFunction

__all__ = ["UseTimes"]

# The cache's namespace, so log lines read as before this module was cut out.
log = Logger(namespace="mtasts_twisted.cache")


def _touch(last_use: float) -> UpdateFunction:
    """An update that moves a row's C{last_use} forward to C{last_use}, never back."""

    def update(row: JSONDict | None) -> JSONDict | None:
        if row is not None and row.get("last_use", 0) < last_use:
            row = dict(row, last_use=last_use)
        return row

    return update


class UseTimes:
    """
    The batched C{last_use} times of one policy table.

    @ivar pending: domain → the newest unwritten use time (the hot path of
        the cache writes it directly).
    """

    def __init__(self, shelf: IShelf, settings: CacheSettings) -> None:
        """
        @param shelf: the policy table.
        @param settings: C{flush_batch} and C{max_pending_use}.
        """
        self._shelf = shelf
        self._settings = settings
        self.pending: dict[str, float] = {}
        self._early: Deferred[None] | None = None

    def note(self, domain: str, now: float) -> None:
        """C{domain}'s policy was used at C{now}; flush early when too many wait."""
        pending = self.pending
        pending[domain] = now
        if len(pending) >= self._settings.max_pending_use and self._early is None:
            # Bounded memory between flushes: many distinct domains write
            # early.  (The hot path adds only confirmed domains, at most
            # front_size more.)
            self._early = self.flush()
            self._early.addBoth(self._early_done)

    def _early_done(self, result: object) -> None:
        self._early = None

    def flush(self) -> Deferred[None]:
        """
        Write the waiting times, one update per domain, at most
        C{flush_batch} at a time.  A failed write is logged and skipped
        (the time only expires unused entries).
        """
        items = list(self.pending.items())
        self.pending.clear()
        return Deferred.fromCoroutine(self._write(items))

    async def _write(self, items: list[tuple[str, float]]) -> None:
        batch = max(1, self._settings.flush_batch)
        failed: list[Any] = []
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            results = await DeferredList(
                [self._shelf.update(domain, _touch(t)) for domain, t in chunk], consumeErrors=True
            )
            failed += [(domain, result) for (domain, _), (ok, result) in zip(chunk, results) if not ok]
        if failed:
            # One event per flush, not one per domain (the store may be down).
            log.failure(
                "writing last_use failed for {count} domain(s), e.g. {domain}",
                failed[0][1],
                count=len(failed),
                domain=failed[0][0],
            )
