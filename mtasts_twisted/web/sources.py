"""
What the status pages read: L{WebSources}, the service's components as
callables (most exist only once the store is open), and L{gather_*}
coroutines that read them and make the page data with the pure functions
of L{mtasts_twisted.web.data}.  Nothing here writes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.interfaces import IReactorTime

from mtasts_twisted.policy import DomainError, to_alabel, to_unicode
from mtasts_twisted.socketmap.settings import DEFAULT_SETTINGS, SocketmapSettings
from mtasts_twisted.tlsrpt import (
    NoResultsError,
    RESULTS_TABLE,
    SENDS_TABLE,
    merge_results,
    pending_reports,
    preview_report,
)
from mtasts_twisted.tlsrpt.aggregate import decode_results, results_key
from mtasts_twisted.tlsrpt.report import day_of
from mtasts_twisted.web.dane import dane_summary, gather_dane
from mtasts_twisted.web.verdict import gather_verdict
from mtasts_twisted.web.data import (
    DomainPage,
    DomainRow,
    Overview,
    QueueRow,
    ReportRow,
    domain_page,
    domain_rows,
    overview,
    queue_rows,
    report_rows,
)

if TYPE_CHECKING:
    from mtasts_twisted.cache import PolicyCache, PolicyRefresher
    from mtasts_twisted.interfaces import IStore
    from mtasts_twisted.overrides import OverridingPolicySource
    from mtasts_twisted.relay import Queue
    from mtasts_twisted.socketmap import SocketmapFactory
    from mtasts_twisted.tlsrpt import ReportSettings

__all__ = ["MAX_ROWS", "WebSources", "gather_domain", "gather_domains", "gather_overview", "gather_queue",
           "gather_report", "gather_reports"]

#: Rows shown at most in a table (the rest is counted, and a filter narrows it).
MAX_ROWS = 1000


def _none() -> None:
    return None


@attrs.frozen
class WebSources:
    """
    The components the pages read.

    @ivar clock: the reactor's time.
    @ivar stats: the service's C{ServiceStats} (L{mtasts_twisted.metrics}),
        read by attribute: C{hourly_deliveries}, C{hourly_tls_failures},
        C{tls_failures}, C{reports}, C{queue_stats}, C{mx_outcomes}.
    @ivar cache: returns the L{PolicyCache}, or L{None} before it is open.
    @ivar store: returns the open L{IStore}, or L{None}.
    @ivar queue: returns the relay's L{Queue}, or L{None} (no relay).
    @ivar refresher: returns the L{PolicyRefresher}, or L{None}.
    @ivar report_settings: the report metadata (for a report's JSON), or
        L{None} when reports are off.
    @ivar policies: returns the socketmap's policy source (the cache with
        the overrides applied), or L{None} before it is open.
    @ivar socketmap: returns the L{SocketmapFactory} (its settings and
        memoised answers), or L{None} (no C{--socketmap}).
    @ivar answer_settings: the socketmap settings the verdict is rendered
        with when no socketmap runs.
    @ivar dane: whether the relay delivers with DANE (C{--dane}).
    """

    clock: IReactorTime
    stats: Any
    cache: Callable[[], PolicyCache | None] = _none
    store: Callable[[], IStore | None] = _none
    queue: Callable[[], Queue | None] = _none
    refresher: Callable[[], PolicyRefresher | None] = _none
    report_settings: ReportSettings | None = None
    policies: Callable[[], OverridingPolicySource | None] = _none
    socketmap: Callable[[], SocketmapFactory | None] = _none
    answer_settings: SocketmapSettings = DEFAULT_SETTINGS
    dane: bool = False


async def _pending(sources: WebSources, **kw: Any) -> list[Any]:
    store = sources.store()
    if store is None:
        return []
    return await pending_reports(store.shelf(RESULTS_TABLE), store.shelf(SENDS_TABLE),
                                 day_of(sources.clock.seconds()), **kw)


async def gather_overview(sources: WebSources) -> Overview:
    """The L{Overview} now."""
    now = sources.clock.seconds()
    stats = sources.stats
    cache = sources.cache()
    refresher = sources.refresher()
    runs = refresher.runs if refresher is not None else []
    return overview(
        now,
        stats.hourly_deliveries.series(now),
        stats.hourly_tls_failures.series(now),
        stats.tls_failures,
        stats.queue_stats() if stats.queue_stats is not None else None,
        stats.reports,
        [p.state for p in await _pending(sources)],
        len(cache._front) if cache is not None else None,
        runs[-1] if runs else None,
        stats.hourly_lookups.series(now),
    )


async def gather_domains(sources: WebSources, query: str,
                         max_rows: int = MAX_ROWS) -> tuple[tuple[DomainRow, ...], int]:
    """
    The cached policies matching C{query}: the first C{max_rows} in
    domain order, and how many match.  The store is read a page at a
    time, so a cache of any size is never held whole.
    """
    cache = sources.cache()
    if cache is None:
        return (), 0
    shown: list[DomainRow] = []
    total = 0
    async for page in cache.entry_pages():
        rows = domain_rows(page, query)
        total += len(rows)
        shown.extend(rows[: max(0, max_rows - len(shown))])
    alabels = {row.domain: _alabel(row.domain) for row in shown}
    dane = await gather_dane(sources, sorted(set(alabels.values())))
    return tuple(sorted((attrs.evolve(r, dane=dane.get(alabels[r.domain])) for r in shown),
                        key=lambda r: r.domain)), total


def _unicode(domain: str) -> str:
    """The cache's key of a domain (Unicode), or the name itself if it is not a domain."""
    try:
        return to_unicode(domain)
    except DomainError:
        return domain


def _alabel(domain: str) -> str:
    """The A-labels of a cached domain (its results' key), or itself if it has none."""
    try:
        return to_alabel(domain)
    except DomainError:
        return domain


async def gather_domain(sources: WebSources, domain: str) -> DomainPage:
    """One domain's L{DomainPage}, with its L{verdict<mtasts_twisted.web.verdict>} (no lookup made)."""
    domain = domain.strip().rstrip(".").lower()
    cache = sources.cache()
    entry = await cache.entry(_unicode(domain)) if cache is not None and domain else None
    day = day_of(sources.clock.seconds())
    results: list[Any] = []
    store = sources.store()
    if store is not None and domain:
        alabel = entry.alabel if entry is not None else _alabel(domain)
        results = merge_results(decode_results(await store.shelf(RESULTS_TABLE).get(results_key(day, alabel))))
    verdict = await gather_verdict(sources, domain) if domain else None
    # Results are kept only while reports are on (the aggregator stores them).
    dane = dane_summary(results if sources.report_settings is not None else None, sources.dane)
    return domain_page(domain, entry, sources.stats.mx_outcomes, results, day, verdict, dane if domain else None)


async def gather_reports(sources: WebSources) -> tuple[ReportRow, ...]:
    """The reports not yet sent."""
    return report_rows(await _pending(sources))


async def gather_report(sources: WebSources, day: str, domain: str) -> dict[str, Any] | None:
    """
    The RFC 8460 JSON of one report (as C{report preview} shows it), or
    L{None} when nothing is stored for it or reports are off.

    @raise ValueError: C{day} is not C{YYYY-MM-DD}.
    """
    store = sources.store()
    if store is None or sources.report_settings is None:
        return None
    try:
        return await preview_report(store.shelf(RESULTS_TABLE), store.shelf(SENDS_TABLE), sources.report_settings,
                                    day, domain, random.Random())
    except NoResultsError:
        return None


def gather_queue(sources: WebSources) -> tuple[QueueRow, ...] | None:
    """The queued messages, oldest first, or L{None} without a relay."""
    queue = sources.queue()
    return None if queue is None else queue_rows(queue.list(fresh=False))
