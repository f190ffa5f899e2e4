"""
The relay's SMTP intake (L{RelaySMTPFactory}): twisted.mail's C{ESMTP}
server, with the commands that carry addresses judged here
(L{mtasts_twisted.relay.commands}), streaming each message into the
L{Queue}.  Who may connect, the limits and how lines are read are
L{mtasts_twisted.relay.session}; this module is what is said:

  - Advertises C{SIZE} (RFC 1870), C{8BITMIME} (RFC 6152), C{PIPELINING}
    (RFC 2920), C{ENHANCEDSTATUSCODES} (RFC 2034), C{SMTPUTF8} (RFC 6531)
    and C{STARTTLS} (RFC 3207) when given a server TLS context; under TLS,
    C{REQUIRETLS} (RFC 8689 §2: the MAIL parameter is refused outside TLS
    with C{530 5.7.10}; the flag is kept with the message).
  - Commands: EHLO or HELO before MAIL (C{503 5.5.1}, RFC 5321 §4.1.4;
    again after STARTTLS, RFC 3207 §4.2); addresses are judged by RFC 5321
    §4.1.2 and §4.5.3.1 (C{501 5.1.7} / C{501 5.1.3}); a UTF-8 address
    needs the C{SMTPUTF8} parameter (C{550}/C{553 5.6.7}, RFC 6531 §3.5),
    which is kept with the message for delivery; recipients at address
    literals are refused (C{553 5.1.2}).  Every reply:
    L{mtasts_twisted.relay.commands}.
  - C{250} to the final dot only after L{Queue.enqueue} has fsynced the
    message and its envelope.  A full queue or disk: C{452 4.3.1} (at MAIL
    or at the dot); another error of the queue's files (EIO, EROFS,
    EMFILE, ...): C{451 4.3.0}, and the session goes on; over the size
    limit: C{552 5.3.4} (at MAIL for a declared C{SIZE=}, else at the dot,
    the data being read and dropped); too many recipients: C{452 4.5.3}
    (RFC 5321 §4.5.3.1.10).
  - C{Received:} is built from validated values only
    (L{mtasts_twisted.relay.commands.received_header}).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IOpenSSLContextFactory, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail.smtp import ESMTP, SMTP

from mtasts_twisted.delivery.mailbox import Mailbox
from mtasts_twisted.relay.commands import (
    Greeting,
    Refusal,
    parse_helo,
    parse_mail,
    parse_rcpt,
    received_header,
)
from mtasts_twisted.relay.envelope import QueuedMessage
from mtasts_twisted.relay.errors import MessageTooLargeError, QueueFullError
from mtasts_twisted.relay.queue import Queue
from mtasts_twisted.relay.session import IntakeSession
from mtasts_twisted.relay.settings import RelaySettings
from mtasts_twisted.relay.transaction import LOCAL_ERROR, Transaction, spool_error

__all__ = ["RelaySMTP", "RelaySMTPFactory"]

log = Logger()

if TYPE_CHECKING:
    # Twisted's factories are generic in their protocol (for type checkers;
    # not subscripted at run time, which older Twisted versions refuse).
    _ServerFactory = ServerFactory["RelaySMTP"]
else:
    _ServerFactory = ServerFactory


class RelaySMTP(IntakeSession):
    """
    The relay's ESMTP server protocol: the commands (see the module
    docstring) over an L{IntakeSession} (admission, limits, lines).  Made
    by L{RelaySMTPFactory}.
    """

    factory: RelaySMTPFactory
    #: The accepted EHLO/HELO (None: none yet, or reset by STARTTLS).
    _greeting: Greeting | None = None
    #: The MAIL transaction in progress (or whose data is being received).
    _transaction: Transaction | None = None

    def greeting(self) -> bytes:
        """The 220 greeting text."""
        return self.host + b" ESMTP mtasts-twisted relay"

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        """EHLO keywords: SIZE, 8BITMIME, PIPELINING, ENHANCEDSTATUSCODES, SMTPUTF8, STARTTLS, REQUIRETLS."""
        ext: dict[bytes, list[bytes] | None] = {
            b"SIZE": [str(self.factory.settings.max_message_size).encode()],  # RFC 1870
            b"8BITMIME": None,  # RFC 6152; RFC 6531 §3.1 item 8 requires it with SMTPUTF8
            b"PIPELINING": None,  # RFC 2920
            b"ENHANCEDSTATUSCODES": None,  # RFC 2034
            b"SMTPUTF8": None,  # RFC 6531
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        if self.startedTLS:
            # RFC 8689 §2: the parameter is valid only in a TLS session, so
            # the keyword is offered only there (the EHLO after STARTTLS).
            ext[b"REQUIRETLS"] = None
        return ext

    def _greet(self, rest: bytes, esmtp: bool) -> None:
        try:
            greeting = parse_helo(rest, esmtp)
        except Refusal as refusal:
            self._reply(refusal)
            return
        self._greeting = greeting
        self._transaction = None
        if esmtp:
            ESMTP.do_EHLO(self, rest)
        else:
            SMTP.do_HELO(self, rest)

    def do_EHLO(self, rest: bytes) -> None:
        """EHLO (RFC 5321 §4.1.1.1): a name is required; resets the transaction."""
        self._greet(rest, esmtp=True)

    def do_HELO(self, rest: bytes) -> None:
        """HELO (RFC 5321 §4.1.1.1): a name is required; resets the transaction."""
        self._greet(rest, esmtp=False)

    def ext_STARTTLS(self, rest: bytes) -> None:
        """STARTTLS; once started, the client must say EHLO again (RFC 3207 §4.2)."""
        started = self.startedTLS
        ESMTP.ext_STARTTLS(self, rest)
        if self.startedTLS and not started:
            self._plaintext_dropped = True
            self._greeting = None
            self._transaction = None
            self._from = None
            self._to = []

    def do_MAIL(self, rest: bytes) -> None:
        """MAIL (RFC 5321 §4.1.1.2), judged by L{parse_mail}."""
        if self._greeting is None:
            self.sendCode(503, b"5.5.1 Send EHLO or HELO first")  # RFC 5321 §4.1.4
            return
        if self._from is not None:
            self.sendCode(503, b"5.5.1 Nested MAIL command")
            return
        try:
            mail = parse_mail(rest, self.factory.settings.max_message_size, tls=self.startedTLS)
        except Refusal as refusal:
            self._reply(refusal)
            return
        queue = self.factory.queue
        if not queue.has_room():
            log.warn("queue full: refusing mail from <{sender}>", sender=str(mail.sender or ""))  # noqa: G010
            self.sendCode(452, b"4.3.1 Insufficient system storage, try again later")
            return
        self._transaction = Transaction(queue, self, mail)
        self._from = mail  # what twisted.mail's DATA checks and hands back
        self._to = []
        self.sendCode(250, b"2.1.0 Ok")

    def do_RCPT(self, rest: bytes) -> None:
        """RCPT (RFC 5321 §4.1.1.3), judged by L{parse_rcpt}."""
        transaction = self._transaction
        if self._from is None or transaction is None:
            self.sendCode(503, b"5.5.1 MAIL first")
            return
        try:
            recipient = parse_rcpt(rest, transaction.smtputf8)
        except Refusal as refusal:
            self._reply(refusal)
            return
        address = str(recipient)
        if address not in transaction.recipients:
            if len(transaction.recipients) >= self.factory.settings.max_recipients:
                self.sendCode(452, b"4.5.3 Too many recipients")  # RFC 5321 §4.5.3.1.10
                return
            transaction.recipients.append(address)
            self._to.append((recipient, transaction.message))
        self.sendCode(250, b"2.1.5 Ok")

    def do_DATA(self, rest: bytes) -> None:
        """DATA: only after MAIL and an accepted RCPT (C{503 5.5.1})."""
        if self._from is None or not self._to:
            self.sendCode(503, b"5.5.1 MAIL and RCPT first")
            return
        ESMTP.do_DATA(self, rest)

    def do_RSET(self, rest: bytes) -> None:
        """RSET: forget the transaction (RFC 5321 §4.1.1.5)."""
        self._from = None
        self._to = []
        self._transaction = None
        self.sendCode(250, b"2.0.0 Ok")

    def receivedHeader(self, helo: object, origin: object, recipients: list[Mailbox]) -> bytes | None:
        """The C{Received:} line, from validated values only (L{received_header})."""
        if self._greeting is None:
            return None  # unreachable: DATA needs MAIL, MAIL needs a greeting
        transaction = self._transaction
        return received_header(
            self._greeting,
            self._client_ip,
            self.factory.settings.reporting_mta,
            tls=self.startedTLS,
            smtputf8=transaction is not None and transaction.smtputf8,
            date=formatdate(),
        )

    def do_NOOP(self, rest: bytes) -> None:
        """NOOP: C{250} (RFC 5321 §4.1.1.9; twisted.mail's server lacks it)."""
        self.sendCode(250, b"2.0.0 Ok")

    def do_VRFY(self, rest: bytes) -> None:
        """VRFY: C{252}, nothing is verified here (RFC 5321 §3.5.3, §4.5.1)."""
        self.sendCode(252, b"2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def _messageHandled(self, resultList: list[tuple[bool, Any]]) -> None:
        """Answer the final dot: 250 only when the queue has committed it."""
        try:
            self._answer_data(resultList)
        finally:
            self._release_input()

    def _answer_data(self, resultList: list[tuple[bool, Any]]) -> None:
        queued = [r for ok, r in resultList if ok and isinstance(r, QueuedMessage)]
        failures = [r for ok, r in resultList if not ok]
        if not failures and queued:
            self.sendCode(250, f"2.0.0 Ok: queued as {queued[0].id}".encode())
            self.factory.received(queued[0])
            return
        failure = failures[0] if failures else None
        if failure is not None and failure.check(QueueFullError):
            log.warn("queue full at end of data: {error}", error=str(failure.value))  # noqa: G010 - twisted.logger has warn, not warning
            self.sendCode(452, b"4.3.1 Insufficient system storage")
        elif failure is not None and failure.check(MessageTooLargeError):
            self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size")
        elif failure is not None and failure.check(OSError):
            spool_error(cast(OSError, failure.value), "committing")  # not full: 451
            self.sendCode(451, LOCAL_ERROR)
        else:
            if failure is not None:
                log.failure("queueing a message failed", failure)
            self.sendCode(451, LOCAL_ERROR)


class RelaySMTPFactory(_ServerFactory):
    """
    The relay's SMTP intake: listen with it on a (loopback) endpoint.

    @ivar connections: SMTP connections open now.
    @ivar per_ip: open connections per client (L{client_key
        <mtasts_twisted.relay.settings.client_key>}: one IP address, or
        C{"loopback"} for all of 127.0.0.0/8 and ::1).
    """

    noisy = False  # no "Starting factory" line when the service hands it the listener

    protocol = RelaySMTP

    def __init__(
        self,
        queue: Queue,
        settings: RelaySettings,
        clock: IReactorTime,
        tls_context: IOpenSSLContextFactory | None = None,
        on_message: Callable[[QueuedMessage], object] | None = None,
    ) -> None:
        """
        @param queue: where accepted mail goes.
        @param clock: an C{IReactorTime} for timeouts.
        @param tls_context: a server TLS context factory to offer STARTTLS.
        @param on_message: called with each accepted L{QueuedMessage}
            (e.g. L{RelayService.wake}).
        """
        self.queue = queue
        self.settings = settings
        self.clock = clock
        self.tls_context = tls_context
        self.on_message = on_message
        self.connections = 0
        self.per_ip: Counter[str] = Counter()
        self.protocols: set[IntakeSession] = set()
        self._closed_waiters: list[Deferred[None]] = []

    def close_all(self) -> Deferred[None]:
        """
        Disconnect every client (at shutdown; a message in DATA is not
        accepted and its partial file removed) and fire when all are gone.
        """
        for proto in list(self.protocols):
            proto._connection.abortConnection()
        return self.wait_closed()

    def wait_closed(self) -> Deferred[None]:
        """Fire when no connection is open."""
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        return d

    def lost(self, proto: IntakeSession) -> None:
        """C{proto}'s connection has ended: stop tracking it."""
        self.protocols.discard(proto)
        if not self.protocols:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    def buildProtocol(self, addr: IAddress | None) -> RelaySMTP:
        """A L{RelaySMTP} with this factory's limits."""
        proto = RelaySMTP(contextFactory=self.tls_context)
        proto.factory = self
        proto.host = self.settings.reporting_mta.encode("idna")
        # twisted.mail's SMTP declares an int; its TimeoutMixin takes any seconds.
        proto.timeout = self.settings.idle_timeout  # type: ignore[assignment]
        proto.MAX_LENGTH = self.settings.max_line_length
        proto.noisy = False
        self.protocols.add(proto)
        return proto

    def received(self, message: QueuedMessage) -> None:
        """A message was accepted (250 sent)."""
        if self.on_message is not None:
            self.on_message(message)
