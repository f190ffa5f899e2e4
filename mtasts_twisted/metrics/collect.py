"""
The metrics of the C{twistd mtasts} service: counters, the collector that
reads them at scrape time, and the wrappers that count.

Nothing here is on a hot path: components keep plain counters (dicts and
ints they update anyway, like L{PolicyCache.stats} and
L{SocketmapFactory.counts}), and L{StatsCollector} turns them into metric
families only when Prometheus scrapes.  The few counts no component keeps
(fetch outcomes, delivery outcomes, TLS failures, report outcomes) are
kept by thin wrappers here: L{MeteredFetcher}, L{MeteredDeliverer},
L{MeteredSink} and L{count_report_outcomes}.

Every service has its own C{CollectorRegistry} (never the global one), so
several services in one process, or tests, do not collide.  The endpoint
that serves it is L{mtasts_twisted.metrics.http}.

Metric names (all prefixed C{mtasts_}):

  - C{mtasts_policy_lookups_total{result="hit"|"miss"}}: policy cache lookups.
  - C{mtasts_policy_txt_lookups_total}: C{_mta-sts} TXT queries made.
  - C{mtasts_policy_fetches_total{outcome}}: HTTPS policy fetches; C{ok} or
    the failure reason (e.g. C{no-policy-served}, C{certificate-expired}).
  - C{mtasts_policy_cache_entries}: policies in the in-memory front.
  - C{mtasts_policy_refresh_failures_total{reason}}: failed refreshes of
    cached C{enforce}/C{testing} policies by reason code (e.g.
    C{dns-lookup}, C{no-record}, C{no-policy-served}); each is also logged
    as "policy refresh failed for DOMAIN (REASON): ...".  Alert on it: the
    cached policy only lasts until its C{max_age} ends.
  - C{mtasts_socketmap_requests_total{answer}}: socketmap answers
    (C{ok}, C{notfound}, C{temp}, C{perm}).
  - C{mtasts_socketmap_connections}: socketmap connections open now.
  - C{mtasts_deliveries_total{outcome,policy_mode}}: recipients by delivery
    outcome (C{delivered}, C{transient}, C{permanent}) and policy mode
    (C{enforce}, C{testing}, C{none}, C{no-policy}).
  - C{mtasts_tls_failures_total{result_type}}: TLSRPT failure sessions by
    RFC 8460 result type, from every recorded result.
  - C{mtasts_queue_messages}, C{mtasts_queue_oldest_age_seconds}: the relay
    queue (when the relay runs).
  - C{mtasts_reports_total{state}}: TLSRPT report runs' outcomes
    (C{sent}, C{failed}, C{retry}, C{dropped}, C{skipped}).
  - C{mtasts_enforce_as_testing}: 1 while C{--enforce-as-testing} is on,
    else 0; C{mtasts_enforce_as_testing_uses_total}: lookups whose
    C{enforce} policy it turned into C{testing}.
  - C{mtasts_policy_overrides}: domains in the overrides file in force;
    C{mtasts_policy_override_uses_total{kind}}: lookups an override
    decided (C{enforce}, C{skip}, C{dane-only});
    C{mtasts_policy_override_reloads_total{outcome}}: SIGHUP reloads
    (C{ok}, C{failed}: the previous map was kept).
  - C{mtasts_dane_lookups_total{state}}: with C{--dane}, the relay's DANE
    statuses of MX hosts of secure MX RRsets: C{secure-usable},
    C{secure-unusable}, C{none}, C{insecure}, C{bogus} (RFC 7672 §2.2;
    bogus hosts are deferred).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from mtasts_twisted.interfaces import IDeliverer, IPolicyFetcher, IResultSink
from mtasts_twisted.results import Result

if TYPE_CHECKING:
    from mtasts_twisted.cache import PolicyCache
    from mtasts_twisted.delivery import DeliveryResult
    from mtasts_twisted.fetch import FetchedPolicy
    from mtasts_twisted.overrides import OverridingPolicySource
    from mtasts_twisted.socketmap import SocketmapFactory
    from mtasts_twisted.tlsrpt import SendOutcome

__all__ = [
    "HostOutcome",
    "HourlyCounts",
    "MeteredDeliverer",
    "MeteredFetcher",
    "MeteredSink",
    "ServiceStats",
    "StatsCollector",
    "count_report_outcomes",
    "make_registry",
]


class HourlyCounts:
    """
    Counts per UTC hour over the last L{hours} hours: a small ring for the
    status page's charts (the Prometheus counters have no history).  Hours
    older than the ring are dropped when a newer one is counted.

    @ivar hours: how many hours are kept (24).
    """

    def __init__(self, hours: int = 24) -> None:
        """
        @param hours: how many hours to keep.
        """
        self.hours = hours
        self._counts: dict[int, collections.Counter[Hashable]] = {}

    def add(self, key: Hashable, when: float, n: int = 1) -> None:
        """
        Count C{n} for C{key} in the hour of C{when}.

        @param key: what is counted (e.g. C{(outcome, policy_mode)}).
        @param when: POSIX time.
        @param n: how many.
        """
        hour = int(when // 3600)
        self._counts.setdefault(hour, collections.Counter())[key] += n
        if len(self._counts) > self.hours:
            for old in sorted(self._counts)[: len(self._counts) - self.hours]:
                del self._counts[old]

    def series(self, now: float) -> list[tuple[float, Mapping[Hashable, int]]]:
        """
        The last L{hours} hours up to C{now}'s, oldest first: each hour's
        start (POSIX time) and its counts (empty for an hour without any).

        @param now: POSIX time.
        """
        last = int(now // 3600)
        return [(float(h * 3600), dict(self._counts.get(h, {})))
                for h in range(last - self.hours + 1, last + 1)]


@attrs.frozen
class HostOutcome:
    """
    The last delivery attempt to one MX host of a domain (the status page).

    @ivar when: POSIX time.
    @ivar status: the L{Status<mtasts_twisted.delivery.Status>} value
        (C{delivered}, C{transient}, C{permanent}).
    @ivar tls_version: the TLS version, or L{None} (no TLS session).
    @ivar verified: whether the certificate was verified.
    @ivar message: the server's reply or the error, as the peer said it
        (attacker-controlled text).
    """

    when: float
    status: str
    tls_version: str | None
    verified: bool
    message: str


#: MX hosts whose last outcome L{ServiceStats.mx_outcomes} keeps.
MAX_MX_OUTCOMES = 4096


class ServiceStats:
    """
    The counters of one service and the components to read at scrape time.

    @ivar fetches: HTTPS policy fetches by outcome.
    @ivar deliveries: recipients by C{(outcome, policy_mode)}.
    @ivar tls_failures: failed sessions by RFC 8460 result type.
    @ivar reports: report outcomes by state.
    @ivar cache: the L{PolicyCache<mtasts_twisted.cache.PolicyCache>}, once open.
    @ivar socketmap: the L{SocketmapFactory<mtasts_twisted.socketmap.SocketmapFactory>}, if any.
    @ivar overrides: the socketmap's L{OverridingPolicySource
        <mtasts_twisted.overrides.OverridingPolicySource>} (its table and the
        use counts it shares with the relay's), once open.
    @ivar queue_stats: a callable returning C{(messages, oldest_age_seconds)}
        of the relay queue, if a relay runs.
    @ivar dane_lookups: the relay deliverer's DANE statuses by state
        (L{Deliverer.dane_lookups<mtasts_twisted.delivery.Deliverer>}).
    @ivar hourly_deliveries: recipients by C{(outcome, policy_mode)} per
        hour (L{HourlyCounts}, the status page's chart).
    @ivar hourly_tls_failures: failed sessions by result type per hour.
    @ivar hourly_lookups: socketmap answers by kind per hour (fed by the
        status page's sampler of L{socketmap}'s counts).
    @ivar mx_outcomes: the last L{HostOutcome} by C{(domain, mx_host)},
        the L{MAX_MX_OUTCOMES} most recent.
    @ivar clock: the time of the hourly counts.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        """
        @param clock: returns POSIX time (the reactor's C{seconds}).
        """
        self.fetches: collections.Counter[str] = collections.Counter()
        self.deliveries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.tls_failures: collections.Counter[str] = collections.Counter()
        self.reports: collections.Counter[str] = collections.Counter()
        self.cache: PolicyCache | None = None
        self.socketmap: SocketmapFactory | None = None
        self.queue_stats: Callable[[], tuple[int, float]] | None = None
        self.overrides: OverridingPolicySource | None = None
        self.dane_lookups: collections.Counter[str] = collections.Counter()
        self.clock = clock
        self.hourly_deliveries = HourlyCounts()
        self.hourly_tls_failures = HourlyCounts()
        self.hourly_lookups = HourlyCounts()
        self.mx_outcomes: collections.OrderedDict[tuple[str, str], HostOutcome] = collections.OrderedDict()

    def record_host(self, domain: str, host: str, outcome: HostOutcome) -> None:
        """Keep C{outcome} as the last one of C{host} (an MX of C{domain})."""
        key = (domain, host)
        self.mx_outcomes.pop(key, None)
        self.mx_outcomes[key] = outcome
        while len(self.mx_outcomes) > MAX_MX_OUTCOMES:
            self.mx_outcomes.popitem(last=False)


class StatsCollector(Collector):
    """A custom collector that reads a L{ServiceStats} at scrape time."""

    def __init__(self, stats: ServiceStats) -> None:
        """
        @param stats: what to read.
        """
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (called by the registry on scrape)."""
        stats = self._stats
        lookups = CounterMetricFamily(
            "mtasts_policy_lookups", "Policy cache lookups by result.", labels=["result"])
        txt = CounterMetricFamily("mtasts_policy_txt_lookups", "_mta-sts TXT lookups made.")
        size = GaugeMetricFamily("mtasts_policy_cache_entries", "Policies in the in-memory cache front.")
        refresh_failures = CounterMetricFamily(
            "mtasts_policy_refresh_failures", "Failed refreshes of cached policies by reason.", labels=["reason"])
        cache = stats.cache
        if cache is not None:
            lookups.add_metric(["hit"], cache.stats.get("hits", 0))
            lookups.add_metric(["miss"], cache.stats.get("misses", 0))
            txt.add_metric([], cache.stats.get("txt_lookups", 0))
            size.add_metric([], len(cache._front))
            for reason, n in sorted(cache.refresh_failures.items()):
                refresh_failures.add_metric([reason], n)
        yield lookups
        yield txt
        yield size
        yield refresh_failures

        fetches = CounterMetricFamily(
            "mtasts_policy_fetches", "HTTPS policy fetches by outcome.", labels=["outcome"])
        for outcome, n in sorted(stats.fetches.items()):
            fetches.add_metric([outcome], n)
        yield fetches

        answers = CounterMetricFamily(
            "mtasts_socketmap_requests", "Socketmap requests by answer.", labels=["answer"])
        connections = GaugeMetricFamily("mtasts_socketmap_connections", "Socketmap connections open.")
        if stats.socketmap is not None:
            from mtasts_twisted.socketmap import ANSWER_KINDS

            for kind in ANSWER_KINDS:
                answers.add_metric([kind], stats.socketmap.counts.get(kind, 0))
            connections.add_metric([], stats.socketmap.connections)
        yield answers
        yield connections

        deliveries = CounterMetricFamily(
            "mtasts_deliveries", "Recipients by delivery outcome and policy mode.",
            labels=["outcome", "policy_mode"])
        for (outcome, mode), n in sorted(stats.deliveries.items()):
            deliveries.add_metric([outcome, mode], n)
        yield deliveries

        tls = CounterMetricFamily(
            "mtasts_tls_failures", "Failed TLS sessions by RFC 8460 result type.", labels=["result_type"])
        for result_type, n in sorted(stats.tls_failures.items()):
            tls.add_metric([result_type], n)
        yield tls

        messages = GaugeMetricFamily("mtasts_queue_messages", "Messages in the relay queue.")
        age = GaugeMetricFamily("mtasts_queue_oldest_age_seconds", "Age of the oldest queued message.")
        if stats.queue_stats is not None:
            count, oldest = stats.queue_stats()
            messages.add_metric([], count)
            age.add_metric([], oldest)
        yield messages
        yield age

        reports = CounterMetricFamily("mtasts_reports", "TLSRPT reports by outcome.", labels=["state"])
        for state, n in sorted(stats.reports.items()):
            reports.add_metric([state], n)
        yield reports

        dane = CounterMetricFamily(
            "mtasts_dane_lookups", "DANE statuses of MX hosts (RFC 7672) by state.", labels=["state"])
        for state, n in sorted(stats.dane_lookups.items()):
            dane.add_metric([state], n)
        yield dane
        yield from _override_families(stats.overrides)


_OVERRIDE_KINDS = ("enforce", "skip", "dane-only")


def _override_families(source: OverridingPolicySource | None) -> Iterator[Metric]:
    """The families of the operator overrides and C{--enforce-as-testing}."""
    switch = GaugeMetricFamily("mtasts_enforce_as_testing", "1 while --enforce-as-testing is on.")
    switch_uses = CounterMetricFamily(
        "mtasts_enforce_as_testing_uses", "Enforce policies applied as testing by --enforce-as-testing.")
    domains = GaugeMetricFamily("mtasts_policy_overrides", "Domains in the policy overrides file in force.")
    uses = CounterMetricFamily("mtasts_policy_override_uses", "Lookups decided by a policy override.",
                               labels=["kind"])
    reloads = CounterMetricFamily("mtasts_policy_override_reloads", "Policy overrides reloads by outcome.",
                                  labels=["outcome"])
    if source is not None:
        switch.add_metric([], 1 if source.enforce_as_testing else 0)
        switch_uses.add_metric([], source.uses.get("enforce-as-testing", 0))
        domains.add_metric([], len(source.table.overrides))
        for kind in _OVERRIDE_KINDS:
            uses.add_metric([kind], source.uses.get(kind, 0))
        for outcome in ("ok", "failed"):
            reloads.add_metric([outcome], source.table.reloads.get(outcome, 0))
    yield switch
    yield switch_uses
    yield domains
    yield uses
    yield reloads



def make_registry(stats: ServiceStats) -> CollectorRegistry:
    """
    A new registry (not the global one) collecting C{stats}.

    @param stats: the service's L{ServiceStats}.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return registry


@implementer(IPolicyFetcher)
class MeteredFetcher:
    """A policy fetcher that counts fetches by outcome."""

    def __init__(self, fetcher: IPolicyFetcher, stats: ServiceStats) -> None:
        """
        @param fetcher: has C{fetch(alabel) -> Deferred}.
        @param stats: where to count.
        """
        self._fetcher = fetcher
        self._stats = stats

    def fetch(self, domain: str) -> Deferred[FetchedPolicy]:
        """Fetch through the wrapped fetcher, counting the outcome."""
        d = self._fetcher.fetch(domain)

        def ok(result: FetchedPolicy) -> FetchedPolicy:
            self._stats.fetches["ok"] += 1
            return result

        def failed(failure: Failure) -> Failure:
            self._stats.fetches[getattr(failure.value, "reason", None) or "error"] += 1
            return failure

        return d.addCallbacks(ok, failed)


@implementer(IResultSink)
class MeteredSink:
    """An L{IResultSink} that counts failures by result type, then passes results on."""

    def __init__(self, sink: IResultSink | None, stats: ServiceStats) -> None:
        """
        @param sink: the next L{IResultSink}, or L{None}.
        @param stats: where to count.
        """
        self._sink = sink
        self._stats = stats

    def record(self, result: Result, when: float | None = None) -> None:
        """Count C{result}'s failures and pass it on."""
        now = self._stats.clock()
        for failure in result.failures:
            self._stats.tls_failures[failure.result_type.value] += failure.failed_session_count
            self._stats.hourly_tls_failures.add(failure.result_type.value, now, failure.failed_session_count)
        if self._sink is not None:
            self._sink.record(result, when)


@implementer(IDeliverer)
class MeteredDeliverer:
    """A L{Deliverer<mtasts_twisted.delivery.Deliverer>} wrapper counting outcomes."""

    def __init__(self, deliverer: IDeliverer, stats: ServiceStats) -> None:
        """
        @param deliverer: has C{deliver(sender, recipients, message)}.
        @param stats: where to count.
        """
        self._deliverer = deliverer
        self._stats = stats

    def __getattr__(self, name: str) -> Any:
        return getattr(self._deliverer, name)

    def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        message: BinaryIO,
        smtputf8: bool = False,
        requiretls: bool = False,
    ) -> Deferred[DeliveryResult]:
        """Deliver through the wrapped deliverer; count each recipient's outcome."""

        def count(result: DeliveryResult) -> DeliveryResult:
            stats = self._stats
            mode = result.policy_mode.value if result.policy_mode is not None else "no-policy"
            now = stats.clock()
            for outcome in result.outcomes:
                stats.deliveries[(outcome.status.value, mode)] += 1
                stats.hourly_deliveries.add((outcome.status.value, mode), now)
                if outcome.mx_host:
                    stats.record_host(result.domain, outcome.mx_host, HostOutcome(
                        now, outcome.status.value, outcome.tls_version, outcome.verified, outcome.message))
            return result

        return self._deliverer.deliver(
            sender, recipients, message, smtputf8=smtputf8, requiretls=requiretls
        ).addCallback(count)


def count_report_outcomes(stats: ServiceStats) -> Callable[[list[SendOutcome]], list[SendOutcome]]:
    """
    A callback for L{ReportScheduler.run_once}'s result counting the
    L{SendOutcome}s by state.
    """

    def count(outcomes: list[SendOutcome]) -> list[SendOutcome]:
        for outcome in outcomes or ():
            stats.reports[getattr(outcome.state, "value", str(outcome.state))] += 1
        return outcomes

    return count
