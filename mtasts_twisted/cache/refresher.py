"""
L{PolicyRefresher}: the service that keeps cached policies fresh (RFC 8461
§10.2 recommends refreshing before expiry) and removes unused entries.
"""

from __future__ import annotations

import random
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mtasts_twisted.cache.entry import CacheEntry
from mtasts_twisted.cache.policycache import PolicyCache
from mtasts_twisted.cache.settings import RefresherSettings
from mtasts_twisted.periodic import Periodic

__all__ = ["PolicyRefresher"]

# The package is the log namespace, as before the split into modules.
log = Logger(namespace="mtasts_twisted.cache")


class PolicyRefresher(Service):
    """
    Refresh stale policies and clean up the cache, at start and periodically.

    @param cache: the L{PolicyCache}.
    @param clock: an C{IReactorTime}.
    @param rng: a C{random.Random} (injected so tests can fix the spread).
    """

    def __init__(self, cache: PolicyCache, clock: IReactorTime, settings: RefresherSettings = RefresherSettings(),
                 rng: random.Random | None = None) -> None:
        self._cache = cache
        self._clock = clock
        self.settings = settings
        self._random = rng or random.Random()
        self._loop: Periodic | None = None
        self._scheduled: dict[str, IDelayedCall] = {}
        self.runs: list[dict[str, int]] = []

    def startService(self) -> None:
        """
        Start the periodic runs (the first one now).  A run that fails (the
        store is away) is logged and the runs go on (L{Periodic}).
        """
        super().startService()
        self._loop = Periodic("policy refresher", self.run, self.settings.interval, self._clock)
        self._loop.start(now=True)

    def stopService(self) -> None:
        """Stop running and cancel scheduled refreshes."""
        super().stopService()
        if self._loop is not None:
            self._loop.stop()
        self._loop = None
        for call in self._scheduled.values():
            if call.active():
                call.cancel()
        self._scheduled.clear()

    def run(self) -> Deferred[dict[str, int]]:
        """One run: delete unused entries, schedule refreshes of stale ones."""
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> dict[str, int]:
        now = self._clock.seconds()
        summary = {"entries": 0, "deleted": 0, "scheduled": 0}
        async for page in self._cache.entry_pages():
            for entry in page:
                await self._visit(entry, now, summary)
        self.runs.append(summary)
        log.info("policy refresher: {entries} entries, {deleted} deleted, {scheduled} refreshes scheduled",
                 **summary)
        return summary

    async def _visit(self, entry: CacheEntry, now: float, summary: dict[str, int]) -> None:
        """Delete C{entry} if unused or an ended backoff; schedule its refresh if stale."""
        summary["entries"] += 1
        if now - entry.last_use > self.settings.unused_after:
            await self._cache.delete(entry.domain)
            summary["deleted"] += 1
        elif entry.policy is None:
            if not entry.in_backoff(now):
                await self._cache.delete(entry.domain)  # a backoff that ended
                summary["deleted"] += 1
        elif now - entry.last_update >= self.settings.stale_after and entry.domain not in self._scheduled:
            delay = self._random.uniform(0, self.settings.spread)
            self._scheduled[entry.domain] = self._clock.callLater(delay, self._refresh, entry.domain)
            summary["scheduled"] += 1

    def _refresh(self, domain: str) -> Deferred[CacheEntry | None]:
        self._scheduled.pop(domain, None)
        d = self._cache.refresh(domain)
        d.addErrback(lambda f: log.failure("policy refresh failed for {domain} (internal-error)", f, domain=domain))
        return d
