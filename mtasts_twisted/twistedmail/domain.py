"""
One message to the recipients of one domain through twisted.mail's sender,
over the L{Route}'s attempts: L{DomainSender}.

Per MX host in the planner's order: a host skipped under C{enforce} is
reported and never contacted (RFC 8461 §4.1); per address one session of
L{send_attempt} (twisted.mail's C{ESMTPSenderFactory}, C{retries=0}), its
TLSRPT result recorded by L{Route.report_outcome}; after a refused STARTTLS
or a failed handshake, where the plan allows it (never under C{enforce}),
once more on a new connection without STARTTLS (not reported again).

What decides a recipient (as L{Deliverer<mtasts_twisted.delivery.Deliverer>}):

  - twisted.mail's result or C{SMTPDeliveryError}: the RCPT reply per
    recipient (2xx → the end-of-data reply decides, 4xx transient, 5xx
    permanent); a 5xx to MAIL is permanent for all, a 4xx moves on;
  - a connection lost after the end of data was sent: transient, not tried
    elsewhere (the message may have been delivered, RFC 1047);
  - anything else (connection refused, timeout, a 4xx/5xx greeting or
    EHLO, STARTTLS missing or refused where required, a certificate that
    does not verify) moves on to the next address and host.  When none is
    left the recipients are transient; under C{enforce} never permanent
    before a fresh policy check (RFC 8461 §5.1), and nothing of the
    message ever left in plaintext or over unverified TLS (the creator
    aborts the handshake before twisted.mail sends a command over it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any, cast

from twisted.logger import Logger
from twisted.mail.smtp import SMTPDeliveryError

from mtasts_twisted.delivery import DeliveryResult, DeliverySettings, RecipientOutcome, Status
from mtasts_twisted.delivery.verdict import MAX_ERRORS_SHOWN, unsent
from mtasts_twisted.results import Result
from mtasts_twisted.twistedmail.attempts import AttemptOutcome, SessionAttempt, describe_error
from mtasts_twisted.twistedmail.routes import Route, Router
from mtasts_twisted.twistedmail.sender import SenderReactor, send_attempt

__all__ = ["MAX_ERRORS_SHOWN", "DomainSender"]

log = Logger()



def _status(code: int) -> Status:
    if 200 <= code < 300:
        return Status.DELIVERED
    return Status.PERMANENT if 500 <= code < 600 else Status.TRANSIENT


def _text(resp: object) -> str:
    text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)
    return " / ".join(line for line in text.splitlines() if line)


class DomainSender:
    """
    Delivers one message to recipients of one domain with twisted.mail's
    sender, over the L{Route} a L{Router} makes (see the module docstring).
    """

    def __init__(self, reactor: SenderReactor, router: Router, settings: DeliverySettings) -> None:
        """
        @param reactor: connects and times every session.
        @param router: makes the route of each domain.
        @param settings: timeouts and the EHLO name.
        """
        self._reactor = reactor
        self.router = router
        self.settings = settings

    async def deliver(
        self,
        domain: str,
        reverse_path: bytes,
        forward_paths: Mapping[str, bytes],
        message: IO[bytes],
        *,
        port: int | None = None,
        helo: bytes | None = None,
        require_tls: bool = False,
    ) -> DeliveryResult:
        """
        Deliver C{message} to the recipients of C{domain}; never fails.

        @param domain: the recipient domain, A-labels.
        @param reverse_path: the sender as sent (C{b""}: the null sender).
        @param forward_paths: each recipient (as given) and its address as
            sent (ASCII).
        @param message: seekable; every session sends it from its current
            position, where it is left.
        @param port: the MX port (L{DeliverySettings.port_for} wins).
        @param helo: the EHLO name (L{DeliverySettings.helo_name} by default).
        @param require_tls: STARTTLS required even without a policy asking
            for it (twisted.mail's C{requireTransportSecurity}).
        """
        recipients = list(forward_paths)
        route = await self.router.route(domain, port)
        if route.unroutable is not None:
            why = route.unroutable
            return self._result(route, {r: RecipientOutcome(r, why.status, None, why.message, None, None, False)
                                        for r in recipients}, recipients)
        start = message.tell()
        outcomes: dict[str, RecipientOutcome] = {}
        pending = list(recipients)
        errors: list[str] = []
        last_host: str | None = None
        last_code: int | None = None
        try:
            for host in route.hosts:
                if not pending:
                    break
                last_host = host.host
                if host.skipped:
                    # RFC 8461 §4.1: never deliver to an MX host outside an
                    # enforced policy.
                    route.report_skip(host)
                    errors.append(f"{host.host}: not an MX host of the MTA-STS policy")
                    continue
                if host.error is not None:
                    errors.append(host.error)
                    continue
                for ip in host.addresses:
                    if not pending:
                        break
                    attempt = route.attempt(host, ip, require_tls=require_tls)
                    outcome = await self._send(attempt, reverse_path, forward_paths, pending, message, start, helo)
                    route.report_outcome(attempt, outcome)
                    if outcome.retry_plaintext:
                        errors.append(f"{host.host} [{ip}]: {describe_error(outcome.error)}")
                        log.info("retrying {host} [{ip}] without STARTTLS", host=host.host, ip=ip)
                        attempt = route.attempt(host, ip, plaintext=True)
                        outcome = await self._send(attempt, reverse_path, forward_paths, pending, message, start,
                                                   helo)
                    decided, error, code = self._decide(attempt, outcome, forward_paths, pending)
                    outcomes.update(decided)
                    pending = [r for r in pending if r not in outcomes]
                    if error is not None:
                        errors.append(f"{host.host} [{ip}]: {error}")
                        last_code = code if code is not None else last_code
        finally:
            message.seek(start)
        if pending:
            # The Deliverer's own words (RFC 8461 §5.1: under enforce never
            # permanent before a fresh policy check); no DANE or REQUIRETLS
            # here (module docstring).
            outcomes.update(unsent(
                domain, pending, errors, refused=None, dane_failed=False,
                enforce=route.plan is not None and route.plan.enforce, last_host=last_host, last_code=last_code,
            ))
        return self._result(route, outcomes, recipients)

    async def _send(
        self,
        attempt: SessionAttempt,
        reverse_path: bytes,
        forward_paths: Mapping[str, bytes],
        pending: list[str],
        message: IO[bytes],
        start: int,
        helo: bytes | None,
    ) -> AttemptOutcome:
        message.seek(start)
        return await send_attempt(
            self._reactor, attempt, reverse_path, [forward_paths[r] for r in pending], message, self.settings, helo)

    @staticmethod
    def _decide(
        attempt: SessionAttempt,
        outcome: AttemptOutcome,
        forward_paths: Mapping[str, bytes],
        pending: list[str],
    ) -> tuple[dict[str, RecipientOutcome], str | None, int | None]:
        """The recipients a session decided, and why it failed otherwise."""
        by_path = {forward_paths[r]: r for r in pending}
        decided: dict[str, RecipientOutcome] = {}

        def decide(recipient: str | None, status: Status, code: int | None, text: str) -> None:
            if recipient is not None and recipient not in decided:
                decided[recipient] = RecipientOutcome(
                    recipient, status, code, text, attempt.host, outcome.tls_version, outcome.verified)

        error = outcome.error
        if outcome.value is not None:
            _, replies = outcome.value
            for address, code, resp in replies:
                # Accepted at RCPT and at the end of data: delivered.
                decide(by_path.get(address), _status(code), code, _text(resp))
            return decided, None, None
        if isinstance(error, SMTPDeliveryError):
            refused: list[tuple[bytes, int, bytes]] = list(cast(Any, error.addresses) or ())
            if not refused:
                # MAIL refused: permanent for all on 5xx; 4xx moves on.
                if 500 <= error.code < 600:
                    for recipient in pending:
                        decide(recipient, Status.PERMANENT, error.code, _text(error.resp))
                    return decided, None, None
                return decided, describe_error(error), error.code if error.code > 0 else None
            for address, code, resp in refused:
                if 200 <= code < 300:
                    # Accepted at RCPT; DATA or the end of data refused.
                    decide(by_path.get(address), _status(error.code) if error.code > 0 else Status.TRANSIENT,
                           error.code if error.code > 0 else None, _text(error.resp))
                else:
                    decide(by_path.get(address), _status(code), code, _text(resp))
            return decided, None, None
        if outcome.dot_sent:
            # RFC 1047: the server may have the message; do not send it
            # elsewhere now.
            for recipient in pending:
                decide(recipient, Status.TRANSIENT, None,
                       f"4.4.2 {attempt.host} [{attempt.ip}]: the session ended after the end of data "
                       f"without a reply: {describe_error(error)}")
            return decided, None, None
        last = getattr(error, "code", None)
        return decided, describe_error(error), last if isinstance(last, int) and last > 0 else None

    @staticmethod
    def _result(route: Route, outcomes: Mapping[str, RecipientOutcome], recipients: list[str]) -> DeliveryResult:
        results: tuple[Result, ...] = tuple(route.results)
        for outcome in (outcomes[r] for r in recipients):
            if outcome.status is not Status.DELIVERED:
                log.info(
                    "{recipient}: {status} via {mx_host} ({tls}): {code} {message}",
                    recipient=outcome.recipient,
                    status=outcome.status.value,
                    mx_host=outcome.mx_host,
                    tls=(outcome.tls_version or "no TLS") + (", verified" if outcome.verified else ""),
                    code=outcome.code,
                    message=outcome.message,
                )
        return DeliveryResult(route.domain, route.mode, tuple(outcomes[r] for r in recipients), results)
