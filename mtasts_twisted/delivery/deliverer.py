"""
L{Deliverer}: one message to the MX hosts of one recipient domain per call,
enforcing the domain's MTA-STS policy; and the one-off L{deliver}.

Per delivery it looks the policy and the MX hosts up, plans the hosts
(L{mtasts_twisted.delivery.plan}), and goes through them: per host a parked
session if one may carry the mail (L{mtasts_twisted.delivery.sessions}),
else per address one new session (L{mtasts_twisted.delivery.runner}), with
the opportunistic plaintext retry; it gathers the recipients' outcomes
(those no host decided: L{mtasts_twisted.delivery.verdict}) and the TLSRPT
results (L{mtasts_twisted.delivery.accounting}).
What all that does, and why, is in the L{mtasts_twisted.delivery}
docstring.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mtasts_twisted.cache import PolicyLookupTemporaryError
from mtasts_twisted.delivery.accounting import attempt_result, record, skip_result
from mtasts_twisted.delivery.attempt import Connection
from mtasts_twisted.delivery.danehost import dane_target, requires_dane
from mtasts_twisted.delivery.dialogue import Dialogue
from mtasts_twisted.delivery.logline import AttemptTally, log_result, relay_label
from mtasts_twisted.delivery.plan import DeliveryPlan, HostAction, PlannedHost, Shuffler, plan_attempts
from mtasts_twisted.delivery.protocol import wire_address
from mtasts_twisted.delivery.requiretls import SenderControls
from mtasts_twisted.delivery.runner import SessionRunner
from mtasts_twisted.delivery.sessions import SessionCache, SessionPool
from mtasts_twisted.delivery.sources import DeliveryReactor, PolicySource, domain_of
from mtasts_twisted.delivery.verdict import every_recipient, unsent
from mtasts_twisted.delivery.values import (
    DeliveryResult,
    DeliverySettings,
    Envelope,
    RecipientOutcome,
    Status,
    scan_message,
)
from mtasts_twisted.dns import AddressAnswer, DNSError, DNSNoRecordError
from mtasts_twisted.interfaces import IDeliverer, IDNSResolver, IResultSink
from mtasts_twisted.policy import Mode
from mtasts_twisted.results import Result
from mtasts_twisted.pkix import TrustRootSpec
from mtasts_twisted.tls import MXTLSOptionsCache, load_trust_root

__all__ = ["Deliverer", "DeliveryReactor", "PolicySource", "deliver"]

log = Logger()


@implementer(IDeliverer)
class Deliverer:
    """
    Delivers messages to the MX hosts of one recipient domain per call,
    enforcing the domain's MTA-STS policy (see the L{mtasts_twisted.delivery}
    docstring).
    """

    def __init__(
        self,
        reactor: DeliveryReactor,
        resolver: IDNSResolver,
        cache: PolicySource,
        trust_root: TrustRootSpec = None,
        sink: IResultSink | None = None,
        settings: DeliverySettings = DeliverySettings(),
        *,
        rng: random.Random | None = None,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP} and C{IReactorTime}; all
            timeouts use its clock.
        @param resolver: an L{IDNSResolver}; MX hosts and their addresses
            are resolved through it only.
        @param cache: a L{mtasts_twisted.cache.PolicyCache} (anything with
            its C{get}).
        @param trust_root: the roots MX certificates must chain to: anything
            L{load_trust_root} takes (L{None}: the platform's).
        @param sink: an L{IResultSink} that records every TLSRPT result, or
            L{None}.
        @param settings: L{DeliverySettings}.
        @param rng: shuffles MX hosts of equal preference (has C{shuffle});
            the C{random} module by default.
        """
        self._reactor = reactor
        self._resolver = resolver
        self._cache = cache
        self._trust_root = load_trust_root(trust_root)
        self._tls_options = MXTLSOptionsCache(self._trust_root)
        self._sink = sink
        self.settings = settings
        self._rng: Shuffler = rng if rng is not None else random
        self._dialogue = Dialogue(reactor, settings, self._tls_options)
        #: Finished sessions: parked for reuse, or closing in the background.
        self._sessions = SessionCache(reactor, settings, self._dialogue.close)
        #: Sessions parked for reuse (None: reuse is off).
        self._pool: SessionPool[Connection] | None = self._sessions.pool
        #: Runs each session: a new connection, or a transaction on a parked one.
        self._runner = SessionRunner(reactor, settings, self._dialogue, self._sessions)
        #: DANE statuses found, by L{DANEState<mtasts_twisted.dane.DANEState>}
        #: value (with C{settings.dane}; read by the metrics).
        self.dane_lookups: collections.Counter[str] = collections.Counter()

    def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        message: BinaryIO,
        smtputf8: bool = False,
        requiretls: bool = False,
    ) -> Deferred[DeliveryResult]:
        """
        Deliver one message to recipients of one domain, in one transaction
        per session.

        @param sender: the reverse-path (C{""} for the null sender).
        @param recipients: addresses, all of the same domain; a duplicate
            is delivered (and reported) once.
        @param message: a seekable binary file holding the message (headers
            and body), from its current position; streamed, never read
            whole.  Left positioned where it started.
        @param smtputf8: the message was submitted with C{SMTPUTF8} (RFC
            6531): see L{Envelope.smtputf8}.
        @param requiretls: the message was submitted with C{REQUIRETLS}
            (RFC 8689): it goes only to authenticated MX hosts that offer
            REQUIRETLS, or fails permanently (C{5.7.30}); see
            L{mtasts_twisted.delivery.requiretls}.
        @return: a L{Deferred} firing with a L{DeliveryResult}; it fails
            only with L{ValueError} for bad arguments (no recipients,
            several domains, an address literal, a malformed address) and
            with the file's L{OSError} when the message cannot be read.
        """
        return Deferred.fromCoroutine(self._deliver(sender, list(recipients), message, smtputf8, requiretls))

    def wait_closed(self) -> Deferred[None]:
        """
        Say QUIT on every parked session, and fire when every session's
        QUIT-and-close has finished.
        """
        return self._sessions.wait_closed()

    def close(self) -> Deferred[None]:
        """
        Stop keeping sessions for reuse, then L{wait_closed}.  Deliveries
        still work afterwards (and may be in flight); each of their
        sessions is closed after its transaction.
        """
        return self._sessions.close()

    # -- one delivery --

    def _finish(
        self,
        domain: str,
        mode: Mode | None,
        recipients: list[str],
        outcomes: Mapping[str, RecipientOutcome],
        results: list[Result],
        tally: AttemptTally,
        policy_known: bool = True,
    ) -> DeliveryResult:
        record(self._sink, results)
        result = DeliveryResult(
            domain=domain,
            policy_mode=mode,
            outcomes=tuple(outcomes[r] for r in recipients),
            results=tuple(results),
        )
        # One line per recipient of this attempt, for every embedder.
        log_result(log, result, tally, self._reactor.seconds(), self.settings.port_of, policy_known)
        return result

    async def _deliver(
        self, sender: str, recipients: list[str], message: BinaryIO, smtputf8: bool = False,
        requiretls: bool = False,
    ) -> DeliveryResult:
        domain = domain_of(recipients)
        recipients = list(dict.fromkeys(recipients))
        forward_paths = {r: wire_address(r) for r in recipients}
        reverse_path = wire_address(sender)
        results: list[Result] = []
        tally = AttemptTally(self._reactor.seconds())

        try:
            lookup = await self._cache.get(domain)
        except PolicyLookupTemporaryError as e:
            results.append(e.result)
            return self._finish(
                domain,
                None,
                recipients,
                every_recipient(recipients, Status.TRANSIENT, f"4.4.3 MTA-STS policy lookup for {domain} failed: {e}"),
                results,
                tally,
                policy_known=False,
            )
        except Exception as e:
            # E.g. the store is down.  Never deliver without knowing the
            # policy (that would fail open): transient.
            log.failure("MTA-STS policy lookup for {domain} failed", domain=domain)
            return self._finish(
                domain,
                None,
                recipients,
                every_recipient(recipients, Status.TRANSIENT, f"4.3.0 MTA-STS policy lookup for {domain} failed: {e!r}"),
                results,
                tally,
                policy_known=False,
            )
        results.append(lookup.result)
        plan = DeliveryPlan(domain, lookup.policy, lookup.result.policy, getattr(lookup, "record_id", None))

        try:
            mx = await self._resolver.lookup_mx(domain)
        except DNSNoRecordError as e:
            return self._finish(
                domain,
                plan.mode,
                recipients,
                every_recipient(recipients, Status.PERMANENT, f"5.1.2 {domain} has no mail exchanger: {e}"),
                results,
                tally,
            )
        except DNSError as e:
            return self._finish(
                domain,
                plan.mode,
                recipients,
                every_recipient(recipients, Status.TRANSIENT, f"4.4.3 MX lookup for {domain} failed: {e}"),
                results,
                tally,
            )
        if mx.null:
            # RFC 7505 §4.2: a null MX; the bounce uses 556 5.1.10.
            return self._finish(
                domain,
                plan.mode,
                recipients,
                every_recipient(recipients, Status.PERMANENT, f"5.1.10 {domain} accepts no mail (null MX, RFC 7505)"),
                results,
                tally,
            )

        envelope = Envelope(reverse_path, forward_paths, message, scan_message(message), smtputf8, requiretls)
        controls = SenderControls.of(requiretls, not sender, envelope.info.tls_required_no)
        outcomes: dict[str, RecipientOutcome] = {}
        pending = list(recipients)
        errors: list[str] = []
        last_host: str | None = None
        last_code: int | None = None
        dane_failed = False
        dane_only = requires_dane(lookup)
        # RFC 5321 §5.1: by preference, equal ones shuffled; among those, a
        # host with a parked session comes first.
        targets = plan_attempts(
            plan.policy,
            mx.hosts,
            rng=self._rng,
            max_hosts=self.settings.max_mx_hosts,
            first=self._sessions.parked_first(plan),
        )
        planned_hosts = [t.host for t in targets]
        targets = controls.targets(targets, domain)
        try:
            for target in targets:
                if not pending:
                    break
                host = target.host
                last_host = host
                answer: AddressAnswer | None = None
                if self.settings.dane and mx.secure:
                    # RFC 7672 §2.2: DANE decides before MTA-STS (RFC 8461 §2).
                    answer, target = await self._dane(plan, target, errors)
                    if answer is None:
                        continue
                if dane_only and target.action is not HostAction.REQUIRE_DANE:
                    # The operator's dane-only override: DANE-authenticated
                    # hosts only, never MTA-STS or opportunistic TLS.
                    dane_failed = True
                    errors.append(f"{host}: not authenticated by DANE (dane-only override)")
                    continue
                if target.skipped:
                    # RFC 8461 §4.1: never deliver to an MX host outside an
                    # enforced policy; RFC 7672 §2.1.2: nor to one whose
                    # DANE lookups failed (the message is deferred).
                    results.append(skip_result(plan.descriptor, target))
                    if target.action is HostAction.DEFER:
                        dane_failed = True
                        detail = target.dane.detail if target.dane is not None else ""
                        errors.append(f"{host}: DANE lookup failed ({detail}), host deferred")
                    else:
                        errors.append(f"{host}: not an MX host of the MTA-STS policy")
                    continue
                if target.decided_by_dane:
                    dane_failed = True
                if answer is None:
                    try:
                        answer = await self._resolver.lookup_addresses(host)
                    except DNSError as e:
                        errors.append(f"{host}: {e}")
                        continue
                ips = answer.addresses[: self.settings.max_addresses_per_host]
                while pending:
                    # A parked session to this host, if one is exactly as
                    # good as a new one (see SessionCache.take); a dead one
                    # falls back to a new connection below, unreported.
                    conn = self._sessions.take(plan, target, ips)
                    if conn is None:
                        break
                    reused = await self._runner.reused(conn, plan, target, envelope, pending)
                    if reused is None:
                        continue
                    outcomes.update(reused.outcomes)
                    tally.decided(reused)
                    pending = [r for r in pending if r not in outcomes]
                    break
                for ip in ips:
                    if not pending:
                        break
                    attempt = await self._runner.new(plan, target, ip, envelope, pending, True)
                    controls.attempted(attempt)
                    counted = attempt_result(plan.descriptor, target, attempt)
                    if counted is not None:
                        results.append(counted)
                    if attempt.retry_plaintext and not target.require_tls:
                        errors.append(f"{host} [{ip}]: {attempt.error}")
                        # The TLS failure's one line: the recipients' lines
                        # then say tls=none.
                        log.info(
                            "{relay}: {error}; retrying without STARTTLS",
                            relay=relay_label(host, ip, self.settings.port_of(host)),
                            error=attempt.error,
                        )
                        attempt = await self._runner.new(plan, target, ip, envelope, pending, False)
                    outcomes.update(attempt.outcomes)
                    tally.decided(attempt)
                    pending = [r for r in pending if r not in outcomes]
                    if attempt.error is not None:
                        errors.append(f"{host} [{ip}]: {attempt.error}")
                        last_code = attempt.code
                    if not pending:
                        break
        finally:
            message.seek(envelope.info.start)

        if pending:
            outcomes.update(unsent(
                domain, pending, errors, refused=controls.unsent(domain, planned_hosts), dane_failed=dane_failed,
                enforce=plan.enforce, last_host=last_host, last_code=last_code,
            ))
        return self._finish(domain, plan.mode, recipients, outcomes, results, tally)

    async def _dane(
        self, plan: DeliveryPlan, target: PlannedHost, errors: list[str]
    ) -> tuple[AddressAnswer | None, PlannedHost]:
        """
        A host of a secure MX RRset: its addresses (L{None} when they cannot
        be had; the error noted), and C{target} decided again with its
        DANE status (L{dane_target}).
        """
        try:
            answer = await self._resolver.lookup_addresses(target.host)
        except DNSError as e:
            errors.append(f"{target.host}: {e}")
            return None, target
        port = self.settings.port_of(target.host)
        target = await dane_target(self._resolver, plan.policy, target, mx_secure=True, port=port, addresses=answer)
        if target.dane is not None:
            self.dane_lookups[target.dane.state.value] += 1
        return answer, target


def deliver(
    reactor: DeliveryReactor,
    resolver: IDNSResolver,
    cache: PolicySource,
    sender: str,
    recipients: Sequence[str],
    message: BinaryIO,
    **kwargs: Any,
) -> Deferred[DeliveryResult]:
    """
    Deliver one message once: L{Deliverer}C{(reactor, resolver, cache,
    **kwargs).deliver(sender, recipients, message)}.

    Make one L{Deliverer} and reuse it when delivering many messages (it
    loads the trust roots once, and can reuse sessions).  Here the session
    is always closed: nothing would close a parked one.
    """
    settings = kwargs.pop("settings", DeliverySettings())
    kwargs["settings"] = attrs.evolve(settings, reuse_idle_time=0.0)
    return Deliverer(reactor, resolver, cache, **kwargs).deliver(sender, recipients, message)
