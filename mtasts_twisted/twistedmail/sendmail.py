"""
A drop-in for C{twisted.mail.smtp.sendmail} that delivers directly to the
recipients' MX hosts under their MTA-STS policies: L{MTASTSSender}.

twisted.mail's C{sendmail(smtphost, from_addr, to_addrs, msg, ...)} hands a
message to one host.  L{MTASTSSender.sendmail} takes the same message
arguments without the host: it groups the recipients by domain, and per
domain looks up the policy and the MX hosts and drives twisted.mail's
C{ESMTPSenderFactory} over the planned attempts (L{DomainSender}: failover
by ourselves with C{retries=0}, a connect, reply and session timeout,
verified STARTTLS where the policy says C{enforce}).  Its result has
twisted.mail's shape::

    numOk, replies = await sender.sendmail("alice@example.org",
                                           ["bob@example.com"], message_file)
    for address, code, response in replies:    # bytes, int, bytes
        ...

It fails, as twisted.mail's does, when no recipient got the message: with
L{MTASTSDeliveryError}, an C{SMTPDeliveryError} whose C{addresses} hold the
same triples (C{retry} is true when any recipient may succeed later).

L{MTASTSSender.deliver} takes the same arguments and gives the
L{SendmailResult}: per recipient the L{RecipientOutcome
<mtasts_twisted.delivery.RecipientOutcome>} (status, MX host, TLS version,
whether the certificate verified) and per domain the TLSRPT results.

Differences from twisted.mail's C{sendmail}, on purpose:

  - no C{smtphost}: the MX hosts of each recipient domain, by policy;
  - no C{username}/C{password}: MX hosts are not authenticated to;
  - the message may use LF or CRLF line ends, and is dot-stuffed across
    chunk boundaries (see L{mtasts_twisted.twistedmail.sender});
  - a recipient that cannot be sent by twisted.mail (a non-ASCII local
    part needs SMTPUTF8, RFC 6531) or has no domain fails permanently
    without a connection;
  - C{requiretls=True} (RFC 8689) is refused with
    L{RequireTLSUnsupportedError}: twisted.mail's client writes C{MAIL
    FROM:<...>} with no parameters (C{SMTPClient.smtpState_from}), so it
    cannot pass REQUIRETLS on (§4.2.1).  Use L{Deliverer
    <mtasts_twisted.delivery.Deliverer>}C{.deliver(..., requiretls=True)}.

Replies of our own making (no server said them) carry 451 for transient
outcomes, 550 for permanent ones and 556 for a null MX (RFC 7505 §4.2),
with a text starting with an RFC 3463 enhanced code.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterable
from typing import IO, Any

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.mail.smtp import SMTPDeliveryError

from mtasts_twisted.delivery import DeliveryResult, RecipientOutcome, Status
from mtasts_twisted.delivery.protocol import wire_address
from mtasts_twisted.delivery.values import CHUNK_SIZE
from mtasts_twisted.policy import DomainError, to_alabel
from mtasts_twisted.twistedmail.domain import DomainSender

__all__ = [
    "MTASTSDeliveryError",
    "MTASTSSender",
    "Reply",
    "RequireTLSUnsupportedError",
    "SendmailResult",
    "reply_of",
]


class RequireTLSUnsupportedError(ValueError):
    """
    REQUIRETLS (RFC 8689) was asked of twisted.mail's sender, which cannot
    send a MAIL FROM parameter: nothing was sent.
    """

    def __init__(self) -> None:
        super().__init__(
            "REQUIRETLS (RFC 8689) cannot be sent through twisted.mail's ESMTP client (no MAIL FROM "
            "parameters); deliver the message with mtasts_twisted.delivery.Deliverer(..., requiretls=True)"
        )

#: One twisted.mail recipient reply: C{(address, code, response)}.
Reply = tuple[bytes, int, bytes]

#: Messages up to this size are copied into memory when not seekable;
#: larger ones spill to a temporary file.
SPOOL_MEMORY = 1024 * 1024


def reply_of(outcome: RecipientOutcome, address: bytes) -> Reply:
    """
    The twisted.mail-shaped reply of one recipient's outcome.

    @param outcome: the outcome.
    @param address: the address as twisted.mail would give it.
    """
    code = outcome.code
    if code is None:
        if outcome.message.startswith("5.1.10"):
            code = 556  # RFC 7505 §4.2
        else:
            code = 550 if outcome.status is Status.PERMANENT else 451
    return (address, code, outcome.message.encode("utf-8", "replace"))


@attrs.frozen
class SendmailResult:
    """
    What L{MTASTSSender.deliver} did with one message.

    @ivar outcomes: one L{RecipientOutcome} per recipient, in the order
        given (a duplicate once).
    @ivar addresses: each recipient's address as twisted.mail gives it
        back, parallel to C{outcomes}.
    @ivar deliveries: one L{DeliveryResult} per recipient domain that was
        tried, with its TLSRPT results (the policy lookup's first).
    """

    outcomes: tuple[RecipientOutcome, ...]
    addresses: tuple[bytes, ...]
    deliveries: tuple[DeliveryResult, ...]

    @property
    def delivered(self) -> int:
        """How many recipients got the message (twisted.mail's C{numOk})."""
        return sum(1 for o in self.outcomes if o.status is Status.DELIVERED)

    def replies(self) -> list[Reply]:
        """The C{(address, code, response)} triple of every recipient."""
        return [reply_of(o, a) for o, a in zip(self.outcomes, self.addresses)]

    def sendmail_value(self) -> tuple[int, list[Reply]]:
        """
        twisted.mail's result: C{(numOk, replies)}.

        @raise MTASTSDeliveryError: no recipient got the message.
        """
        replies = self.replies()
        if self.delivered:
            return self.delivered, replies
        transient = [r for r, o in zip(replies, self.outcomes) if o.status is Status.TRANSIENT]
        address, code, response = (transient or replies)[0]
        raise MTASTSDeliveryError(code, response, None, replies, retry=bool(transient), result=self)


class MTASTSDeliveryError(SMTPDeliveryError):
    """
    No recipient got the message.  Like twisted.mail's
    C{SMTPDeliveryError}: C{code} and C{resp} are those of the first
    recipient that may succeed later (else of the first one), C{addresses}
    the triples of all, C{retry} whether any may succeed later.

    @ivar result: the L{SendmailResult}.
    """

    def __init__(self, code: int, resp: bytes, log: bytes | None, addresses: list[Reply], *,
                 retry: bool, result: SendmailResult) -> None:
        super().__init__(code, resp, log, addresses, isFatal=False, retry=retry)
        self.result = result


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _recipients(to_addrs: Any) -> list[str]:
    if isinstance(to_addrs, (str, bytes)):
        to_addrs = [to_addrs]
    return list(dict.fromkeys(_text(a) for a in to_addrs))


def _seekable(msg: Any) -> tuple[IO[bytes], bool]:
    """The message as a seekable binary file, and whether it is our copy."""
    if not hasattr(msg, "read"):
        return io.BytesIO(bytes(msg)), True
    try:
        msg.seek(msg.tell())
        return msg, False
    except (AttributeError, OSError, ValueError):
        pass
    copy = tempfile.SpooledTemporaryFile(SPOOL_MEMORY)
    while True:
        chunk = msg.read(CHUNK_SIZE)
        if not chunk:
            break
        copy.write(chunk if isinstance(chunk, bytes) else chunk.encode("utf-8"))
    copy.seek(0)
    return copy, True


class MTASTSSender:
    """
    twisted.mail's C{sendmail}, to the recipients' MX hosts under their
    MTA-STS policies (see the module docstring).  Build it with
    L{MTASTSContext<mtasts_twisted.twistedmail.MTASTSContext>}, or from a
    L{DomainSender}.
    """

    def __init__(self, domains: DomainSender) -> None:
        """@param domains: delivers to one domain."""
        self._domains = domains

    def sendmail(
        self,
        from_addr: str | bytes,
        to_addrs: str | bytes | Iterable[str | bytes],
        msg: Any,
        senderDomainName: str | bytes | None = None,
        port: int | None = None,
        requireTransportSecurity: bool = False,
        *,
        requiretls: bool = False,
    ) -> Deferred[tuple[int, list[Reply]]]:
        """
        Send C{msg} to C{to_addrs}, like C{twisted.mail.smtp.sendmail}.

        @param from_addr: the envelope sender (C{""}: the null sender).
        @param to_addrs: one address or several.
        @param msg: a file (read in chunks; seekable or copied) or anything
            C{bytes()} takes.
        @param senderDomainName: the EHLO name; the settings' C{helo_name}
            by default.
        @param port: the MX port (25 by default; the settings' C{port_for}
            wins).
        @param requireTransportSecurity: require STARTTLS at every MX host,
            whatever the policy (verification still as the policy says).
        @param requiretls: the message requires REQUIRETLS (RFC 8689):
            always refused here (L{RequireTLSUnsupportedError}, see the
            module docstring); L{False} sends as before.
        @return: L{Deferred} firing with C{(numOk, [(address, code,
            response)])} when any recipient got the message, else failing
            with L{MTASTSDeliveryError}.
        """
        d = self.deliver(from_addr, to_addrs, msg, senderDomainName, port, requireTransportSecurity,
                         requiretls=requiretls)
        return d.addCallback(lambda result: result.sendmail_value())

    def deliver(
        self,
        from_addr: str | bytes,
        to_addrs: str | bytes | Iterable[str | bytes],
        msg: Any,
        senderDomainName: str | bytes | None = None,
        port: int | None = None,
        requireTransportSecurity: bool = False,
        *,
        requiretls: bool = False,
    ) -> Deferred[SendmailResult]:
        """
        Like L{sendmail}, but fire with the L{SendmailResult} (never fails
        but for bad arguments: L{ValueError} for no recipients,
        L{RequireTLSUnsupportedError} for C{requiretls=True}).
        """
        if requiretls:
            # RFC 8689 §4.2.1: the parameter must be passed on; this client
            # cannot, so nothing is sent (never silently without it).
            return fail(RequireTLSUnsupportedError())
        return Deferred.fromCoroutine(
            self._deliver(from_addr, to_addrs, msg, senderDomainName, port, requireTransportSecurity))

    async def _deliver(
        self,
        from_addr: str | bytes,
        to_addrs: Any,
        msg: Any,
        helo_name: str | bytes | None,
        port: int | None,
        require_tls: bool,
    ) -> SendmailResult:
        recipients = _recipients(to_addrs)
        if not recipients:
            raise ValueError("no recipients")
        helo = helo_name.encode("ascii") if isinstance(helo_name, str) else helo_name
        outcomes: dict[str, RecipientOutcome] = {}
        addresses = {r: r.encode("utf-8") for r in recipients}
        groups: dict[str, dict[str, bytes]] = {}
        try:
            reverse = wire_address(_text(from_addr))
        except ValueError as e:
            why = f"5.1.7 bad sender address: {e}"
            return _all_refused(recipients, addresses, why)
        if reverse.smtputf8:
            return _all_refused(recipients, addresses,
                                "5.6.7 the sender address needs SMTPUTF8, which twisted.mail does not send")
        for r in recipients:
            try:
                path = wire_address(r)
                domain = to_alabel(r.rpartition("@")[2])
            except (ValueError, DomainError) as e:
                # Address literals have no MTA-STS policy and no MX.
                outcomes[r] = _refused(r, f"5.1.3 cannot deliver to {r!r}: {e}")
                continue
            if path.smtputf8:
                outcomes[r] = _refused(r, "5.6.7 the address needs SMTPUTF8, which twisted.mail does not send")
                continue
            addresses[r] = path.address
            groups.setdefault(domain, {})[r] = path.address
        deliveries: list[DeliveryResult] = []
        if groups:
            message, ours = _seekable(msg)
            try:
                for domain, paths in groups.items():
                    result = await self._domains.deliver(domain, reverse.address, paths, message, port=port,
                                                         helo=helo, require_tls=require_tls)
                    deliveries.append(result)
                    outcomes.update((o.recipient, o) for o in result.outcomes)
            finally:
                if ours:
                    message.close()
        return SendmailResult(tuple(outcomes[r] for r in recipients), tuple(addresses[r] for r in recipients),
                              tuple(deliveries))


def _refused(recipient: str, message: str) -> RecipientOutcome:
    return RecipientOutcome(recipient, Status.PERMANENT, None, message, None, None, False)


def _all_refused(recipients: list[str], addresses: dict[str, bytes], message: str) -> SendmailResult:
    return SendmailResult(tuple(_refused(r, message) for r in recipients),
                          tuple(addresses[r] for r in recipients), ())
