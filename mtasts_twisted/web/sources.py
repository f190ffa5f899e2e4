"""
What the status pages read: L{WebSources}, the service's components as
callables (most exist only once the store is open), and L{gather_*}
coroutines that read them and make the page data with the pure functions
of L{mtasts_twisted.web.data}.  Nothing here writes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import IReactorTime

from mtasts_twisted.cache import Lookup, PolicyLookupTemporaryError
from mtasts_twisted.policy import DomainError, is_address_literal, to_alabel, to_unicode
from mtasts_twisted.results import PolicyDescriptor, PolicyType, Result
from mtasts_twisted.socketmap.answers import render_failure
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
from mtasts_twisted.web.dane import READ_BATCH, DANESummary, dane_summary
from mtasts_twisted.web.verdict import Verdict, verdict_of
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

__all__ = ["MAX_ROWS", "WebSources", "gather_dane", "gather_domain", "gather_domains", "gather_overview", "gather_queue",
           "gather_report", "gather_reports", "gather_verdict"]

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


# --- the reading parts of the DANE status and the verdict -------------------


async def gather_dane(sources: WebSources, alabels: Sequence[str]) -> dict[str, DANESummary]:
    """
    The L{DANESummary} of each domain (A-labels) from today's stored
    results, read C{READ_BATCH} at a time; without C{--dane} nothing is
    read (the relay decides no session by DANE).
    """
    store = sources.store()
    if not sources.dane:
        return {alabel: DANESummary(False) for alabel in alabels}
    if store is None or sources.report_settings is None:
        return {alabel: DANESummary(True, kept=False) for alabel in alabels}
    shelf = store.shelf(RESULTS_TABLE)
    day = day_of(sources.clock.seconds())
    found: dict[str, DANESummary] = {}
    for start in range(0, len(alabels), READ_BATCH):
        batch = alabels[start:start + READ_BATCH]
        rows: list[Any] = await gatherResults([shelf.get(results_key(day, a)) for a in batch], consumeErrors=True)
        for alabel, row in zip(batch, rows):
            found[alabel] = dane_summary(decode_results(row), True)
    return found


async def gather_verdict(sources: WebSources, domain: str) -> Verdict:
    """The L{Verdict} for C{domain} now, reading the cache, the overrides and the socketmap's memo."""
    cache = sources.cache()
    factory = sources.socketmap()
    settings = factory.settings if factory is not None else sources.answer_settings
    if cache is None:
        return Verdict(domain, None, "the policy cache is not open yet")
    if is_address_literal(domain):
        # An address literal has no policy domain (RFC 8461 §4): the socketmap answers NOTFOUND.
        literal = Lookup(None, Result(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, domain)), True)
        return verdict_of(domain, literal, settings, relay_dane=sources.dane)
    try:
        alabel = to_alabel(domain)
    except DomainError as e:
        return Verdict(domain, None, f"not a domain name: {e}")
    peeked = await cache.peek(alabel)
    lookup: Lookup | None = peeked
    policies = sources.policies()
    try:
        if policies is not None:
            lookup = policies.applied(peeked, alabel)
    except PolicyLookupTemporaryError as e:
        return Verdict(alabel, render_failure(alabel, e.reason, settings), f"the policy source refuses: {e}",
                       peeked is not None)
    memo = factory.memoised(alabel, lookup) if factory is not None and lookup is not None else None
    return verdict_of(alabel, lookup, settings, memo, cached=peeked is not None, relay_dane=sources.dane)
