"""
Aggregation of TLSRPT results per policy domain and UTC day.

L{ResultAggregator} is the L{IResultSink} that policy lookups and delivery
attempts report to.  It merges results in memory and writes them to the
store in batches: every C{interval} seconds, one atomic C{shelf.update} per
(day, policy domain) that merges the batch into what is stored, so several
nodes sharing one PostgreSQL database add up correctly.

Durability: results recorded since the last flush live only in memory; a
crash (or C{kill -9}) loses at most the last C{interval} seconds of them.
L{ResultAggregator.stopService} flushes, so an orderly shutdown loses
nothing.

RFC 8460 §3: the sessions that deliver reports themselves "SHOULD NOT" be
reported.  The report sender delivers with L{NULL_SINK} (or any sink that
drops them); as a blunt alternative, C{exclude_domains} (L{AggregatorSettings})
drops every result of the given policy domains.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mtasts_twisted.interfaces import IResultSink, IShelf, IStore
from mtasts_twisted.periodic import Periodic
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, Result
from mtasts_twisted.tlsrpt.report import day_of

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "AggregatorSettings",
    "NULL_SINK",
    "RESULTS_TABLE",
    "NullResultSink",
    "ResultAggregator",
    "decode_results",
    "encode_results",
    "merge_results",
    "results_key",
    "split_key",
]

log = Logger()

#: The shelf holding merged results; key C{"<day>|<policy-domain>"}, value
#: C{{"policies": [<RFC 8460 policies[] element>, ...]}}.
RESULTS_TABLE = "tlsrpt_results"

#: Seconds between flushes of the in-memory batch.
DEFAULT_FLUSH_INTERVAL = 60.0


def results_key(day: str, domain: str) -> str:
    """
    Return the store key of one report's results (also used by the sends table).

    @param day: C{YYYY-MM-DD} (UTC).
    @param domain: the policy domain, A-labels.
    """
    return f"{day}|{domain}"


def split_key(key: str) -> tuple[str, str]:
    """
    Inverse of L{results_key}.

    @return: C{(day, domain)}.
    @raise ValueError: the key has no C{|}.
    """
    day, sep, domain = key.partition("|")
    if not sep:
        raise ValueError(f"not a TLSRPT key: {key!r}")
    return day, domain


def merge_results(results: Iterable[Result]) -> list[Result]:
    """
    Merge results the RFC 8460 §4 way.

    Results with equal policies (same L{PolicyDescriptor}) become one whose
    success and failure counts are the sums; within it, failure details
    with the same L{FailureDetails.key} become one whose
    C{failed_session_count} is the sum.  The key is every field but the
    count: C{additional-information} is a URI or absent (never free text,
    RFC 8460 §4.4), so equal failures merge.  Order: first seen first.

    @param results: any results (of one report, normally).
    @return: the merged results.
    """
    successes: dict[PolicyDescriptor, int] = {}
    failed: dict[PolicyDescriptor, int] = {}
    failures: dict[PolicyDescriptor, dict[tuple[Any, ...], FailureDetails]] = {}
    for result in results:
        policy = result.policy
        successes[policy] = successes.get(policy, 0) + result.success_count
        failed[policy] = failed.get(policy, 0) + result.failure_count
        merged = failures.setdefault(policy, {})
        for detail in result.failures:
            key = detail.key()
            seen = merged.get(key)
            if seen is None:
                merged[key] = detail
            else:
                merged[key] = attrs.evolve(
                    seen,
                    failed_session_count=seen.failed_session_count + detail.failed_session_count,
                )
    return [
        Result(policy=policy, success_count=count, failures=tuple(failures[policy].values()),
               failure_count=failed[policy])
        for policy, count in successes.items()
    ]


def encode_results(results: Iterable[Result]) -> dict[str, Any]:
    """
    Return the stored form of results.

    @return: C{{"policies": [...]}} with RFC 8460 C{policies[]} elements.
    """
    return {"policies": [r.to_json() for r in results]}


def decode_results(value: dict[str, Any] | None) -> list[Result]:
    """
    Inverse of L{encode_results}; L{None} (nothing stored) gives C{[]}.
    """
    if not value:
        return []
    return [Result.from_json(p) for p in value.get("policies", ())]


@implementer(IResultSink)
class NullResultSink:
    """
    An L{IResultSink} that drops everything: for the deliveries of reports
    themselves (RFC 8460 §3: such sessions "SHOULD NOT" be in the next
    report).
    """

    def record(self, result: Result, when: float | None = None) -> None:
        """Drop C{result}."""


#: The one L{NullResultSink} anybody needs.
NULL_SINK = NullResultSink()


def _domains(domains: Iterable[str]) -> frozenset[str]:
    return frozenset(d.lower().rstrip(".") for d in domains)


@attrs.frozen
class AggregatorSettings:
    """
    How L{ResultAggregator} collects.

    @ivar interval: seconds between flushes.
    @ivar exclude_domains: policy domains whose results are dropped (e.g.
        report recipients, RFC 8460 §3); kept lower-case without a trailing
        dot.
    @ivar table: the shelf holding the results.
    """

    interval: float = DEFAULT_FLUSH_INTERVAL
    exclude_domains: frozenset[str] = attrs.field(default=frozenset(), converter=_domains)
    table: str = RESULTS_TABLE


@implementer(IResultSink)
class ResultAggregator(Service):
    """
    Collects results in memory and flushes them to the store in batches.

    Start it (as a service) to flush every C{interval} seconds; stopping it
    flushes what is left.  L{flush} may also be called at any time.

    @ivar settings: the L{AggregatorSettings}.
    @ivar shelf: the L{IShelf} written to.
    """

    def __init__(self, store: IStore, clock: IReactorTime,
                 settings: AggregatorSettings = AggregatorSettings()) -> None:
        """
        @param store: the store whose C{settings.table} shelf holds the
            results.
        @param clock: an C{IReactorTime} (the reactor, or a C{task.Clock}).
        @param settings: the flush interval, the excluded domains and the
            shelf (L{AggregatorSettings}).
        """
        self.settings = settings
        self.shelf: IShelf = store.shelf(settings.table)
        self._clock = clock
        self._exclude = settings.exclude_domains
        self._pending: dict[str, list[Result]] = {}
        self._limits: dict[str, int] = {}
        self._lock = DeferredLock()
        self._loop: Periodic | None = None

    @property
    def interval(self) -> float:
        """Seconds between flushes (C{settings.interval})."""
        return self.settings.interval

    @property
    def pending_keys(self) -> list[str]:
        """The keys with results not yet flushed, sorted."""
        return sorted(self._pending)

    def record(self, result: Result, when: float | None = None) -> None:
        """
        Remember C{result} until the next flush.  Never fails nor blocks.

        @param result: a L{Result}.
        @param when: POSIX seconds; the clock's time when L{None}.  It picks
            the UTC day the result counts for.
        """
        try:
            domain = result.reported_to.lower().rstrip(".")
            if domain in self._exclude:
                return
            if when is None:
                when = self._clock.seconds()
            key = results_key(day_of(when), domain)
            batch = self._pending.setdefault(key, [])
            batch.append(result)
            if len(batch) >= self._limits.get(key, 64):
                # Keep memory bounded on a busy relay: merge as we go, next
                # time once the batch has doubled (so results that do not
                # merge cost amortised constant time each).
                batch[:] = merge_results(batch)
                self._limits[key] = max(64, 2 * len(batch))
        except Exception:
            log.failure("dropped a TLSRPT result that could not be recorded: {result!r}",
                        result=result)

    def flush(self) -> Deferred[None]:
        """
        Write everything recorded so far: one atomic update per key.

        A key whose update fails is kept and retried at the next flush.

        @return: L{Deferred} firing with L{None} when done (never fails).
        """
        return self._lock.run(lambda: Deferred.fromCoroutine(self._flush()))

    async def _flush(self) -> None:
        batch, self._pending = self._pending, {}
        self._limits = {}
        if not batch:
            return
        written = 0
        for key, results in sorted(batch.items()):
            merged = merge_results(results)

            def merge(old: dict[str, Any] | None, merged: list[Result] = merged) -> dict[str, Any]:
                # Runs in the database transaction: merge into what any node
                # stored meanwhile.
                return encode_results(merge_results(decode_results(old) + merged))

            try:
                await self.shelf.update(key, merge)
            except Exception:
                log.failure(
                    "could not store TLSRPT results for {key}; keeping them for the next flush",
                    key=key,
                )
                self._pending.setdefault(key, []).extend(merged)
            else:
                written += 1
        log.debug("flushed TLSRPT results: {count} keys", count=written)

    def startService(self) -> None:
        """
        Flush every C{interval} seconds from now on; a flush that fails is
        logged and the flushes go on (L{Periodic}).
        """
        super().startService()
        self._loop = Periodic("TLSRPT result flush", self.flush, self.interval, self._clock)
        self._loop.start(now=False)

    def stopService(self) -> Deferred[None]:
        """Stop the timer and flush what is left."""
        super().stopService()
        if self._loop is not None:
            self._loop.stop()
        self._loop = None
        return self.flush()
