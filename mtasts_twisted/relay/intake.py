"""
The relay's SMTP intake (L{RelaySMTPFactory}): twisted.mail's C{ESMTP}
server with an C{IMessageDelivery} that streams each message into the
L{Queue}:

  - Only clients in C{allowed_networks} (default: loopback) may use it;
    anyone else gets C{554 5.7.1} as the greeting and is disconnected
    (RFC 5321 §3.1) — never an open relay.
  - Advertises C{SIZE} (RFC 1870), C{8BITMIME} (RFC 6152), C{PIPELINING}
    (RFC 2920), and C{STARTTLS} (RFC 3207) when given a server TLS context.
    No AUTH: access is by network only.
  - C{250} to the final dot only after L{Queue.enqueue} has fsynced the
    message and its envelope.  A full queue or disk: C{452 4.3.1} (at MAIL
    or at the dot); over the size limit: C{552 5.3.4} (at MAIL for a
    declared C{SIZE=}, else at the dot, the data being read and dropped);
    too many recipients: C{452 4.5.3} (RFC 5321 §4.5.3.1.10); a recipient
    without a domain: C{501 5.1.3}; non-ASCII addresses: C{553 5.6.7} (no
    SMTPUTF8).
  - Lines: CRLF ends a line (twisted.mail's C{LineOnlyReceiver}); a bare
    LF or CR is kept as data inside the line, so only CRLF.CRLF ends the
    DATA (no SMTP smuggling); the deliverer turns bare line ends into CRLF
    and dot-stuffs after that.  A line over C{max_line_length} gets
    C{500 5.5.2} and the connection is closed (resynchronising a DATA
    stream after a dropped partial line is not safe).
  - Limits: connections per client IP and in total (C{421 4.7.0} beyond),
    idle timeout per command/line (C{421}), a maximum session time.
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
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.mail.smtp import (
    ESMTP,
    Address,
    SMTPBadRcpt,
    SMTPServerError,
    User,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from mtasts_twisted.relay.envelope import QueuedMessage
from mtasts_twisted.relay.errors import MessageTooLargeError, QueueFullError
from mtasts_twisted.relay.queue import Queue
from mtasts_twisted.relay.settings import RelaySettings
from mtasts_twisted.relay.spool import MessageWriter

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


def _address_text(address: Address | User) -> str:
    raw = bytes(address.dest if isinstance(address, User) else address)
    if not raw.isascii():
        raise UnicodeError("non-ASCII address")
    return raw.decode("ascii")


@implementer(IMessageSMTP)
class _QueueMessage:
    """The one C{IMessage} of a transaction: streams lines into the queue."""

    def __init__(self, writer: MessageWriter, protocol: RelaySMTP) -> None:
        self._writer = writer
        self._protocol = protocol

    def lineReceived(self, line: bytes) -> None:
        try:
            self._writer.write(line + b"\r\n")
        except MessageTooLargeError:
            raise SMTPServerError(
                552, b"5.3.4 Message size exceeds fixed maximum message size"
            )
        except QueueFullError:
            raise SMTPServerError(452, b"4.3.1 Insufficient system storage")

    def eomReceived(self) -> Deferred[QueuedMessage]:
        # Failures are reported to the client by RelaySMTP._messageHandled.
        d = self._writer.commit_deferred()
        if not d.called:
            # Replies keep their order (RFC 2920 §3.1): pipelined commands
            # after this dot wait until it is answered.
            self._protocol.hold_input()
        return d

    def connectionLost(self) -> None:
        self._writer.abort()


@implementer(IMessageSMTP)
class _NullMessage:
    """The C{IMessage} of every other recipient: the first one stores all."""

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> Deferred[None]:
        return succeed(None)

    def connectionLost(self) -> None:
        pass


class _Transaction:
    """One MAIL transaction: its sender and accepted recipients."""

    def __init__(self, intake: _Intake, sender: str) -> None:
        self.intake = intake
        self.sender = sender
        self.recipients: list[str] = []
        self._made = False

    def message(self) -> IMessageSMTP:
        # twisted.mail calls this once per recipient at DATA; the first
        # call opens the queue writer for all recipients.
        if self._made:
            return _NullMessage()
        self._made = True
        try:
            writer = self.intake.queue.begin(self.sender, self.recipients)
        except QueueFullError:
            raise SMTPServerError(452, b"4.3.1 Insufficient system storage")
        return _QueueMessage(writer, self.intake.protocol)


@implementer(IMessageDelivery)
class _Intake:
    """The C{IMessageDelivery} of one connection."""

    def __init__(self, factory: RelaySMTPFactory, protocol: RelaySMTP) -> None:
        self.factory = factory
        self.queue = factory.queue
        self.protocol = protocol
        self.transaction: _Transaction | None = None

    def receivedHeader(
        self, helo: tuple[bytes, bytes], origin: Address, recipients: list[User]
    ) -> bytes | None:
        transaction = self.transaction
        if (
            transaction
            and transaction.recipients
            and recipients
            and _address_text(recipients[0]) != transaction.recipients[0]
        ):
            return None  # only the first recipient's IMessage stores data
        helo_name = (helo[0] or b"unknown").decode("ascii", "replace")
        client = (
            helo[1].decode("ascii", "replace")
            if isinstance(helo[1], bytes)
            else str(helo[1])
        )
        by = self.factory.settings.reporting_mta
        proto = "ESMTPS" if self.protocol.startedTLS else "ESMTP"
        # RFC 5321 §4.4; no "for" clause: several recipients share the copy.
        text = f"Received: from {helo_name} ([{client}])\r\n\tby {by} with {proto} (mtasts-twisted);\r\n\t{formatdate()}"
        return text.encode("ascii", "replace")

    def validateFrom(self, helo: tuple[bytes, bytes], origin: Address) -> Address:
        try:
            sender = _address_text(origin)
        except UnicodeError:
            raise SMTPServerError(
                553, "5.6.7 Non-ASCII addresses need SMTPUTF8, which is not offered"
            )
        if not self.queue.has_room():
            log.warn("queue full: refusing mail from <{sender}>", sender=sender)  # noqa: G010 - twisted.logger has warn, not warning
            raise SMTPServerError(
                452, "4.3.1 Insufficient system storage, try again later"
            )
        self.transaction = _Transaction(self, sender)
        return origin

    def validateTo(self, user: User) -> Callable[[], IMessageSMTP]:
        transaction = self.transaction
        if transaction is None:
            raise SMTPBadRcpt(user, 503, "5.5.1 MAIL first")
        try:
            recipient = _address_text(user)
        except UnicodeError:
            raise SMTPServerError(
                553, "5.6.7 Non-ASCII addresses need SMTPUTF8, which is not offered"
            )
        if len(transaction.recipients) >= self.factory.settings.max_recipients:
            raise SMTPServerError(452, "4.5.3 Too many recipients")
        transaction.recipients.append(recipient)
        return transaction.message


class RelaySMTP(ESMTP):
    """
    The relay's ESMTP server protocol (see the module docstring).
    Made by L{RelaySMTPFactory}.
    """

    factory: RelaySMTPFactory
    _counted_ip: str | None = None
    _session_call: IDelayedCall | None = None
    _refused = False
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

    def lineReceived(self, line: bytes) -> object:
        """Process a line, or keep it while an end of data is pending."""
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
        if factory.per_ip[host] >= factory.settings.max_connections_per_ip:
            self._refuse(
                421, f"4.7.0 Too many connections from {host}, try again later"
            )
            return
        factory.connections += 1
        factory.per_ip[host] += 1
        self._counted_ip = host
        self.delivery = _Intake(factory, self)
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
        """EHLO keywords: SIZE, 8BITMIME, PIPELINING, ENHANCEDSTATUSCODES, STARTTLS."""
        ext: dict[bytes, list[bytes] | None] = {
            b"SIZE": [str(self.factory.settings.max_message_size).encode()],  # RFC 1870
            b"8BITMIME": None,  # RFC 6152
            b"PIPELINING": None,  # RFC 2920
            b"ENHANCEDSTATUSCODES": None,  # RFC 2034
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        return ext

    def lineLengthExceeded(self, line: bytes) -> None:
        """Over-long line: C{500 5.5.2} and close (see the module docstring)."""
        messages = self.__dict__.pop("_SMTP__messages", None)
        if messages:
            self._disconnect(messages)
        self.mode = "REFUSED"
        self.sendCode(500, b"5.5.2 Line too long")
        self._connection.loseConnection()

    def do_MAIL(self, rest: bytes) -> None:
        """MAIL, checking a declared C{SIZE=} first (RFC 1870 §6.2)."""
        m = self.mail_re.match(rest)
        if m and m.group("opts"):
            for opt in m.group("opts").split():
                key, _, value = opt.partition(b"=")
                if (
                    key.upper() == b"SIZE"
                    and value.isdigit()
                    and int(value) > self.factory.settings.max_message_size
                ):
                    self.sendCode(
                        552, b"5.3.4 Message size exceeds fixed maximum message size"
                    )
                    return
        ESMTP.do_MAIL(self, rest)

    def do_NOOP(self, rest: bytes) -> None:
        """NOOP: C{250} (RFC 5321 §4.1.1.9; twisted.mail's server lacks it)."""
        self.sendCode(250, b"2.0.0 Ok")

    def do_VRFY(self, rest: bytes) -> None:
        """VRFY: C{252}, nothing is verified here (RFC 5321 §3.5.3, §4.5.1)."""
        self.sendCode(252, b"2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def do_RCPT(self, rest: bytes) -> None:
        """RCPT; a recipient must have a domain (no local delivery here)."""
        m = self.rcpt_re.match(rest)
        if self._from and m and b"@" not in m.group("path"):
            self.sendCode(501, b"5.1.3 Recipient address must include a domain")
            return
        ESMTP.do_RCPT(self, rest)

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
        else:
            if failure is not None:
                log.failure("queueing a message failed", failure)
            self.sendCode(451, b"4.3.0 Local error in processing, try again later")


class RelaySMTPFactory(_ServerFactory):
    """
    The relay's SMTP intake: listen with it on a (loopback) endpoint.

    @ivar connections: SMTP connections open now.
    @ivar per_ip: open connections per client IP.
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
