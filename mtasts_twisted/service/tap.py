"""
The C{twistd mtasts} service: L{MTASTSService} and L{makeService}.

  - listeners (bound in C{privilegedStartService}, so C{twistd -u/-g}
    drops privileges after binding): the Postfix socketmap policy server
    (C{--socketmap}), the relay's SMTP intake (C{--smtp}, when the relay
    module is installed), the Prometheus metrics page (C{--metrics}) and
    the read-only status page (C{--web}, L{mtasts_twisted.web});
  - once the store is open (asynchronously, right after start, by
    L{open_runtime<mtasts_twisted.service.runtime.open_runtime>}): the
    L{PolicyCache} with its L{PolicyRefresher}, the TLSRPT
    L{ResultAggregator} and L{ReportScheduler}, and the relay workers.

At start the soft file descriptor limit is raised to the hard limit, and
the socketmap's and the SMTP intake's connection caps are sized well below
it (L{mtasts_twisted.service.fdlimits}); both are logged.

A failure at start (a port in use, a database that cannot be opened) is
logged as one line and the process exits with status 1.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from mtasts_twisted.cache import PolicyRefresher
from mtasts_twisted.delivery import DeliverySettings
from mtasts_twisted.metrics import MetricsFactory, MetricsLimits, ServiceStats, make_registry
from mtasts_twisted.service.fdlimits import ConnectionCaps, FDLimit, raise_fd_limit, size_connection_caps
from mtasts_twisted.service.listeners import LateFactory, ListenerService, address
from mtasts_twisted.service.settings import ServiceSettings, as_settings
from mtasts_twisted.service.runtime import IServiceReactor, Runtime, StartupError, open_runtime

if TYPE_CHECKING:
    from mtasts_twisted.relay import RelayService, RelaySettings
    from mtasts_twisted.socketmap import SocketmapSettings

__all__ = ["MTASTSService", "makeService", "queue_directory"]

log = Logger()


def _exit_later(reactor: IServiceReactor, code: int) -> None:
    """Stop the reactor, and exit with C{code} once twistd has cleaned up."""

    def exit_now() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)

    atexit.register(exit_now)
    reactor.callLater(0, _stop, reactor)


def _stop(reactor: IServiceReactor) -> None:
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


class MTASTSService(MultiService):
    """
    The C{twistd mtasts} service (see the module docstring).

    @ivar config: the parsed L{Options} (or settings) it was made with.
    @ivar settings: the L{ServiceSettings}.
    @ivar stats: the L{ServiceStats} behind the metrics.
    @ivar registry: the service's own Prometheus C{CollectorRegistry}.
    @ivar listeners: the L{ListenerService}s by option name.
    @ivar runtime: the L{Runtime} once started, else L{None}.
    @ivar relay: the L{RelayService} (delivery workers) once started with
        C{--smtp}, else L{None}.
    @ivar ready: after C{startService}, a L{Deferred} firing with C{True}
        once everything runs, or C{False} after a startup failure (logged).
    @ivar fd_limit: the L{FDLimit} after C{startService} raised it.
    @ivar caps: the listeners' L{ConnectionCaps}, sized at C{startService}.
    """

    def __init__(self, config: ServiceSettings | Mapping[str, Any], reactor: IServiceReactor,
                 fatal: Callable[[int], None] | None = None, *, install_signals: bool = True) -> None:
        """
        @param config: parsed L{Options}, or their L{ServiceSettings}.
        @param reactor: the reactor.
        @param fatal: called with an exit code after a startup failure was
            logged; by default stops the reactor and exits with that code.
        @param install_signals: with C{--policy-overrides}, install
            L{handle_sighup} for SIGHUP at start (tests in one process say
            C{False} and call it themselves).
        """
        super().__init__()
        self.config = config
        self.settings = as_settings(config)
        self._reactor = reactor
        self._fatal = fatal if fatal is not None else (lambda code: _exit_later(reactor, code))
        self.stats = ServiceStats(reactor.seconds)
        self.registry = make_registry(self.stats)
        self.listeners: dict[str, ListenerService] = {}
        self.runtime: Runtime | None = None
        self.ready: Deferred[bool] | None = None
        self.relay: RelayService | None = None
        self.fd_limit: FDLimit | None = None
        self.caps: ConnectionCaps | None = None
        self.refresher: PolicyRefresher | None = None
        self._late: dict[str, LateFactory] = {}
        self._install_signals = install_signals
        self._previous_sighup: Any = None
        for name, description in self.settings.listeners.items():
            factory: IProtocolFactory
            if name == "metrics":
                factory = MetricsFactory(self.registry, reactor)
            elif name == "web":
                factory = self._web_site(reactor)
            else:
                factory = self._late[name] = LateFactory(name)
            listener = ListenerService(name, description, serverFromString(reactor, description), factory)
            listener.setServiceParent(self)
            self.listeners[name] = listener

    def handle_sighup(self, signum: int, frame: Any) -> None:
        """
        The SIGHUP handler (installed with C{--policy-overrides}): reload
        the overrides file in the reactor thread (L{reload_overrides}).
        """
        self._reactor.callFromThread(self.reload_overrides)

    def reload_overrides(self) -> bool:
        """
        Read the C{--policy-overrides} file again; a malformed one keeps the
        previous map (logged).

        @return: whether the new file is in force.
        """
        runtime = self.runtime
        if runtime is None or runtime.overrides is None:
            log.warn("SIGHUP: nothing to reload yet")  # noqa: G010
            return False
        return runtime.overrides.reload()

    def _web_site(self, reactor: IServiceReactor) -> IProtocolFactory:
        """The status page (C{--web}): reads the components once they run."""
        from mtasts_twisted.web import CounterSampler, StatusResource, WebSite, WebSources, protect

        def store() -> Any:
            return self.runtime.store if self.runtime is not None else None

        sources = WebSources(
            clock=reactor, stats=self.stats,
            cache=lambda: self.runtime.cache if self.runtime is not None else None,
            store=store,
            queue=lambda: self.relay.queue if self.relay is not None else None,
            refresher=lambda: self.refresher,
            report_settings=self.settings.report_settings,
            policies=lambda: self.runtime.policies if self.runtime is not None else None,
            socketmap=lambda: self.stats.socketmap,
            answer_settings=self._socketmap_settings(),
            dane=self.settings.dane)
        # The socketmap keeps running totals only: the page's chart samples them.
        CounterSampler(lambda: self.stats.socketmap.counts if self.stats.socketmap is not None else None,
                       self.stats.hourly_lookups.add, reactor).setServiceParent(self)
        resource: Any = StatusResource(sources)
        if self.settings.web_password_file is not None or self.settings.web_token_file is not None:
            resource = protect(resource, self.settings.web_password_file, self.settings.web_token_file)
        return WebSite(resource, reactor)

    def startService(self) -> None:
        """
        Raise the file descriptor limit and size the connection caps; start
        the listeners, then open the store and start the rest.  With
        C{--policy-overrides}, SIGHUP reloads the file.
        """
        if self.settings.policy_overrides and self._install_signals:
            self._previous_sighup = signal.signal(signal.SIGHUP, self.handle_sighup)
        self.fd_limit = limit = raise_fd_limit()
        self.caps = caps = self._size_caps(limit.soft)
        log.info("file descriptors: soft limit {soft} (was {before}; hard {hard}); {sizing}",
                 soft=limit.soft, before=limit.before, hard="unlimited" if limit.hard is None else limit.hard,
                 sizing=caps.describe())
        if caps.scaled:
            log.warn("file descriptors: a soft limit of {soft} is low for the default connection caps;"  # noqa: G010
                     " raise the hard limit (ulimit -Hn, LimitNOFILE=)", soft=limit.soft)
        super().startService()
        self.ready = Deferred.fromCoroutine(self._start())

    def _socketmap_settings(self) -> SocketmapSettings:
        """The socketmap's answers as the options ask (its caps are sized at start)."""
        from mtasts_twisted.socketmap import SocketmapSettings

        settings = self.settings
        return SocketmapSettings(strict_testing=settings.strict_testing, tlsrpt_attributes=settings.tlsrpt_attributes,
                                 fail_open=settings.fail_open, dane=settings.dane)

    def _relay_settings(self) -> RelaySettings:
        from mtasts_twisted.relay import RelaySettings

        settings = RelaySettings(reporting_mta=self.settings.helo_name)
        if self.caps is not None:
            settings = attrs.evolve(settings, max_connections=self.caps.smtp,
                                    max_connections_per_ip=self.caps.smtp_per_ip)
        return settings

    def _size_caps(self, fd_limit: int) -> ConnectionCaps:
        """The caps of the listeners that are on, for C{fd_limit}."""
        socketmap = 0
        if "socketmap" in self._late:
            from mtasts_twisted.socketmap import SocketmapSettings

            socketmap = SocketmapSettings().max_connections or 1024
        metrics = MetricsLimits().max_connections if "metrics" in self.settings.listeners else 0
        if "web" in self.settings.listeners:
            from mtasts_twisted.web import WebLimits

            metrics += WebLimits().max_connections  # answered from memory and the store, like metrics
        if "smtp" not in self._late:
            return size_connection_caps(fd_limit, socketmap=socketmap, smtp=0, smtp_per_ip=0,
                                        delivery_slots=0, parked_sessions=0, metrics=metrics)
        relay = self._relay_settings()
        return size_connection_caps(fd_limit, socketmap=socketmap, smtp=relay.max_connections,
                                    smtp_per_ip=relay.max_connections_per_ip,
                                    delivery_slots=relay.concurrency,
                                    parked_sessions=DeliverySettings().reuse_max_idle_sessions,
                                    metrics=metrics)

    async def _start(self) -> bool:
        try:
            for listener in list(self.listeners.values()):
                await listener.listening()
            if self.settings.report_settings is None and not self.settings.no_reports:
                log.warn("TLSRPT reports are off: give --report-org and --report-from (or --no-reports)")
            _log_report_mail(self.settings)
            runtime = self.runtime = await open_runtime(self.settings, self._reactor, self.stats)
            if not self.running:
                await runtime.close()
                return False
            self._wire(runtime)
            if self.settings.dane:
                _check_dane(runtime, self.settings)
        except (StartupError, OSError) as e:
            log.critical("mtasts: {error}", error=str(e))
            self._fatal(1)
            return False
        except Exception:
            log.failure("mtasts: cannot start")
            self._fatal(1)
            return False
        log.info("mtasts started: {listening}", listening=", ".join(
            f"{name} on {address(listener.port)}" for name, listener in self.listeners.items()) or "no listeners")
        return True

    def _wire(self, runtime: Runtime) -> None:
        runtime.cache.start()
        self.refresher = PolicyRefresher(runtime.cache, self._reactor)
        self.refresher.setServiceParent(self)
        if runtime.aggregator is not None:
            runtime.aggregator.setServiceParent(self)
        if runtime.scheduler is not None:
            runtime.scheduler.setServiceParent(self)
        if "socketmap" in self._late:
            from mtasts_twisted.socketmap import SocketmapFactory

            factory = SocketmapFactory(
                runtime.policies or runtime.cache, runtime.resolver, self._reactor,
                settings=attrs.evolve(self._socketmap_settings(),
                                      max_connections=self.caps.socketmap if self.caps else 1024),
                sink=runtime.sink,
            )
            self.stats.socketmap = factory
            self._late["socketmap"].set(factory)
        if "smtp" in self._late:
            self._wire_relay(runtime)

    def _wire_relay(self, runtime: Runtime) -> None:
        from mtasts_twisted.relay import RelayService, RelaySMTPFactory

        assert runtime.deliverer is not None, "open_runtime builds the relay's deliverer"
        settings = self._relay_settings()
        queue = settings.make_queue(queue_directory(self.settings), self._reactor)
        workers = self.relay = RelayService(queue, runtime.deliverer, settings, self._reactor)
        self.stats.queue_stats = lambda: (workers.stats["queue_messages"], workers.stats["oldest_age"])
        workers.setServiceParent(self)
        tls = None
        if self.settings.smtp_tls_cert is not None and self.settings.smtp_tls_key is not None:
            # STARTTLS on the intake (RFC 3207), so clients can ask for
            # REQUIRETLS (RFC 8689 §2); the files were checked by Options.
            from mtasts_twisted.service.intaketls import load_smtp_tls

            tls = load_smtp_tls(self.settings.smtp_tls_cert, self.settings.smtp_tls_key)
        self._late["smtp"].set(
            RelaySMTPFactory(queue, settings, self._reactor, tls_context=tls, on_message=workers.wake)
        )

    def stopService(self) -> Deferred[None]:
        """Stop everything; then flush the cache and close the store."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        if self.ready is not None and not self.ready.called:
            await self.ready
        await super().stopService()
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            await runtime.close()


def _check_dane(runtime: Runtime, settings: ServiceSettings) -> None:
    """
    C{--dane}: warn (in the background, start does not wait) when the
    nameservers are not on loopback or do not validate DNSSEC.
    """
    from mtasts_twisted.service.danecheck import check_dane_resolver

    log.info("DANE (RFC 7672) is on for relay deliveries")
    Deferred.fromCoroutine(check_dane_resolver(runtime.resolver, settings.nameservers)).addErrback(
        lambda f: log.failure("DANE: the resolver check failed", f))


def _log_report_mail(settings: ServiceSettings) -> None:
    """Say at start how reports are mailed, unless they are DKIM-signed (RFC 8460 §3)."""
    report = settings.report_settings
    if report is None or report.dkim_key_file is not None:
        return
    if settings.mail_reports:
        log.warn("TLSRPT reports are mailed without a DKIM signature (--report-unsigned): "
                 "RFC 8460 §3 says receivers MUST ignore them")
    else:
        log.warn("TLSRPT reports by mail are off: RFC 8460 §3 requires a DKIM signature; give "
                 "--report-dkim-key and --report-dkim-selector (or --report-unsigned); https reports are sent")


def queue_directory(config: ServiceSettings | Mapping[str, Any]) -> str:
    """
    The relay queue's directory: C{DATA-DIR/queue}.

    @param config: the L{ServiceSettings}, or parsed L{Options}.
    """
    data_dir = config.data_dir if isinstance(config, ServiceSettings) else config["data-dir"]
    return os.path.join(data_dir, "queue")


def makeService(options: ServiceSettings | Mapping[str, Any], reactor: IServiceReactor | None = None,
                fatal: Callable[[int], None] | None = None, *, install_signals: bool = True) -> MTASTSService:
    """
    Build the C{twistd mtasts} service from parsed L{Options}.

    @param options: parsed L{Options} (or their L{ServiceSettings}).
    @param reactor: the reactor (the global one by default).
    @param fatal: see L{MTASTSService}.
    @param install_signals: see L{MTASTSService}.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        # Typed as Twisted's common reactor interfaces only; every reactor
        # twistd installs also provides UDP, threads and name resolvers.
        reactor = cast(IServiceReactor, global_reactor)
    return MTASTSService(options, reactor, fatal, install_signals=install_signals)
