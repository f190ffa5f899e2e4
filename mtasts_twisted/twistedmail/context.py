"""
One-call wiring for a relay built on twisted.mail: L{MTASTSContext}, an
C{IService} that builds, starts and stops everything MTA-STS needs from one
frozen L{ContextSettings}::

    context = MTASTSContext(ContextSettings(data_dir="/var/lib/relay"), reactor)
    context.setServiceParent(application)          # or context.startService()
    numOk, replies = await context.sendmail("alice@example.org", ["bob@example.com"], message)

What it runs: the L{DNSResolver} (every lookup), the L{PolicyFetcher}, the
store (SQLite in the data directory, or the database URL), the
L{PolicyCache} and its L{PolicyRefresher}, and, with report settings, the
TLSRPT L{ResultAggregator} and daily L{ReportScheduler} (https rua, and
mailto rua through twisted.mail's sender with opportunistic TLS and no
policy: RFC 8460 §5.3, their sessions unreported, §3).  The store opens
asynchronously after C{startService}; L{MTASTSContext.when_ready} fires then,
and L{MTASTSContext.sendmail} waits for it.  C{stopService} stops the
refresher and the report run, flushes the collected results and the
cache's batched writes, and closes the store.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from typing import Any, cast

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUDP,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtasts_twisted.cache import POLICY_TABLE, CacheSettings, PolicyCache, PolicyRefresher
from mtasts_twisted.delivery import DeliverySettings
from mtasts_twisted.delivery.sources import NoPolicySource
from mtasts_twisted.dns import DNSHostnameResolver, DNSResolver
from mtasts_twisted.fetch import PolicyFetcher
from mtasts_twisted.interfaces import IResultSink, IStore
from mtasts_twisted.pkix import load_trust_roots
from mtasts_twisted.policy import MTASTSError
from mtasts_twisted.results import Result
from mtasts_twisted.store import default_database_url, open_store
from mtasts_twisted.tls import MXTLSOptionsCache
from mtasts_twisted.tlsrpt import (
    NULL_SINK,
    TABLES,
    HTTPSReportSender,
    ReportScheduler,
    ReportSettings,
    ResultAggregator,
)
from mtasts_twisted.twistedmail.domain import DomainSender
from mtasts_twisted.twistedmail.routes import Router
from mtasts_twisted.twistedmail.sendmail import MTASTSSender, Reply, SendmailResult

__all__ = ["ContextError", "ContextReactor", "ContextSettings", "MTASTSContext"]

log = Logger()


class ContextReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorUDP, IReactorThreads,
                     IReactorPluggableNameResolver):
    """
    The reactor a context runs on (the global reactor provides all of
    these).  For typing only, like Twisted's own C{_IReactorCommon}: never
    ask C{providedBy}.
    """


class ContextError(MTASTSError):
    """The context cannot start (the database cannot be opened, ...)."""

    reason = "context-start"


def _tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class ContextSettings:
    """
    What an embedding relay tells L{MTASTSContext}.

    @ivar data_dir: the directory of the SQLite database
        (C{DATA-DIR/mtasts.sqlite}, as C{twistd mtasts} uses it); created
        when missing.  Not used when C{database} is given.
    @ivar database: a database URL instead (C{postgresql://...} for several
        relay nodes, C{sqlite:PATH}, or C{memory:} for tests).
    @ivar nameservers: C{"IP[:PORT]"} for every lookup (TXT, MX, addresses
        of MX and policy hosts); empty: C{/etc/resolv.conf}.
    @ivar ca_file: PEM trust roots for MX hosts, policy hosts and https
        report endpoints; L{None}: the system's.
    @ivar delivery: EHLO name, MX port(s), timeouts and caps of the
        twisted.mail sessions (L{DeliverySettings}; C{reuse_*} unused:
        twisted.mail's sender has one transaction per connection).
    @ivar reports: collect TLSRPT results and send daily reports with these
        settings; L{None}: neither (results still go to the C{sink} given
        to L{MTASTSContext}).
    @ivar policy_port: the HTTPS port of policy hosts (443; for tests and
        lab setups).
    """

    data_dir: str = "mtasts-data"
    database: str | None = None
    nameservers: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    ca_file: str | None = None
    delivery: DeliverySettings = DeliverySettings()
    reports: ReportSettings | None = None
    policy_port: int = 443

    @property
    def database_url(self) -> str:
        """The store's URL: C{database}, or SQLite in C{data_dir}."""
        return self.database if self.database is not None else default_database_url(self.data_dir)


@implementer(IResultSink)
class _Sinks:
    """Hands every result to several sinks (each must not fail; see L{IResultSink})."""

    def __init__(self, sinks: Iterable[IResultSink]) -> None:
        self._sinks = tuple(sinks)

    def record(self, result: Result, when: float | None = None) -> None:
        for sink in self._sinks:
            sink.record(result, when)


class MTASTSContext(MultiService):
    """
    Everything MTA-STS needs, as one service (see the module docstring).

    @ivar settings: the L{ContextSettings}.
    @ivar resolver: the L{DNSResolver}.
    @ivar fetcher: the L{PolicyFetcher}.
    @ivar tls_options: the MX hosts' TLS options (one trust root load).
    @ivar sink: where every TLSRPT result goes (the aggregator and the
        C{sink} given).
    @ivar store: the open store, once ready (L{when_ready}).
    @ivar cache: the L{PolicyCache}, once ready.
    @ivar aggregator: the L{ResultAggregator}, once ready, with reports.
    @ivar scheduler: the L{ReportScheduler}, once ready, with reports.
    @ivar sender: the L{MTASTSSender}, once ready.
    """

    def __init__(
        self,
        settings: ContextSettings,
        reactor: ContextReactor,
        *,
        sink: IResultSink | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """
        Build the resolver, fetcher and TLS options (the rest needs the
        store, opened at start).

        @param settings: the L{ContextSettings}.
        @param reactor: the reactor.
        @param sink: also receives every TLSRPT result (e.g. for metrics,
            or a L{ListSink<mtasts_twisted.testing.sinks.ListSink>} in
            tests).
        @param rng: shuffles MX hosts of equal preference.
        @raise ValueError: a bad nameserver or CA file.
        @raise OSError: the CA file cannot be read.
        """
        super().__init__()
        self.settings = settings
        self._reactor = reactor
        self._rng = rng
        self._extra_sink = sink
        self.resolver = DNSResolver(reactor, list(settings.nameservers) or None,
                                    cache_size=CacheSettings().front_size // 2)
        self._name_resolver = DNSHostnameResolver(self.resolver)
        trust_root = load_trust_roots(settings.ca_file)
        self._trust_root = trust_root
        self.tls_options = MXTLSOptionsCache(trust_root)
        self.fetcher = PolicyFetcher(reactor, trust_roots=trust_root, resolver=self.resolver,
                                     name_resolver=self._name_resolver, port=settings.policy_port)
        self.sink: IResultSink = sink if sink is not None else NULL_SINK
        self.store: IStore | None = None
        self.cache: PolicyCache | None = None
        self.aggregator: ResultAggregator | None = None
        self.scheduler: ReportScheduler | None = None
        self.sender: MTASTSSender | None = None
        self._report_sender: MTASTSSender | None = None
        self._starting: Deferred[None] | None = None
        self._start_error: BaseException | None = None
        self._waiting: list[Deferred[None]] = []

    # -- the drop-in, once ready --

    def sendmail(self, from_addr: str | bytes, to_addrs: Any, msg: Any, senderDomainName: str | bytes | None = None,
                 port: int | None = None, requireTransportSecurity: bool = False, *,
                 requiretls: bool = False) -> Deferred[tuple[int, list[Reply]]]:
        """
        L{MTASTSSender.sendmail}, once ready (L{when_ready}): twisted.mail's
        C{sendmail} without the host (the recipients' MX hosts, by policy).
        C{requiretls=True} is refused (L{MTASTSSender.sendmail}).
        """
        return Deferred.fromCoroutine(self._when_ready()).addCallback(
            lambda sender: sender.sendmail(from_addr, to_addrs, msg, senderDomainName, port,
                                           requireTransportSecurity, requiretls=requiretls))

    def deliver(self, from_addr: str | bytes, to_addrs: Any, msg: Any, senderDomainName: str | bytes | None = None,
                port: int | None = None, requireTransportSecurity: bool = False, *,
                requiretls: bool = False) -> Deferred[SendmailResult]:
        """L{MTASTSSender.deliver} (per-recipient outcomes), once ready."""
        return Deferred.fromCoroutine(self._when_ready()).addCallback(
            lambda sender: sender.deliver(from_addr, to_addrs, msg, senderDomainName, port,
                                          requireTransportSecurity, requiretls=requiretls))

    def when_ready(self) -> Deferred[None]:
        """
        A new L{Deferred} that fires once the store is open and everything
        runs, or fails with L{ContextError} (not started, could not start,
        or stopped).
        """
        if self._starting is None:
            return fail(ContextError("the MTA-STS context is not started (startService)"))
        if self._start_error is not None:
            return fail(self._start_error)
        if self._starting.called:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        return waiter

    async def _when_ready(self) -> MTASTSSender:
        await self.when_ready()
        if self.sender is None:
            raise ContextError("the MTA-STS context is stopped")
        return self.sender

    # -- the service --

    def startService(self) -> None:
        """Open the store, then build and start the rest (L{when_ready})."""
        super().startService()
        self._start_error = None
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._failed).addBoth(self._settled)

    def _failed(self, failure: Failure) -> None:
        log.critical("MTA-STS context cannot start: {error}", error=failure.getErrorMessage())
        error = failure.value
        self._start_error = error if isinstance(error, ContextError) else ContextError(f"cannot start: {error!r}")

    def _settled(self, _: object) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if self._start_error is not None:
                waiter.errback(self._start_error)
            else:
                waiter.callback(None)

    async def _start(self) -> None:
        settings = self.settings
        if settings.database is None:
            try:
                os.makedirs(settings.data_dir, exist_ok=True)
            except OSError as e:
                raise ContextError(f"cannot create the data directory {settings.data_dir}: {e}") from None
        try:
            store = await open_store(settings.database_url, self._reactor, tables=(POLICY_TABLE, *TABLES))
        except Exception as e:
            raise ContextError(f"cannot open the database: {e}") from None
        if not self.running:
            await store.close()
            return
        self.store = store
        cache = self.cache = PolicyCache(store, self.resolver, self.fetcher, self._reactor)
        sinks: list[IResultSink] = [] if self._extra_sink is None else [self._extra_sink]
        if settings.reports is not None:
            self.aggregator = ResultAggregator(store, self._reactor)
            sinks.insert(0, self.aggregator)
        self.sink = _Sinks(sinks)
        # DeliverySettings' reactor: IReactorTCP and IReactorTime.
        reactor = cast(Any, self._reactor)
        router = Router(self.resolver, cache, self.tls_options, self.sink, settings.delivery, rng=self._rng)
        self.sender = MTASTSSender(DomainSender(reactor, router, settings.delivery))
        # RFC 8460 §5.3: reports are delivered despite MTA-STS failures, and
        # their own sessions are not reported (§3): no policy, NULL_SINK.
        report_router = Router(self.resolver, NoPolicySource(), self.tls_options, NULL_SINK, settings.delivery,
                               rng=self._rng)
        self._report_sender = MTASTSSender(DomainSender(reactor, report_router, settings.delivery))
        cache.start()
        PolicyRefresher(cache, self._reactor).setServiceParent(self)
        if self.aggregator is not None:
            self.aggregator.setServiceParent(self)
        if settings.reports is not None:
            self.scheduler = ReportScheduler(
                store, settings.reports, self.resolver, self._reactor,
                https_sender=HTTPSReportSender(self._reactor, trust_roots=self._trust_root,
                                               name_resolver=self._name_resolver),
                send_mail=self.mail_report,
            )
            self.scheduler.setServiceParent(self)
        log.info("MTA-STS context started: database {database}, reports {reports}",
                 database=settings.database_url.partition("://")[0].partition(":")[0],
                 reports="on" if settings.reports is not None else "off")

    def mail_report(self, sender: str, recipient: str, message: bytes) -> Deferred[object]:
        """
        The report scheduler's C{send_mail}: one report message, through
        twisted.mail's sender, opportunistic TLS, no policy, no TLSRPT
        results (RFC 8460 §5.3, §3).  Fails unless accepted.
        """
        if self._report_sender is None:
            raise ContextError("the MTA-STS context is not ready")
        d: Deferred[Any] = self._report_sender.sendmail(sender, [recipient], message)
        return d

    def stopService(self) -> Deferred[None]:
        """Stop the refresher and reports, flush, close the store."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            await self.when_ready()
        except ContextError:
            pass
        await super().stopService()
        self.sender = self._report_sender = None
        cache, self.cache = self.cache, None
        store, self.store = self.store, None
        try:
            if cache is not None:
                await cache.stop()
        finally:
            if store is not None:
                await store.close()
        log.info("MTA-STS context stopped")
