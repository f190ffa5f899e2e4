"""
The C{twistd mtasts} service: L{Options} and L{makeService}.

C{twisted/plugins/mtasts_plugin.py} only names this module; everything the
service does is built here from the tested components:

  - listeners (bound in C{privilegedStartService}, so C{twistd -u/-g}
    drops privileges after binding): the Postfix socketmap policy server
    (C{--socketmap}), the relay's SMTP intake (C{--smtp}, when the relay
    module is installed) and the Prometheus metrics page (C{--metrics});
  - once the store is open (asynchronously, right after start): the
    L{PolicyCache} with its L{PolicyRefresher}, the TLSRPT
    L{ResultAggregator} and L{ReportScheduler}, and the relay workers.

A failure at start (a port in use, a database that cannot be opened) is
logged as one line and the process exits with status 1; bad options are
a C{UsageError} from L{Options.postOptions}, which twistd prints with
exit status 1.

Reports need C{--report-org} and C{--report-from}.  Without them (and
without C{--no-reports}) the service runs without TLSRPT: results are not
collected, nothing is sent, and a warning says so at start.
"""

from __future__ import annotations

import atexit
import io
import os
import socket
import sys
import tomllib
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.server import Site

from mtasts_twisted.cache import POLICY_TABLE, CacheSettings, Lookup, PolicyCache, PolicyRefresher
from mtasts_twisted.metrics import (
    MeteredDeliverer,
    MeteredFetcher,
    MeteredSink,
    MetricsResource,
    ServiceStats,
    count_report_outcomes,
    make_registry,
)
from mtasts_twisted.policy import MTASTSError
from mtasts_twisted.results import PolicyDescriptor, PolicyType, Result
from mtasts_twisted.tlsrpt import ReportScheduler

__all__ = [
    "DEFAULTS",
    "MTASTSService",
    "MeteredReportScheduler",
    "NoPolicyCache",
    "Options",
    "ReportMailError",
    "ReportMailer",
    "Runtime",
    "StartupError",
    "makeService",
    "open_runtime",
    "queue_directory",
]

log = Logger()

#: The defaults of the parameters (C{None}: off or computed).
DEFAULTS: dict[str, Any] = {
    "data-dir": "./mtasts-data",
    "database": None,  # sqlite:<data-dir>/mtasts.sqlite
    "smtp": "tcp:2525:interface=127.0.0.1",
    "socketmap": "tcp:8461:interface=127.0.0.1",
    "metrics": "none",
    "ca-file": None,
    "report-org": None,
    "report-from": None,
    "report-contact": None,
    "report-submitter": None,
    "report-dkim-key": None,
    "report-dkim-selector": None,
    "helo-name": None,  # socket.getfqdn()
    "delivery-port": "25",
    "session-reuse": "2",
}

#: The longest --session-reuse: RFC 5321 §4.5.3.2.7 lets a server drop an
#: idle client after 5 minutes.
MAX_SESSION_REUSE = 300.0

_FLAGS = ("no-reports", "strict-testing", "tlsrpt-attributes", "fail-open")
_LISTENERS = ("smtp", "socketmap", "metrics")
_OFF = ("", "none", "off")
_DATABASE_SCHEMES = ("sqlite:", "postgresql://", "postgres://", "memory:")


class _NoReactor:
    """Stands in for the reactor when only checking an endpoint's syntax."""


def _check_endpoint(name: str, description: str) -> None:
    try:
        serverFromString(_NoReactor(), description)
    except Exception as e:
        raise usage.UsageError(f"--{name} {description!r}: not a valid endpoint ({e})") from None


def _check_writable_dir(path: str) -> None:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise usage.UsageError(f"--data-dir {path}: not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise usage.UsageError(f"--data-dir {path}: not writable by uid {os.geteuid()}")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise usage.UsageError(f"--data-dir {path}: cannot be created ({parent} is not writable)")


def _port_number(text: str, what: str) -> int:
    try:
        port = int(text.strip())
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise usage.UsageError(f"--delivery-port {what!r}: not a TCP port (1 to 65535)")
    return port


def _session_reuse(value: str) -> float:
    """Parse C{--session-reuse}: seconds from 0 to L{MAX_SESSION_REUSE}."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_SESSION_REUSE:  # also rejects nan
        raise usage.UsageError(f"--session-reuse {value!r}: expected seconds from 0 to {MAX_SESSION_REUSE:g}")
    return seconds


def _delivery_ports(values: list[str]) -> tuple[int, dict[str, int]]:
    """
    Parse the C{--delivery-port} values: C{PORT} (the last one wins) and
    C{HOST=PORT}; return C{(port, port_for)} for L{DeliverySettings}.
    """
    port = 25
    port_for: dict[str, int] = {}
    for value in values:
        host, sep, number = value.rpartition("=")
        if sep:
            host = host.strip().rstrip(".").lower()
            if not host:
                raise usage.UsageError(f"--delivery-port {value!r}: expected PORT or HOST=PORT")
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise usage.UsageError(f"--delivery-port {value!r}: not a host name") from None
            port_for[host] = _port_number(number, value)
        else:
            port = _port_number(number, value)
    return port, port_for


class Options(usage.Options):
    """
    The options of C{twistd mtasts}.  C{--config FILE} reads the same
    settings from TOML (keys are the long option names); options given on
    the command line win.

    After parsing, C{self["report_settings"]} is a L{ReportSettings} or
    L{None} (reports off), C{self["database"]} the database URL and the
    listener options are L{None} when off.
    """

    synopsis = "[options]"
    longdesc = (
        "MTA-STS (RFC 8461) and TLSRPT (RFC 8460): a Postfix socketmap policy server, "
        "a local relay, daily TLSRPT reports and Prometheus metrics. Every listener "
        "binds 127.0.0.1 unless told otherwise; 'none' turns a listener off."
    )
    optParameters = [
        ["config", "c", None, "TOML file with any of these settings (options given here win)"],
        ["data-dir", "d", None, f"state directory [default: {DEFAULTS['data-dir']}]"],
        ["database", None, None, "database URL: sqlite:PATH or postgresql://... "
                                 "[default: sqlite:DATA-DIR/mtasts.sqlite]"],
        ["smtp", None, None, f"relay SMTP intake endpoint [default: {DEFAULTS['smtp']}]"],
        ["socketmap", None, None, f"Postfix socketmap endpoint [default: {DEFAULTS['socketmap']}]"],
        ["metrics", None, None, "Prometheus metrics endpoint, e.g. tcp:9461:interface=127.0.0.1 "
                                "[default: none]"],
        ["ca-file", None, None, "PEM CA certificates to trust instead of the system's"],
        ["report-org", None, None, "TLSRPT organization-name"],
        ["report-from", None, None, "From address of mailed TLSRPT reports"],
        ["report-contact", None, None, "TLSRPT contact-info [default: --report-from]"],
        ["report-submitter", None, None, "TLSRPT submitter domain [default: --report-from's domain]"],
        ["report-dkim-key", None, None, "PEM private key to DKIM-sign mailed reports"],
        ["report-dkim-selector", None, None, "DKIM selector of --report-dkim-key"],
        ["helo-name", None, None, "name sent in EHLO [default: this host's FQDN]"],
        ["session-reuse", None, None, "seconds an outbound SMTP session stays open for the next message "
         f"to the same domain and MX, 0 for never [default: {DEFAULTS['session-reuse']}]"],
    ]
    optFlags = [
        ["no-reports", None, "send no TLSRPT reports (and collect no results)"],
        ["strict-testing", None, "socketmap: answer testing policies like enforce"],
        ["tlsrpt-attributes", None, "socketmap: add Postfix >= 3.10 TLSRPT attributes"],
        ["fail-open", None, "socketmap: answer NOTFOUND instead of TEMP when no policy can be found"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["nameserver"] = []
        self["delivery-port"] = []

    def opt_delivery_port(self, value: str) -> None:
        """TCP port of MX hosts [default: 25], for tests and lab setups; HOST=PORT (repeatable) sets one MX host's port"""
        self["delivery-port"].append(value)

    def opt_nameserver(self, value: str) -> None:
        """DNS server IP[:PORT] for every lookup (repeatable) [default: /etc/resolv.conf]"""
        self["nameserver"].append(value)

    def _read_config(self, path: str) -> dict[str, Any]:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise usage.UsageError(f"--config {path}: cannot read it: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise usage.UsageError(f"--config {path}: not valid TOML: {e}") from None
        known = set(DEFAULTS) | set(_FLAGS) | {"nameserver"}
        settings = {}
        for key, value in data.items():
            name = key.replace("_", "-")
            if name not in known:
                raise usage.UsageError(f"--config {path}: unknown setting {key!r}")
            if name in _FLAGS:
                if not isinstance(value, bool):
                    raise usage.UsageError(f"--config {path}: {key} must be true or false")
            elif name == "nameserver":
                value = [value] if isinstance(value, str) else value
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise usage.UsageError(f"--config {path}: nameserver must be a string or a list of strings")
            elif name == "delivery-port":
                value = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
                if not isinstance(value, list) or not all(
                        isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
                    raise usage.UsageError(f"--config {path}: delivery-port must be a port, HOST=PORT or a list")
                value = [str(v) for v in value]
            elif name == "session-reuse":
                if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    raise usage.UsageError(f"--config {path}: session-reuse must be a number of seconds")
                value = str(value)
            elif not isinstance(value, str):
                raise usage.UsageError(f"--config {path}: {key} must be a string")
            settings[name] = value
        return settings

    def postOptions(self) -> None:
        """Merge the config file and the defaults; check everything."""
        config = self._read_config(self["config"]) if self["config"] else {}
        for name, default in DEFAULTS.items():
            if name == "delivery-port":
                continue
            if self[name] is None:
                self[name] = config.get(name, default)
        for name in _FLAGS:
            self[name] = bool(self[name] or config.get(name, False))
        if not self["nameserver"]:
            self["nameserver"] = list(config.get("nameserver", []))
        if not self["delivery-port"]:
            self["delivery-port"] = list(config.get("delivery-port", [DEFAULTS["delivery-port"]]))
        self["delivery_ports"] = _delivery_ports(self["delivery-port"])

        _check_writable_dir(self["data-dir"])
        if self["database"] is None:
            from mtasts_twisted.store import default_database_url

            self["database"] = default_database_url(self["data-dir"])
        elif not self["database"].startswith(_DATABASE_SCHEMES):
            raise usage.UsageError(
                f"--database {self['database']!r}: expected sqlite:PATH or postgresql://USER@HOST/DB")
        for name in _LISTENERS:
            if self[name].strip().lower() in _OFF:
                self[name] = None
            else:
                _check_endpoint(name, self[name])

        from mtasts_twisted.dns import parse_nameserver

        for server in self["nameserver"]:
            try:
                parse_nameserver(server)
            except ValueError as e:
                raise usage.UsageError(f"--nameserver: {e}") from None
        if self["ca-file"] is not None:
            from mtasts_twisted.fetch import load_trust_roots

            try:
                load_trust_roots(self["ca-file"])
            except OSError as e:
                raise usage.UsageError(f"--ca-file {self['ca-file']}: cannot read it: {e.strerror}") from None
            except ValueError as e:
                raise usage.UsageError(f"--ca-file {self['ca-file']}: {e}") from None
        if not self["helo-name"]:
            self["helo-name"] = socket.getfqdn()
        self["session_reuse"] = _session_reuse(self["session-reuse"])
        self["report_settings"] = self._report_settings()

    def _report_settings(self) -> Any:
        if self["no-reports"]:
            return None
        org, sender = self["report-org"], self["report-from"]
        if not org and not sender:
            return None
        if not org or not sender:
            raise usage.UsageError("--report-org and --report-from go together (or give --no-reports)")
        from mtasts_twisted.tlsrpt import ReportSettings

        submitter = self["report-submitter"] or sender.rpartition("@")[2]
        try:
            return ReportSettings(
                organization=org,
                submitter_domain=submitter,
                contact=self["report-contact"] or sender,
                from_address=sender,
                dkim_key_file=self["report-dkim-key"],
                dkim_selector=self["report-dkim-selector"],
            )
        except (ValueError, MTASTSError) as e:
            raise usage.UsageError(f"report settings: {e}") from None


# --- report mail --------------------------------------------------------------


class NoPolicyCache:
    """
    A policy cache stand-in that answers "no policy" for every domain.

    Report mail goes through a L{Deliverer} built with this instead of the
    real cache: RFC 8460 §5.3 says a report must be delivered even when
    MTA-STS (or DANE) would refuse the recipient's MX, so report delivery is
    opportunistic STARTTLS, never enforced.
    """

    def get(self, domain: str) -> Deferred[Lookup]:
        """The L{Lookup} of "no policy" for C{domain}."""
        return succeed(Lookup(None, Result(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, domain)), True))


class ReportMailError(MTASTSError):
    """A mailed report was not accepted by the recipient's MX."""

    reason = "mail-failed"


class ReportMailer:
    """
    The C{send_mail} of L{ReportScheduler}: delivers one report message
    directly to the recipient domain's MX with opportunistic TLS, recording
    no TLSRPT results (RFC 8460 §3).
    """

    def __init__(self, deliverer: Any) -> None:
        """
        @param deliverer: a L{Deliverer} built with L{NoPolicyCache} and
            L{NULL_SINK<mtasts_twisted.tlsrpt.NULL_SINK>}.
        """
        self._deliverer = deliverer

    def __call__(self, sender: str, recipient: str, message: bytes) -> Deferred[Any]:
        """Deliver C{message}; fail with L{ReportMailError} unless accepted."""
        return Deferred.fromCoroutine(self._send(sender, recipient, message))

    async def _send(self, sender: str, recipient: str, message: bytes) -> Any:
        from mtasts_twisted.delivery import Status

        result = await self._deliverer.deliver(sender, [recipient], io.BytesIO(message))
        outcome = result.outcome(recipient)
        if outcome.status is not Status.DELIVERED:
            raise ReportMailError(f"{recipient}: {outcome.status.value}: {outcome.code or ''} {outcome.message}")
        return outcome


# --- the runtime: everything that needs the open store ---------------------


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
    """

    store: Any
    resolver: Any
    cache: Any
    sink: Any
    aggregator: Any = None
    scheduler: Any = None
    deliverer: Any = None

    async def close(self) -> None:
        """Write what the cache batched and close the store."""
        try:
            await self.cache.stop()
        finally:
            await self.store.close()


def _tables(config: Any) -> tuple[str, ...]:
    from mtasts_twisted.tlsrpt import TABLES

    return (POLICY_TABLE, *TABLES)


async def open_runtime(config: Any, reactor: Any, stats: ServiceStats | None = None) -> Runtime:
    """
    Open the store and build the components from parsed L{Options}.

    @param config: parsed L{Options} (or a dict with the same keys).
    @param reactor: the reactor.
    @param stats: where the metered wrappers count; a new one by default.
    @raise StartupError: with one line saying what is wrong.
    """
    from mtasts_twisted.dns import DNSHostnameResolver, DNSResolver
    from mtasts_twisted.fetch import PolicyFetcher
    from mtasts_twisted.store import StoreError, open_store
    from mtasts_twisted.tlsrpt import NULL_SINK, HTTPSReportSender, ResultAggregator

    stats = stats if stats is not None else ServiceStats()
    try:
        # Half as many answers as the cache's front has policies: the hot
        # paths do not need the DNS cache (the policy cache keeps confirmed
        # TXT answers and the socketmap its rendered MX answers until their
        # TTLs end); it serves the policy hosts' addresses while fetching and
        # the MX answers of deliveries.  Each cached answer costs ~0.7 KB
        # (bench/RESULTS.md: RSS with 100k policies).
        resolver = DNSResolver(reactor, config["nameserver"] or None, cache_size=CacheSettings().front_size // 2)
    except (OSError, ValueError) as e:
        raise StartupError(f"no usable nameserver (give --nameserver): {e}") from None
    name_resolver = DNSHostnameResolver(resolver)
    fetcher = MeteredFetcher(
        PolicyFetcher(reactor, trust_roots=config["ca-file"], resolver=resolver, name_resolver=name_resolver), stats)
    try:
        store = await open_store(config["database"], reactor, tables=_tables(config))
    except (StoreError, OSError, ValueError) as e:
        raise StartupError(f"cannot open the database: {e}") from None
    cache = PolicyCache(store, resolver, fetcher, reactor)
    stats.cache = cache
    settings = config["report_settings"]
    aggregator = scheduler = None
    if settings is not None:
        aggregator = ResultAggregator(store, reactor)
    sink = MeteredSink(aggregator, stats)
    from mtasts_twisted.delivery import Deliverer, DeliverySettings

    port, port_for = config.get("delivery_ports") or (25, {})
    delivery_settings = DeliverySettings(helo_name=config["helo-name"], port=port, port_for=port_for)
    # The relay keeps sessions for reuse (--session-reuse, 2 s by default
    # like Postfix's smtp_connection_cache_time_limit); RelayService.stopService
    # closes them.
    reuse = config.get("session_reuse", float(DEFAULTS["session-reuse"]))
    deliverer = MeteredDeliverer(
        Deliverer(reactor, resolver, cache, trust_root=config["ca-file"], sink=sink,
                  settings=attrs.evolve(delivery_settings, reuse_idle_time=reuse)), stats)
    # RFC 8460 §5.3: reports are delivered despite MTA-STS failures, and
    # their own sessions are not reported (§3): no policy, NULL_SINK.  One
    # report per domain and day: nothing to reuse, nothing parked to close.
    mailer = ReportMailer(Deliverer(reactor, resolver, NoPolicyCache(), trust_root=config["ca-file"],
                                    sink=NULL_SINK, settings=delivery_settings))
    if settings is not None:
        try:
            scheduler = MeteredReportScheduler(
                stats, store, settings, resolver, reactor,
                https_sender=HTTPSReportSender(reactor, trust_roots=config["ca-file"],
                                               name_resolver=name_resolver),
                send_mail=mailer,
            )
        except (OSError, ValueError) as e:
            await store.close()
            raise StartupError(f"cannot set up TLSRPT reports: {e}") from None
    return Runtime(store, resolver, cache, sink, aggregator, scheduler, deliverer)


class MeteredReportScheduler(ReportScheduler):
    """A L{ReportScheduler} that counts its outcomes for the metrics."""

    def __init__(self, stats: ServiceStats, *args: Any, **kwargs: Any) -> None:
        """
        @param stats: where to count; the other arguments are
            L{ReportScheduler}'s.
        """
        super().__init__(*args, **kwargs)
        self._count = count_report_outcomes(stats)

    def run_once(self, force: bool = False) -> Deferred[Any]:
        """See L{ReportScheduler.run_once}; the outcomes are counted."""
        return super().run_once(force).addCallback(self._count)


# --- listeners ---------------------------------------------------------------


class _LateFactory(Factory):
    """
    Listens from the start (so binding happens while privileged) and hands
    connections to the real factory once the service is ready; until then
    connections are closed (Postfix treats that as a temporary failure).
    """

    noisy = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.factory: Any = None

    def logPrefix(self) -> str:
        """Name the listener in the port's log lines."""
        return f"mtasts {self.name}"

    def set(self, factory: Any) -> None:
        """Start serving with C{factory}."""
        factory.doStart()
        self.factory = factory

    def buildProtocol(self, addr: Any) -> Any:
        """The real factory's protocol, or L{None} (close) before it is set."""
        if self.factory is None:
            return None
        return self.factory.buildProtocol(addr)

    def stopFactory(self) -> None:
        """Stop the real factory too."""
        if self.factory is not None:
            self.factory.doStop()


class ListenerService(Service):
    """
    Listens on one endpoint; like C{StreamServerEndpointService}, but a
    failure to listen is reported through L{listening} rather than logged
    with a traceback, so the parent can say it in one line.

    @ivar name: the option name (C{socketmap}, C{smtp}, C{metrics}).
    @ivar description: the endpoint description.
    @ivar port: the C{IListeningPort} once listening.
    """

    def __init__(self, name: str, description: str, endpoint: Any, factory: Any) -> None:
        """
        @param name: the option name, for messages.
        @param description: the endpoint string, for messages.
        @param endpoint: an C{IStreamServerEndpoint}.
        @param factory: the protocol factory.
        """
        self.setName(name)
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: Any = None
        self._listening: Deferred[Any] | None = None
        self._outcome: Any = None

    def privilegedStartService(self) -> None:
        """Listen now (before twistd drops privileges)."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        """Listen, unless L{privilegedStartService} already did."""
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        self._listening = self.endpoint.listen(self.factory)

        def done(result: Any) -> None:
            self._outcome = result
            if not isinstance(result, Failure):
                self.port = result

        self._listening.addBoth(done)

    def listening(self) -> Deferred[Any]:
        """
        @return: L{Deferred} firing with the listening port, or failing with
            L{StartupError} naming the endpoint and the reason.
        """
        return Deferred.fromCoroutine(self._wait())

    async def _wait(self) -> Any:
        if self._outcome is None and self._listening is not None:
            waiter: Deferred[None] = Deferred()
            self._listening.addBoth(lambda result: (waiter.callback(None), result)[1])
            await waiter
        if isinstance(self._outcome, Failure):
            error = self._outcome.value
            reason = getattr(error, "socketError", None) or error
            raise StartupError(f"cannot listen on --{self.name} {self.description}: {reason}")
        return self._outcome

    def stopService(self) -> Deferred[None] | None:
        """Stop listening."""
        super().stopService()
        port, self.port = self.port, None
        self._listening = None
        self._outcome = None
        if port is not None:
            return port.stopListening()
        return None


def _address(port: Any) -> str:
    host = port.getHost()
    return f"{getattr(host, 'host', host)}:{getattr(host, 'port', '')}"


def _exit_later(reactor: Any, code: int) -> None:
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


def _stop(reactor: Any) -> None:
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


class MTASTSService(MultiService):
    """
    The C{twistd mtasts} service (see the module docstring).

    @ivar config: the parsed L{Options}.
    @ivar stats: the L{ServiceStats} behind the metrics.
    @ivar registry: the service's own Prometheus C{CollectorRegistry}.
    @ivar listeners: the L{ListenerService}s by option name.
    @ivar runtime: the L{Runtime} once started, else L{None}.
    @ivar relay: the L{RelayService} (delivery workers) once started with
        C{--smtp}, else L{None}.
    @ivar ready: after C{startService}, a L{Deferred} firing with C{True}
        once everything runs, or C{False} after a startup failure (logged).
    """

    def __init__(self, config: Any, reactor: Any, fatal: Callable[[int], None] | None = None) -> None:
        """
        @param config: parsed L{Options}.
        @param reactor: the reactor.
        @param fatal: called with an exit code after a startup failure was
            logged; by default stops the reactor and exits with that code.
        """
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._fatal = fatal if fatal is not None else (lambda code: _exit_later(reactor, code))
        self.stats = ServiceStats()
        self.registry = make_registry(self.stats)
        self.listeners: dict[str, ListenerService] = {}
        self.runtime: Runtime | None = None
        self.ready: Deferred[bool] | None = None
        self.relay: Any = None
        self._late: dict[str, _LateFactory] = {}
        for name in _LISTENERS:
            description = config[name]
            if description is None:
                continue
            if name == "metrics":
                factory: Any = Site(MetricsResource(self.registry))
                factory.noisy = False
                factory.displayTracebacks = False
            else:
                factory = self._late[name] = _LateFactory(name)
            listener = ListenerService(name, description, serverFromString(reactor, description), factory)
            listener.setServiceParent(self)
            self.listeners[name] = listener

    def startService(self) -> None:
        """Start the listeners, then open the store and start the rest."""
        super().startService()
        self.ready = Deferred.fromCoroutine(self._start())

    async def _start(self) -> bool:
        try:
            for listener in list(self.listeners.values()):
                await listener.listening()
            if self.config["report_settings"] is None and not self.config["no-reports"]:
                log.warn("TLSRPT reports are off: give --report-org and --report-from (or --no-reports)")
            runtime = self.runtime = await open_runtime(self.config, self._reactor, self.stats)
            if not self.running:
                await runtime.close()
                return False
            self._wire(runtime)
        except (StartupError, OSError) as e:
            log.critical("mtasts: {error}", error=str(e))
            self._fatal(1)
            return False
        except Exception:
            log.failure("mtasts: cannot start")
            self._fatal(1)
            return False
        log.info("mtasts started: {listening}", listening=", ".join(
            f"{name} on {_address(listener.port)}" for name, listener in self.listeners.items()) or "no listeners")
        return True

    def _wire(self, runtime: Runtime) -> None:
        config = self.config
        runtime.cache.start()
        PolicyRefresher(runtime.cache, self._reactor).setServiceParent(self)
        if runtime.aggregator is not None:
            runtime.aggregator.setServiceParent(self)
        if runtime.scheduler is not None:
            runtime.scheduler.setServiceParent(self)
        if "socketmap" in self._late:
            from mtasts_twisted.socketmap import SocketmapFactory, SocketmapSettings

            factory = SocketmapFactory(
                runtime.cache, runtime.resolver, self._reactor,
                settings=SocketmapSettings(strict_testing=config["strict-testing"],
                                           tlsrpt_attributes=config["tlsrpt-attributes"],
                                           fail_open=config["fail-open"]),
                sink=runtime.sink,
            )
            self.stats.socketmap = factory
            self._late["socketmap"].set(factory)
        if "smtp" in self._late:
            self._wire_relay(runtime)

    def _wire_relay(self, runtime: Runtime) -> None:
        from mtasts_twisted.relay import RelayService, RelaySettings, RelaySMTPFactory

        settings = RelaySettings(reporting_mta=self.config["helo-name"])
        queue = settings.make_queue(queue_directory(self.config), self._reactor)
        workers = self.relay = RelayService(queue, runtime.deliverer, settings, self._reactor)
        self.stats.queue_stats = lambda: (workers.stats["queue_messages"], workers.stats["oldest_age"])
        workers.setServiceParent(self)
        self._late["smtp"].set(RelaySMTPFactory(queue, settings, self._reactor, on_message=workers.wake))

    def stopService(self) -> Deferred[None]:
        """Stop everything; then flush the cache and close the store."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.ready is not None and not self.ready.called:
            await self.ready
        await super().stopService()
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            await runtime.close()


def queue_directory(config: Any) -> str:
    """The relay queue's directory: C{DATA-DIR/queue}."""
    return os.path.join(config["data-dir"], "queue")


def makeService(options: Any, reactor: Any = None, fatal: Callable[[int], None] | None = None) -> MTASTSService:
    """
    Build the C{twistd mtasts} service from parsed L{Options}.

    @param options: parsed L{Options}.
    @param reactor: the reactor (the global one by default).
    @param fatal: see L{MTASTSService}.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return MTASTSService(options, reactor, fatal)
