"""
The composition root of C{twistd mtasts}: L{open_runtime} opens the store
and builds every component that needs it from a frozen
L{ServiceSettings<mtasts_twisted.service.options.ServiceSettings>}.

What it builds: the L{DNSResolver} (all lookups), the metered
L{PolicyFetcher}, the store, the L{PolicyCache}, the TLSRPT
L{ResultAggregator} and (metered) L{ReportScheduler} when reports are on,
the relay's (metered) L{Deliverer} and the L{ReportMailer} with its own
policy-less deliverer.  The service (L{mtasts_twisted.service.tap}) starts
them and wires the listeners; the CLI's C{report} commands use the same
L{Runtime}.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUDP,
)

from mtasts_twisted.cache import POLICY_TABLE, CacheSettings, PolicyCache
from mtasts_twisted.interfaces import IDNSResolver, IResultSink, IStore
from mtasts_twisted.metrics import (
    MeteredDeliverer,
    MeteredFetcher,
    MeteredSink,
    ServiceStats,
    count_report_outcomes,
)
from mtasts_twisted.overrides import OverrideFileError, OverrideTable, OverridingPolicySource
from mtasts_twisted.service.settings import ServiceSettings, as_settings
from mtasts_twisted.service.reportmail import NoPolicyCache, ReportMailer
from mtasts_twisted.tlsrpt import ReportScheduler
from mtasts_twisted.tlsrpt.schedule import ReportPoster, SchedulerSettings

if TYPE_CHECKING:
    from mtasts_twisted.dns import DNSResolver
    from mtasts_twisted.tlsrpt import ReportSettings, ResultAggregator, SendMail, SendOutcome

__all__ = [
    "IServiceReactor",
    "MeteredReportScheduler",
    "Runtime",
    "StartupError",
    "open_runtime",
    "policy_sources",
]

log = Logger()


class IServiceReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorUDP, IReactorThreads,
                      IReactorPluggableNameResolver):
    """
    The reactor the service runs on: every reactor twistd installs provides
    each of these interfaces.

    For typing only, like Twisted's own make-believe C{_IReactorCommon}
    (the type of C{twisted.internet.reactor}): nothing declares it, so
    never ask C{providedBy}.  A value of this type is accepted wherever one
    of the interfaces it extends is wanted, which a C{typing.Protocol}
    would not be under mypy-zope.
    """


class StartupError(Exception):
    """The service cannot start; the message is the one line to log."""


@attrs.define
class Runtime:
    """
    The connected components of a running service (also used by the CLI).

    @ivar store: the open store.
    @ivar resolver: the L{DNSResolver}.
    @ivar cache: the L{PolicyCache}.
    @ivar sink: the L{IResultSink} of lookups and deliveries.
    @ivar aggregator: the L{ResultAggregator}, or L{None} without reports.
    @ivar scheduler: the L{ReportScheduler}, or L{None} without reports.
    @ivar deliverer: the relay's (metered) L{Deliverer}.
    @ivar overrides: the L{OverrideTable} (empty without
        C{--policy-overrides}); L{OverrideTable.reload} on SIGHUP.
    @ivar policies: the socketmap's policy source (the cache with the
        overrides applied); the relay's deliverer has its own over the same
        table, which defers C{dane-only} domains.
    """

    store: IStore
    resolver: DNSResolver
    cache: PolicyCache
    sink: IResultSink
    aggregator: ResultAggregator | None = None
    scheduler: ReportScheduler | None = None
    deliverer: MeteredDeliverer | None = None
    overrides: OverrideTable | None = None
    policies: OverridingPolicySource | None = None

    async def close(self) -> None:
        """Write what the cache batched and close the store."""
        try:
            await self.cache.stop()
        finally:
            await self.store.close()


def _tables() -> tuple[str, ...]:
    from mtasts_twisted.tlsrpt import TABLES

    return (POLICY_TABLE, *TABLES)


async def open_runtime(
    config: ServiceSettings | Mapping[str, Any], reactor: IServiceReactor, stats: ServiceStats | None = None
) -> Runtime:
    """
    Open the store and build the components from the service's settings.

    @param config: the L{ServiceSettings}, or parsed L{Options} (or a dict
        with the same keys; see L{ServiceSettings.from_config}).
    @param reactor: the reactor.
    @param stats: where the metered wrappers count; a new one by default.
    @raise StartupError: with one line saying what is wrong.
    """
    from mtasts_twisted.dns import DNSHostnameResolver, DNSResolver
    from mtasts_twisted.fetch import PolicyFetcher
    from mtasts_twisted.store import StoreError, open_store
    from mtasts_twisted.tlsrpt import NULL_SINK, HTTPSReportSender, ResultAggregator

    settings = as_settings(config)
    stats = stats if stats is not None else ServiceStats()
    try:
        # Half as many answers as the cache's front has policies: the hot
        # paths do not need the DNS cache (the policy cache keeps confirmed
        # TXT answers and the socketmap its rendered MX answers until their
        # TTLs end); it serves the policy hosts' addresses while fetching and
        # the MX answers of deliveries.  Each cached answer costs ~0.7 KB
        # (bench/RESULTS.md: RSS with 100k policies).
        resolver = DNSResolver(reactor, list(settings.nameservers) or None,
                               cache_size=CacheSettings().front_size // 2)
    except (OSError, ValueError) as e:
        raise StartupError(f"no usable nameserver (give --nameserver): {e}") from None
    name_resolver = DNSHostnameResolver(resolver)
    fetcher = MeteredFetcher(
        PolicyFetcher(reactor, trust_roots=settings.ca_file, resolver=resolver, name_resolver=name_resolver),
        stats)
    try:
        store = await open_store(settings.database, reactor, tables=_tables())
    except (StoreError, OSError, ValueError) as e:
        raise StartupError(f"cannot open the database: {e}") from None
    cache = PolicyCache(store, resolver, fetcher, reactor)
    stats.cache = cache
    try:
        table, relay_policies, policies = policy_sources(settings, cache, reactor)
    except OverrideFileError as e:
        await store.close()
        raise StartupError(str(e)) from None
    stats.overrides = policies
    report_settings = settings.report_settings
    aggregator: ResultAggregator | None = None
    scheduler: ReportScheduler | None = None
    if report_settings is not None:
        aggregator = ResultAggregator(store, reactor)
    sink = MeteredSink(aggregator, stats)
    from mtasts_twisted.delivery import Deliverer, DeliveryReactor, DeliverySettings

    # IServiceReactor includes IReactorTime and IReactorTCP, which is all
    # DeliveryReactor asks; mypy cannot match a zope interface to a Protocol.
    delivery_reactor = cast(DeliveryReactor, reactor)

    delivery_settings = DeliverySettings(helo_name=settings.helo_name, port=settings.delivery_port,
                                         port_for=dict(settings.delivery_port_for))
    # The relay keeps sessions for reuse (--session-reuse, 2 s by default
    # like Postfix's smtp_connection_cache_time_limit); RelayService.stopService
    # closes them.
    # --dane: the relay's deliveries only (report mail goes out without
    # DANE, as without MTA-STS: RFC 8460 §5.3).
    relay_deliverer = Deliverer(delivery_reactor, resolver, relay_policies, trust_root=settings.ca_file, sink=sink,
                                settings=attrs.evolve(delivery_settings, reuse_idle_time=settings.session_reuse,
                                                      dane=settings.dane))
    stats.dane_lookups = relay_deliverer.dane_lookups
    deliverer = MeteredDeliverer(relay_deliverer, stats)
    # RFC 8460 §5.3: reports are delivered despite MTA-STS failures, and
    # their own sessions are not reported (§3): no policy, NULL_SINK.  One
    # report per domain and day: nothing to reuse, nothing parked to close.
    mailer = ReportMailer(Deliverer(delivery_reactor, resolver, NoPolicyCache(), trust_root=settings.ca_file,
                                    sink=NULL_SINK, settings=delivery_settings))
    if report_settings is not None:
        try:
            scheduler = MeteredReportScheduler(
                stats, store, report_settings, resolver, reactor,
                https_sender=HTTPSReportSender(reactor, trust_roots=settings.ca_file,
                                               name_resolver=name_resolver),
                send_mail=mailer if settings.mail_reports else None,  # RFC 8460 §3: DKIM, or said unsigned
            )
        except (OSError, ValueError) as e:
            await store.close()
            raise StartupError(f"cannot set up TLSRPT reports: {e}") from None
    return Runtime(store, resolver, cache, sink, aggregator, scheduler, deliverer, table, policies)


def policy_sources(
    settings: ServiceSettings, cache: PolicyCache, clock: IReactorTime
) -> tuple[OverrideTable, OverridingPolicySource, OverridingPolicySource]:
    """
    The one policy decision for the relay and the socketmap: the overrides
    file (C{--policy-overrides}) and C{--enforce-as-testing} over C{cache}.

    @return: C{(table, relay's source, socketmap's source)}; the two
        sources share the table (one SIGHUP reloads both) and their use
        counts.
    @raise OverrideFileError: the overrides file is unreadable or malformed.
    """
    table = OverrideTable.load(settings.policy_overrides) if settings.policy_overrides else OverrideTable()
    relay = OverridingPolicySource(cache, table, clock, enforce_as_testing=settings.enforce_as_testing,
                                   defer_dane_only=not settings.dane)
    socketmap = OverridingPolicySource(cache, table, clock, enforce_as_testing=settings.enforce_as_testing,
                                       uses=relay.uses)
    if settings.enforce_as_testing:
        log.critical("--enforce-as-testing is ON: every MTA-STS enforce policy is applied as testing; mail is "
                     "delivered whatever the TLS checks say (turn it off once mail flows again)")
    return table, relay, socketmap


class MeteredReportScheduler(ReportScheduler):
    """A L{ReportScheduler} that counts its outcomes for the metrics."""

    def __init__(
        self,
        stats: ServiceStats,
        store: IStore,
        settings: ReportSettings,
        resolver: IDNSResolver,
        clock: IReactorTime,
        *,
        schedule: SchedulerSettings = SchedulerSettings(),
        https_sender: ReportPoster | None = None,
        send_mail: SendMail | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """
        @param stats: where to count; the other arguments are
            L{ReportScheduler}'s.
        """
        super().__init__(store, settings, resolver, clock, schedule=schedule, https_sender=https_sender,
                         send_mail=send_mail, rng=rng)
        self._count = count_report_outcomes(stats)

    def run_once(self, force: bool = False) -> Deferred[list[SendOutcome]]:
        """See L{ReportScheduler.run_once}; the outcomes are counted."""
        return super().run_once(force).addCallback(self._count)
