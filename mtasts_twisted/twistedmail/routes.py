"""
The ordered attempts for one recipient domain, from the planner that
L{Deliverer<mtasts_twisted.delivery.Deliverer>} uses, and the TLSRPT
accounting of what each attempt did.

L{Router.route} looks the domain's MTA-STS policy up (the L{PolicyCache
<mtasts_twisted.cache.PolicyCache>}), its MX hosts (our resolver),
plans them with L{plan_attempts<mtasts_twisted.delivery.plan.plan_attempts>}
(the one per-host decision), and resolves each host's addresses.  The
L{Route} it gives says, per MX host in order, whether to skip it and what a
connection to it requires; L{Route.attempt} makes one connection's
L{SessionAttempt} (with its verifying-and-recording TLS creator), and
L{Route.report} / L{Route.report_skip} hand the TLSRPT result of each to the
sink, counted as L{mtasts_twisted.delivery.accounting} counts the
Deliverer's (RFC 8460 §4.4: one result per TLS session)::

    route = await router.route("example.com")
    for host in route.hosts:
        if host.skipped:                      # RFC 8461 §4.1, under enforce
            route.report_skip(host)
            continue
        for ip in host.addresses:
            attempt = route.attempt(host, ip)
            d = Deferred()
            factory = ESMTPSenderFactory(None, None, sender, [rcpt], file, d,
                retries=0, contextFactory=attempt.context_factory,
                requireAuthentication=False,
                requireTransportSecurity=attempt.require_tls)
            reactor.connectTCP(ip, attempt.port, factory)
            try:
                result = await d
            except Exception as e:
                result = e
            outcome = route.report(attempt, result)
            ...   # outcome.retry_plaintext: route.attempt(host, ip, plaintext=True)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from mtasts_twisted.cache import PolicyLookupTemporaryError
from mtasts_twisted.delivery import DeliveryPlan, DeliverySettings, HostAction, PlannedHost, PolicySource, Status
from mtasts_twisted.delivery.accounting import record, session_result, skip_result
from mtasts_twisted.delivery.plan import Shuffler, plan_attempts
from mtasts_twisted.dns import DNSError, DNSNoRecordError
from mtasts_twisted.interfaces import IDNSResolver, IResultSink
from mtasts_twisted.policy import Mode
from mtasts_twisted.results import Result
from mtasts_twisted.tls import MXTLSOptionsCache
from mtasts_twisted.twistedmail.attempts import (
    AttemptOutcome,
    SessionAttempt,
    SessionObservation,
    classify,
    requirements,
)

__all__ = ["Route", "RouteHost", "Router", "Unroutable"]

log = Logger()


@attrs.frozen
class Unroutable:
    """
    Why a domain has no host to try now.

    @ivar status: L{Status.TRANSIENT} (try later) or L{Status.PERMANENT}.
    @ivar message: the reason, starting with an RFC 3463 enhanced code.
    """

    status: Status
    message: str


@attrs.frozen
class RouteHost:
    """
    One MX host of a L{Route}, in order.

    @ivar target: the planner's L{PlannedHost} (action, verify mode, TLS
        requirement, whether the policy lists it).
    @ivar port: the TCP port to connect to.
    @ivar addresses: its addresses (IPv6 first, capped), empty when
        skipped or when they could not be looked up.
    @ivar error: why its addresses could not be looked up, or L{None}.
    """

    target: PlannedHost
    port: int
    addresses: tuple[str, ...] = ()
    error: str | None = None

    @property
    def host(self) -> str:
        """The MX host name (A-labels)."""
        return self.target.host

    @property
    def skipped(self) -> bool:
        """Never connect to it (RFC 8461 §4.1: outside an enforced policy)."""
        return self.target.action is HostAction.SKIP

    @property
    def require_tls(self) -> bool:
        """Whether mail may reach it only over TLS (see L{requirements})."""
        return requirements(self.target)[0]


class Route:
    """
    The attempts for one recipient domain (see the module docstring), and
    the TLSRPT results recorded for it so far.

    @ivar domain: the recipient domain, A-labels.
    @ivar plan: the L{DeliveryPlan} (policy, TLSRPT descriptor, TXT id), or
        L{None} when the policy could not be looked up.
    @ivar hosts: the MX hosts in the order to try them.
    @ivar unroutable: why there is no host to try, or L{None}.
    @ivar results: the TLSRPT results recorded: the policy lookup's first.
    """

    def __init__(
        self,
        domain: str,
        plan: DeliveryPlan | None,
        hosts: Sequence[RouteHost],
        results: list[Result],
        tls_options: MXTLSOptionsCache,
        sink: IResultSink | None,
        unroutable: Unroutable | None = None,
    ) -> None:
        self.domain = domain
        self.plan = plan
        self.hosts = tuple(hosts)
        self.unroutable = unroutable
        self.results = results
        self._tls_options = tls_options
        self._sink = sink

    @property
    def mode(self) -> Mode | None:
        """The policy's L{Mode}, or L{None} without one."""
        return self.plan.mode if self.plan is not None else None

    def attempt(self, host: RouteHost, ip: str, *, plaintext: bool = False,
                require_tls: bool = False) -> SessionAttempt:
        """
        One connection to address C{ip} of C{host}.

        @param plaintext: the opportunistic retry without STARTTLS (after
            an outcome with C{retry_plaintext}).
        @param require_tls: require STARTTLS even where the policy does
            not (twisted.mail's C{requireTransportSecurity}).
        @raise ValueError: C{host} is skipped, or C{plaintext} where TLS is
            required: never plaintext to a host whose policy forbids it.
        """
        if host.skipped:
            raise ValueError(f"{host.host} is outside the MTA-STS policy of {self.domain}: never connect to it")
        required, verify = requirements(host.target)
        required = required or require_tls
        if plaintext and required:
            raise ValueError(f"{host.host} of {self.domain} requires TLS: no plaintext attempt")
        creator = None if plaintext else self._tls_options.creator(host.host, verify)
        return SessionAttempt(self.domain, host.target, ip, host.port, required, verify, creator)

    def report_skip(self, host: RouteHost) -> Result:
        """Record the TLSRPT failure of a skipped host (once per delivery)."""
        assert self.plan is not None
        result = skip_result(self.plan.descriptor, host.target)
        self._record(result)
        return result

    def report(self, attempt: SessionAttempt, result: object,
               observation: SessionObservation | None = None) -> AttemptOutcome:
        """
        L{classify} what a session ended with and record its TLSRPT result,
        if it counts (RFC 8460 §4.4; L{mtasts_twisted.delivery.accounting}).

        @param result: what the sender's Deferred fired with: the
            C{(numOk, addresses)} tuple, a L{Failure
            <twisted.python.failure.Failure>} or an exception.
        @param observation: from a L{RecordingSenderFactory
            <mtasts_twisted.twistedmail.sender.RecordingSenderFactory>}.
        """
        return self.report_outcome(attempt, classify(attempt, result, observation))

    def report_outcome(self, attempt: SessionAttempt, outcome: AttemptOutcome) -> AttemptOutcome:
        """Record the TLSRPT result of an already classified session."""
        assert self.plan is not None
        if outcome.tls_decided and not attempt.plaintext:
            counted = session_result(
                self.plan.descriptor, attempt.target, attempt.ip, outcome.tls_failure, outcome.tls_negotiated
            )
            if counted is not None:
                self._record(counted)
        return outcome

    def _record(self, result: Result) -> None:
        self.results.append(result)
        record(self._sink, [result])


class Router:
    """
    Makes L{Route}s: the policy lookup, the MX lookup, the plan and the
    addresses of one recipient domain.
    """

    def __init__(
        self,
        resolver: IDNSResolver,
        policies: PolicySource,
        tls_options: MXTLSOptionsCache,
        sink: IResultSink | None = None,
        settings: DeliverySettings = DeliverySettings(),
        *,
        rng: Shuffler | None = None,
    ) -> None:
        """
        @param resolver: MX hosts and their addresses are resolved with it
            only.
        @param policies: a L{PolicyCache<mtasts_twisted.cache.PolicyCache>}
            (anything with its C{get}).
        @param tls_options: the TLS options (trust roots) of MX connections.
        @param sink: records every TLSRPT result, or L{None}.
        @param settings: C{port}, C{port_for}, C{max_mx_hosts} and
            C{max_addresses_per_host} are used.
        @param rng: shuffles MX hosts of equal preference.
        """
        self._resolver = resolver
        self._policies = policies
        self.tls_options = tls_options
        self._sink = sink
        self.settings = settings
        self._rng: Shuffler = rng if rng is not None else random

    def route(self, domain: str, port: int | None = None) -> Deferred[Route]:
        """
        The L{Route} of recipient domain C{domain} (A-labels); never fails.

        Records the policy lookup's TLSRPT result.

        @param port: the MX port for every host, overriding the settings'
            C{port} (not C{port_for}).
        """
        return Deferred.fromCoroutine(self._route(domain, port))

    def _unroutable(self, domain: str, plan: DeliveryPlan | None, results: list[Result],
                    status: Status, message: str) -> Route:
        return Route(domain, plan, (), results, self.tls_options, self._sink, Unroutable(status, message))

    async def _route(self, domain: str, port: int | None) -> Route:
        results: list[Result] = []
        try:
            lookup = await self._policies.get(domain)
        except PolicyLookupTemporaryError as e:
            results.append(e.result)
            record(self._sink, results)
            return self._unroutable(domain, None, results, Status.TRANSIENT,
                                    f"4.4.3 MTA-STS policy lookup for {domain} failed: {e}")
        except Exception as e:
            # Never deliver without knowing the policy (that fails open).
            log.failure("MTA-STS policy lookup for {domain} failed", domain=domain)
            return self._unroutable(domain, None, results, Status.TRANSIENT,
                                    f"4.3.0 MTA-STS policy lookup for {domain} failed: {e!r}")
        results.append(lookup.result)
        record(self._sink, results)
        plan = DeliveryPlan(domain, lookup.policy, lookup.result.policy, lookup.record_id)
        try:
            mx = await self._resolver.lookup_mx(domain)
        except DNSNoRecordError as e:
            return self._unroutable(domain, plan, results, Status.PERMANENT,
                                    f"5.1.2 {domain} has no mail exchanger: {e}")
        except DNSError as e:
            return self._unroutable(domain, plan, results, Status.TRANSIENT,
                                    f"4.4.3 MX lookup for {domain} failed: {e}")
        if mx.null:
            # RFC 7505 §4.2: a null MX (the reply is 556 5.1.10).
            return self._unroutable(domain, plan, results, Status.PERMANENT,
                                    f"5.1.10 {domain} accepts no mail (null MX, RFC 7505)")
        # RFC 5321 §5.1 order; RFC 8461 §4-5 per host: the one planner.
        targets = plan_attempts(plan.policy, mx.hosts, rng=self._rng, max_hosts=self.settings.max_mx_hosts)
        hosts = await gatherResults([self._host(target, port) for target in targets])
        return Route(domain, plan, hosts, results, self.tls_options, self._sink)

    def _host(self, target: PlannedHost, port: int | None) -> Deferred[RouteHost]:
        host_port = self.settings.port_for.get(target.host, port if port is not None else self.settings.port)
        if target.action is HostAction.SKIP:
            return succeed(RouteHost(target, host_port))
        return Deferred.fromCoroutine(self._addresses(target, host_port))

    async def _addresses(self, target: PlannedHost, port: int) -> RouteHost:
        try:
            answer = await self._resolver.lookup_addresses(target.host)
        except DNSError as e:
            return RouteHost(target, port, (), f"{target.host}: {e}")
        return RouteHost(target, port, tuple(answer.addresses[: self.settings.max_addresses_per_host]))
