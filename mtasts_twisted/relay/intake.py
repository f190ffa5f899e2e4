"""
The relay's SMTP intake (L{RelaySMTPFactory}): twisted.mail's C{ESMTP}
server, with the commands that carry addresses judged here
(L{mtasts_twisted.relay.commands}), streaming each message into the
L{Queue}:

  - Only clients in C{allowed_networks} (default: loopback) may use it;
    anyone else gets C{554 5.7.1} as the greeting and is disconnected
    (RFC 5321 §3.1) — never an open relay.
  - Advertises C{SIZE} (RFC 1870), C{8BITMIME} (RFC 6152), C{PIPELINING}
    (RFC 2920), C{ENHANCEDSTATUSCODES} (RFC 2034), C{SMTPUTF8} (RFC 6531)
    and C{STARTTLS} (RFC 3207) when given a server TLS context; under TLS,
    C{REQUIRETLS} (RFC 8689 §2: the MAIL parameter is refused outside TLS
    with C{530 5.7.10}; the flag is kept with the message).  No AUTH:
    access is by network only.
  - Commands: EHLO or HELO before MAIL (C{503 5.5.1}, RFC 5321 §4.1.4;
    again after STARTTLS, RFC 3207 §4.2); a control character in any
    command (a bare CR or LF, NUL, TAB) is C{501 5.5.2}; addresses are
    judged by RFC 5321 §4.1.2 and §4.5.3.1 (C{501 5.1.7} / C{501 5.1.3});
    a UTF-8 address needs the C{SMTPUTF8} parameter (C{550}/C{553 5.6.7},
    RFC 6531 §3.5), which is kept with the message for delivery;
    recipients at address literals are refused (C{553 5.1.2}).  Every
    reply: L{mtasts_twisted.relay.commands}.
  - C{250} to the final dot only after L{Queue.enqueue} has fsynced the
    message and its envelope.  A full queue or disk: C{452 4.3.1} (at MAIL
    or at the dot); another error of the queue's files (EIO, EROFS,
    EMFILE, ...): C{451 4.3.0}, and the session goes on; over the size
    limit: C{552 5.3.4} (at MAIL for a declared C{SIZE=}, else at the dot,
    the data being read and dropped); too many recipients: C{452 4.5.3}
    (RFC 5321 §4.5.3.1.10).
  - C{Received:} is built from validated values only
    (L{mtasts_twisted.relay.commands.received_header}).
  - Lines: CRLF ends a line (twisted.mail's C{LineOnlyReceiver}); a bare
    LF or CR is kept as data inside the line, so only CRLF.CRLF ends the
    DATA (no SMTP smuggling); the deliverer turns bare line ends into CRLF
    and dot-stuffs after that.  A line over C{max_line_length} gets
    C{500 5.5.2} and the connection is closed (resynchronising a DATA
    stream after a dropped partial line is not safe).
  - Limits: connections per client and in total (C{421 4.7.0} beyond;
    every loopback address, 127.0.0.0/8 and ::1, is one client), idle
    timeout per command/line (C{421}), a maximum session time.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IOpenSSLContextFactory, IReactorTime
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.mail.smtp import ESMTP, SMTP
from twisted.python.failure import Failure

from mtasts_twisted.delivery.mailbox import Mailbox
from mtasts_twisted.relay.commands import (
    Greeting,
    Refusal,
    check_line,
    parse_helo,
    parse_mail,
    parse_rcpt,
    received_header,
)
from mtasts_twisted.relay.envelope import QueuedMessage
from mtasts_twisted.relay.errors import MessageTooLargeError, QueueFullError
from mtasts_twisted.relay.queue import Queue
from mtasts_twisted.relay.settings import RelaySettings, client_key
from mtasts_twisted.relay.transaction import LOCAL_ERROR, Transaction, spool_error

__all__ = ["RelaySMTP", "RelaySMTPFactory"]

log = Logger()

if TYPE_CHECKING:
    # Twisted's factories are generic in their protocol (for type checkers;
    # not subscripted at run time, which older Twisted versions refuse).
    _ServerFactory = ServerFactory["RelaySMTP"]
else:
    _ServerFactory = ServerFactory


class _Connection(Protocol):
    """What the intake uses of its transport: a TCP (or TLS) connection."""

    disconnecting: bool

    def getPeer(self) -> IAddress:
        """The client's address."""

    def loseConnection(self) -> None:
        """Close after what is written has been sent."""

    def abortConnection(self) -> None:
        """Close at once."""

    def pauseProducing(self) -> None:
        """Stop reading."""

    def resumeProducing(self) -> None:
        """Read again."""


class RelaySMTP(ESMTP):
    """
    The relay's ESMTP server protocol (see the module docstring).
    Made by L{RelaySMTPFactory}.
    """

    factory: RelaySMTPFactory
    #: The client's key in C{factory.per_ip} (L{client_key}), once counted.
    _counted_ip: str | None = None
    #: The client's IP address, as C{ipaddress} writes it.
    _client_ip = "0.0.0.0"
    #: The accepted EHLO/HELO (None: none yet, or reset by STARTTLS).
    _greeting: Greeting | None = None
    #: The MAIL transaction in progress (or whose data is being received).
    _transaction: Transaction | None = None
    _session_call: IDelayedCall | None = None
    _refused = False
    #: STARTTLS was just answered: the rest of this read is plaintext.
    _plaintext_dropped = False
    #: Lines received while an end of data is being committed (None: none is).
    _held: list[bytes] | None = None

    @property
    def _connection(self) -> _Connection:
        # While connected, the transport is a TCP (or TLS) connection.
        return cast(_Connection, self.transport)

    def hold_input(self) -> None:
        """
        Keep further lines unprocessed (and stop reading) until the end of
        data being committed is answered: a pipelining client (RFC 2920)
        must get its replies in order, and twisted.mail's server would
        otherwise answer the next MAIL before the dot.
        """
        if self._held is None:
            self._held = []
            if self.transport is not None:
                self._connection.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        """Input from the transport (decrypted, once TLS has started)."""
        self._plaintext_dropped = False
        ESMTP.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> object:
        """Process a line, or keep it while an end of data is pending."""
        if self._plaintext_dropped:
            # Came in plaintext with STARTTLS, read after it: never run it
            # as if it had come under TLS (RFC 3207 §5).
            return None
        if self._held is not None:
            self._held.append(line)
            return None
        return ESMTP.lineReceived(self, line)

    def _release_input(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        self._connection.resumeProducing()
        tls = self.startedTLS
        while held and not self._connection.disconnecting:
            self.lineReceived(held.pop(0))
            if self.startedTLS and not tls:
                # Sent in the clear before the handshake: never treat it as
                # protected (RFC 3207 §4.2; no command injection).
                return
            if self._held is not None:
                self._held[:0] = held  # another dot is being committed
                return

    def lookupMethod(self, command: bytes | str) -> Callable[[bytes], object] | None:
        """
        Find the handler of a command word; a word that is not ASCII is an
        unknown command (500), not an exception that drops the connection.
        """
        if isinstance(command, bytes) and not command.isascii():
            return None
        return super().lookupMethod(command)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:  # TimeoutMixin
        """Schedule on the factory's clock (idle timeout)."""
        return self.factory.clock.callLater(period, func)

    def connectionMade(self) -> None:
        """Refuse clients outside the allowed networks or over the limits."""
        factory = self.factory
        peer = self._connection.getPeer()
        host = getattr(peer, "host", "")
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            address = None
        if address is None or not any(
            address in net for net in factory.settings.allowed_networks
        ):
            log.warn(  # noqa: G010 - twisted.logger has warn, not warning
                "refused SMTP client {client}: not in the allowed networks", client=host
            )
            self._refuse(
                554,
                f"5.7.1 {factory.settings.reporting_mta} relay access denied to {host}",
            )
            return
        if factory.connections >= factory.settings.max_connections:
            self._refuse(421, "4.7.0 Too many connections, try again later")
            return
        key = client_key(address)
        if factory.per_ip[key] >= factory.settings.max_connections_per_ip:
            log.warn(  # noqa: G010 - twisted.logger has warn, not warning
                "refused SMTP client {client}: {count} connections from {key} already",
                client=host, count=factory.per_ip[key], key=key,
            )
            self._refuse(
                421, f"4.7.0 Too many connections from {host}, try again later"
            )
            return
        factory.connections += 1
        factory.per_ip[key] += 1
        self._counted_ip = key
        self._client_ip = str(address)
        self._session_call = factory.clock.callLater(
            factory.settings.max_session_time, self._session_expired
        )
        ESMTP.connectionMade(self)

    def _refuse(self, code: int, text: str) -> None:
        self._refused = True
        self.mode = "REFUSED"
        self.sendCode(code, text.encode("ascii", "replace"))
        self._connection.loseConnection()

    def state_REFUSED(self, line: bytes) -> None:
        """Ignore whatever a refused client still sends."""

    def _session_expired(self) -> None:
        self._session_call = None
        self.sendCode(421, b"4.4.2 Session time limit exceeded, closing connection")
        self._connection.loseConnection()

    def timeoutConnection(self) -> None:
        """Idle too long: C{421} and close (RFC 5321 §4.5.3.2.7)."""
        self.sendCode(421, b"4.4.2 Idle timeout, closing connection")
        self._connection.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Release the connection's slots and abort a partial message."""
        if self._counted_ip is not None:
            self.factory.connections -= 1
            self.factory.per_ip[self._counted_ip] -= 1
            if self.factory.per_ip[self._counted_ip] <= 0:
                del self.factory.per_ip[self._counted_ip]
            self._counted_ip = None
        if self._session_call is not None and self._session_call.active():
            self._session_call.cancel()
        self._session_call = None
        self._held = None
        if not self._refused:
            ESMTP.connectionLost(self, reason)
        else:
            self.setTimeout(None)
        self.factory._lost(self)

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

    def lineLengthExceeded(self, line: bytes) -> None:
        """Over-long line: C{500 5.5.2} and close (see the module docstring)."""
        messages = self.__dict__.pop("_SMTP__messages", None)
        if messages:
            self._disconnect(messages)
        self.mode = "REFUSED"
        self.sendCode(500, b"5.5.2 Line too long")
        self._connection.loseConnection()

    def state_COMMAND(self, line: bytes) -> None:
        """A command line: none may hold a control character (C{501 5.5.2})."""
        try:
            check_line(line)
        except Refusal as refusal:
            self._reply(refusal)
            return
        ESMTP.state_COMMAND(self, line)

    def _reply(self, refusal: Refusal) -> None:
        self.sendCode(refusal.code, refusal.text.encode("ascii", "replace"))

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
    @ivar per_ip: open connections per client (L{client_key}: one IP
        address, or C{"loopback"} for all of 127.0.0.0/8 and ::1).
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
        self.protocols: set[RelaySMTP] = set()
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

    def _lost(self, proto: RelaySMTP) -> None:
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
