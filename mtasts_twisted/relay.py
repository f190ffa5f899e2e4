"""
The outbound relay: an SMTP intake that queues mail durably, and delivery
workers that hand queued mail to a L{Deliverer}, retry and send DSNs.

Intake (L{RelaySMTPFactory}): twisted.mail's C{ESMTP} server with an
C{IMessageDelivery} that streams each message into the L{Queue}:

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

Workers (L{RelayService}): every C{poll_interval} (and when mail arrives or
a delivery ends) due pending recipients are grouped per message and
recipient domain, and each group is one C{deliver(sender, recipients,
body)} call, within the global and per-domain concurrency limits.  Per
recipient: DELIVERED → marked; PERMANENT → a DSN to the sender at once
(unless the sender is null) and marked failed; TRANSIENT → retried after
C{retry_base * 2**(attempts-1)}, capped at C{retry_max}; older than
C{expiry} → failed with a DSN (C{4.4.7}, RFC 3463).  MTA-STS enforce
failures are transient outcomes of the deliverer and are simply retried.
A message whose recipients are all done is removed.

Guarantees: a message is accepted only once durable; a (message, domain)
group is never delivered twice concurrently (in-memory set).  Each
outcome is written to the envelope (fsync) as soon as the deliverer
reports it, and a DSN is queued (fsync) I{before} the recipient is marked
failed.  After a crash, work in flight is simply done again: every
accepted message is delivered at least once, or still queued.  The only
way to a duplicate at the final MX is the window between the MX's reply
to the final dot and our envelope fsync (the inherent SMTP duplicate
window, RFC 1047); a crash there can also duplicate a DSN.
"""

from __future__ import annotations

import heapq
import ipaddress
import socket
from collections import Counter
from collections.abc import Sequence
from email.utils import formatdate
from typing import Any, BinaryIO, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import LoopingCall
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

from mtasts_twisted.dsn import build_dsn, needs_dsn, read_headers, status_code_of
from mtasts_twisted.queue import (
    MessageTooLargeError,
    MessageWriter,
    Queue,
    QueuedMessage,
    QueueError,
    QueueFullError,
    RecipientStatus,
    queue_delete,
    queue_list,
    queue_retry,
    queue_show,
)

__all__ = [
    "LOOPBACK_NETWORKS",
    "RelaySMTP",
    "RelaySMTPFactory",
    "RelayService",
    "RelaySettings",
    "queue_delete",
    "queue_list",
    "queue_retry",
    "queue_show",
]

log = Logger()

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The default C{allowed_networks}: loopback only.
LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


@attrs.frozen
class RelaySettings:
    """
    Limits and schedule of the relay (defaults in parentheses).

    @ivar max_message_size: largest message accepted, octets (25 MiB).
    @ivar max_recipients: recipients per transaction (100; RFC 5321
        §4.5.3.1.8 asks for at least 100).
    @ivar max_queue_messages: messages queued at once (10000).
    @ivar max_queue_bytes: octets queued at once (2 GiB).
    @ivar allowed_networks: client networks allowed to submit (loopback).
    @ivar max_connections: concurrent SMTP connections in total (100).
    @ivar max_connections_per_ip: concurrent connections per client IP (10).
    @ivar idle_timeout: seconds of silence before C{421} (300, RFC 5321
        §4.5.3.2.7).
    @ivar max_session_time: seconds one SMTP connection may last (3600).
    @ivar max_line_length: longest command or text line, octets without
        CRLF (8192; RFC 5321 §4.5.3.1.6 asks for 998, clients exceed it).
    @ivar retry_base: first retry delay, seconds (300); doubled per attempt.
    @ivar retry_max: largest retry delay, seconds (3600).
    @ivar expiry: seconds after arrival when pending recipients fail (5 days).
    @ivar concurrency: deliveries in flight in total (20).
    @ivar concurrency_per_domain: deliveries in flight per domain (4).
    @ivar reporting_mta: this relay's name in DSNs, C{Received:} and the
        greeting (the host name).
    @ivar poll_interval: seconds between queue scans (5).
    """

    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_queue_messages: int = 10_000
    max_queue_bytes: int = 2 * 1024 * 1024 * 1024
    allowed_networks: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    max_connections: int = 100
    max_connections_per_ip: int = 10
    idle_timeout: float = 300.0
    max_session_time: float = 3600.0
    max_line_length: int = 8192
    retry_base: float = 300.0
    retry_max: float = 3600.0
    expiry: float = 5 * 24 * 3600.0
    concurrency: int = 20
    concurrency_per_domain: int = 4
    reporting_mta: str = attrs.field(factory=socket.getfqdn)
    poll_interval: float = 5.0

    def retry_delay(self, attempts: int) -> float:
        """The delay before retry number C{attempts} (1 = first retry)."""
        return float(
            min(self.retry_max, self.retry_base * 2 ** max(0, min(attempts - 1, 32)))
        )

    def make_queue(self, directory: str, clock: Any = None) -> Queue:
        """
        A L{Queue} in C{directory} with these limits.  When C{clock} is a
        reactor with threads (C{IReactorThreads}), the intake's commit
        fsyncs run in its thread pool (L{MessageWriter.commit_deferred}).
        """
        return Queue(
            directory,
            max_message_size=self.max_message_size,
            max_messages=self.max_queue_messages,
            max_bytes=self.max_queue_bytes,
            clock=clock,
            threads=clock if IReactorThreads.providedBy(clock) else None,
        )


class IDeliverer(Protocol):
    """What the workers need of a L{mtasts_twisted.delivery.Deliverer}."""

    def deliver(
        self, sender: str, recipients: Sequence[str], message: BinaryIO
    ) -> Deferred[Any]:
        """Deliver to recipients of one domain; fire with a C{DeliveryResult}."""


# ---------------------------------------------------------------- intake


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

    def message(self) -> Any:
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

    def validateTo(self, user: User) -> Any:
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
    _session_call: Any = None
    _refused = False
    #: Lines received while an end of data is being committed (None: none is).
    _held: list[bytes] | None = None

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
                self.transport.pauseProducing()

    def lineReceived(self, line: bytes) -> Any:
        """Process a line, or keep it while an end of data is pending."""
        if self._held is not None:
            self._held.append(line)
            return None
        return ESMTP.lineReceived(self, line)

    def _release_input(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        self.transport.resumeProducing()
        tls = self.startedTLS
        while held and not self.transport.disconnecting:
            self.lineReceived(held.pop(0))
            if self.startedTLS and not tls:
                # Sent in the clear before the handshake: never treat it as
                # protected (RFC 3207 §4.2; no command injection).
                return
            if self._held is not None:
                self._held[:0] = held  # another dot is being committed
                return

    def lookupMethod(self, command: bytes | str) -> Any:
        """
        Find the handler of a command word; a word that is not ASCII is an
        unknown command (500), not an exception that drops the connection.
        """
        if isinstance(command, bytes) and not command.isascii():
            return None
        return super().lookupMethod(command)

    def callLater(self, period: float, func: Any) -> Any:  # TimeoutMixin
        """Schedule on the factory's clock (idle timeout)."""
        return self.factory.clock.callLater(period, func)

    def connectionMade(self) -> None:
        """Refuse clients outside the allowed networks or over the limits."""
        factory = self.factory
        peer = self.transport.getPeer()
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
        self.transport.loseConnection()

    def state_REFUSED(self, line: bytes) -> None:
        """Ignore whatever a refused client still sends."""

    def _session_expired(self) -> None:
        self._session_call = None
        self.sendCode(421, b"4.4.2 Session time limit exceeded, closing connection")
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        """Idle too long: C{421} and close (RFC 5321 §4.5.3.2.7)."""
        self.sendCode(421, b"4.4.2 Idle timeout, closing connection")
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
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
        self.transport.loseConnection()

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


class RelaySMTPFactory(ServerFactory):
    """
    The relay's SMTP intake: listen with it on a (loopback) endpoint.

    @ivar connections: SMTP connections open now.
    @ivar per_ip: open connections per client IP.
    """

    protocol = RelaySMTP

    def __init__(
        self,
        queue: Queue,
        settings: RelaySettings,
        clock: Any,
        tls_context: Any = None,
        on_message: Any = None,
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
            proto.transport.abortConnection()
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

    def buildProtocol(self, addr: Any) -> RelaySMTP:
        """A L{RelaySMTP} with this factory's limits."""
        proto = RelaySMTP(contextFactory=self.tls_context)
        proto.factory = self
        proto.host = self.settings.reporting_mta.encode("idna")
        proto.timeout = self.settings.idle_timeout
        proto.MAX_LENGTH = self.settings.max_line_length
        proto.noisy = False
        self.protocols.add(proto)
        return proto

    def received(self, message: QueuedMessage) -> None:
        """A message was accepted (250 sent)."""
        if self.on_message is not None:
            self.on_message(message)


# --------------------------------------------------------------- workers


@attrs.frozen
class _Group:
    message_id: str
    domain: str
    recipients: tuple[str, ...]


class RelayService(Service):
    """
    Delivery workers over a L{Queue} (see the module docstring).

    Scheduling costs O(log n) per started delivery, not O(backlog): the
    service keeps every queued message's envelope in memory (kept current
    by the queue's observer for this process's own writes, and by the
    periodic fresh listing for other processes' C{mtasts-twisted queue
    retry/delete}), a heap of (due time, id) — due is the earliest
    C{next_attempt} of a pending recipient not in flight, or the expiry
    time — and, per recipient domain at its concurrency limit, the due
    messages waiting for a slot in arrival order.

    @ivar stats: metrics: C{queue_messages}, C{queue_bytes},
        C{oldest_age} (seconds), C{in_flight}, C{deliveries} (a C{Counter}
        by outcome: C{delivered}, C{transient}, C{permanent}, C{expired},
        C{error}), C{dsn_queued}.
    """

    def __init__(
        self, queue: Queue, deliverer: IDeliverer, settings: RelaySettings, clock: Any
    ) -> None:
        self.queue = queue
        self.deliverer = deliverer
        self.settings = settings
        self.clock = clock
        self.in_flight: set[tuple[str, str]] = set()
        self._per_domain: Counter[str] = Counter()
        self._loop: LoopingCall | None = None
        self._wake_call: Any = None
        self._running_deliveries: set[Deferred[None]] = set()
        #: Envelopes whose outcomes could not be written (disk full, I/O
        #: error), by id: kept here and written again before the message
        #: is looked at, so a delivered recipient is not delivered again
        #: every poll while the disk is full.
        self.unwritten: dict[str, QueuedMessage] = {}
        #: Every queued message by id, oldest first (see the class docstring).
        self._messages: dict[str, QueuedMessage] = {}
        self._bytes = 0
        #: (due, id) entries; one is current per id, the one in _due_at:
        #: superseded entries are skipped when they come up (lazy deletion).
        self._heap: list[tuple[float, str]] = []
        self._due_at: dict[str, float] = {}
        #: Per domain at its limit: id -> due time of messages waiting for
        #: a slot (an insertion-ordered dict as a FIFO set).
        self._waiting: dict[str, dict[str, float]] = {}
        #: Domains of finished deliveries that have messages waiting.
        self._freed: set[str] = set()
        self.stats: dict[str, Any] = {
            "queue_messages": 0,
            "queue_bytes": 0,
            "oldest_age": 0.0,
            "in_flight": 0,
            "deliveries": Counter(),
            "dsn_queued": 0,
        }
        queue.add_observer(self._observed)

    def startService(self) -> None:
        """Recover the queue, then poll it every C{poll_interval}."""
        Service.startService(self)
        self.queue.recover()
        self._loop = LoopingCall(self.tick, fresh=True)
        self._loop.clock = self.clock
        self._loop.start(self.settings.poll_interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        """
        Stop picking new work.  Deliveries in flight go on and record
        their outcomes; a process that exits before they end retries them
        at the next start (at-least-once).  A deliverer with C{close}
        (L{mtasts_twisted.delivery.Deliverer.close}) stops keeping SMTP
        sessions for reuse and says QUIT to the parked ones; the returned
        L{Deferred} fires when they are closed.
        """
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        close = getattr(self.deliverer, "close", None)
        if close is None:
            return None
        # Parked sessions would otherwise stay open until their idle timer.
        return close()

    def wake(self, *ignored: Any) -> None:
        """Look for due work soon (new mail, a finished delivery)."""
        if self.running and (self._wake_call is None or not self._wake_call.active()):
            self._wake_call = self.clock.callLater(0, self.tick, fresh=False)

    def wait_idle(self) -> Deferred[Any]:
        """Fire when the deliveries in flight now have ended (for tests)."""
        from twisted.internet.defer import DeferredList

        return DeferredList(list(self._running_deliveries))

    # -- the schedule ------------------------------------------------------

    def _observed(self, ident: str, message: QueuedMessage | None) -> None:
        # The queue committed, updated or removed a message (durably).
        if message is None:
            self._forget(ident)
        else:
            self._track(message)
            if self._due_at.get(ident, float("inf")) <= float(self.clock.seconds()):
                self.wake()

    def _track(self, message: QueuedMessage) -> None:
        old = self._messages.get(message.id)
        if old is not None:
            self._bytes -= old.size
        self._messages[message.id] = message
        self._bytes += message.size
        self._reschedule(message)

    def _forget(self, ident: str) -> None:
        old = self._messages.pop(ident, None)
        if old is not None:
            self._bytes -= old.size
        self._due_at.pop(ident, None)

    def _due(self, message: QueuedMessage) -> float | None:
        """When C{message} needs looking at; L{None}: when a delivery of it ends."""
        pending = False
        due: float | None = None
        for r in message.recipients:
            if r.state is not RecipientStatus.PENDING:
                continue
            pending = True
            if (message.id, r.domain) in self.in_flight:
                continue  # looked at again when that delivery ends
            if due is None or r.next_attempt < due:
                due = r.next_attempt
        if not pending:
            return message.created  # done: remove it (once nothing is in flight)
        if due is None:
            return None
        expires = message.created + self.settings.expiry
        if expires <= float(self.clock.seconds()):
            # Already expired: what is left is looked at when due (e.g. a
            # DSN that could not be queued is tried again at its
            # next_attempt, not in a busy loop).
            return due
        return min(due, expires)

    def _reschedule(self, message: QueuedMessage) -> None:
        due = self._due(message)
        if due is None:
            self._due_at.pop(message.id, None)
        elif self._due_at.get(message.id) != due:
            self._due_at[message.id] = due
            heapq.heappush(self._heap, (due, message.id))

    def _schedule(self, ident: str, due: float) -> None:
        """Look at C{ident} no later than C{due}."""
        if self._due_at.get(ident, float("inf")) > due:
            self._due_at[ident] = due
            heapq.heappush(self._heap, (due, ident))

    def _reload(self) -> None:
        """Follow the queue directory (the periodic poll): O(queue)."""
        listed = self.queue.list(fresh=True)
        known = self._messages
        seen = set()
        for message in listed:
            seen.add(message.id)
            if message.id in self.unwritten:
                continue  # the newer outcomes are in memory
            old = known.get(message.id)
            if old is not message and old != message:
                self._track(message)
            elif message.id not in self._due_at:
                # Normally waiting for its delivery to end or for a domain
                # slot; this also catches a message whose schedule was lost
                # on an unexpected path (looked at again, at worst once per
                # poll).
                self._reschedule(message)
        for ident in [i for i in known if i not in seen]:
            self._forget(ident)
        # Messages waiting for a domain slot may have been retried (then
        # they are rescheduled above) or deleted (skipped when they come
        # up); rebuilding the heap drops superseded entries.
        if len(self._heap) > 2 * len(self._due_at) + 64:
            self._heap = [(due, ident) for ident, due in self._due_at.items()]
            heapq.heapify(self._heap)

    def tick(self, fresh: bool = True) -> None:
        """
        Start every due delivery the concurrency limits allow.

        @param fresh: re-read the queue directory (the periodic poll, which
            also sees what C{mtasts-twisted queue} changed); a wake-up after
            new mail or a finished delivery uses the in-memory schedule.
        """
        now = float(self.clock.seconds())
        if fresh:
            self._reload()
        if self.unwritten:
            for ident in list(self.unwritten):
                self._write_unwritten(ident)
        limit = self.settings.concurrency
        # Messages waiting for a slot of a domain whose delivery ended go
        # first: they were due before anything still in the heap.
        while self._freed and len(self.in_flight) < limit:
            domain = self._freed.pop()
            waiting = self._waiting.get(domain)
            while (
                waiting
                and len(self.in_flight) < limit
                and self._per_domain[domain] < self.settings.concurrency_per_domain
            ):
                ident = next(iter(waiting))
                due = waiting.pop(ident)
                message = self._messages.get(ident)
                if message is not None and ident not in self.unwritten:
                    self._consider(message, now, due)
            if waiting and self._per_domain[domain] < self.settings.concurrency_per_domain:
                self._freed.add(domain)  # the global limit stopped it
                break
            if not waiting:
                self._waiting.pop(domain, None)
        heap = self._heap
        while heap and heap[0][0] <= now and len(self.in_flight) < limit:
            due, ident = heapq.heappop(heap)
            if self._due_at.get(ident) != due:
                continue  # superseded
            del self._due_at[ident]
            message = self._messages.get(ident)
            if message is None or ident in self.unwritten:
                continue  # gone, or held until its outcomes are on disk
            self._consider(message, now, due)
        self._update_stats(now)

    def _consider(self, message: QueuedMessage, now: float, due: float) -> None:
        """Expire, remove or start the deliveries of a message that came due."""
        if now - message.created >= self.settings.expiry:
            self._expire(message, now)
            return
        groups: dict[str, list[str]] = {}
        later: float | None = None
        for r in message.recipients:
            if r.state is not RecipientStatus.PENDING:
                continue
            if (message.id, r.domain) in self.in_flight:
                continue
            if r.next_attempt <= now:
                groups.setdefault(r.domain, []).append(r.address)
            elif later is None or r.next_attempt < later:
                later = r.next_attempt
        if not groups and later is None:
            self._finish_if_done(message)
            return
        for domain, recipients in groups.items():
            if len(self.in_flight) >= self.settings.concurrency:
                self._schedule(message.id, due)  # first in line for the next slot
                break
            if self._per_domain[domain] >= self.settings.concurrency_per_domain:
                self._waiting.setdefault(domain, {}).setdefault(message.id, due)
                # Expiry does not wait for the domain's slot.
                later = min(later if later is not None else float("inf"),
                            message.created + self.settings.expiry)
                continue
            self._start(message, _Group(message.id, domain, tuple(recipients)))
        if later is not None:
            self._schedule(message.id, min(later, message.created + self.settings.expiry))

    def _write_unwritten(self, ident: str) -> bool:
        try:
            self.queue.update(self.unwritten[ident])
        except QueueError as e:
            if not isinstance(e, QueueFullError):
                self.unwritten.pop(ident, None)  # gone meanwhile
            return False
        except OSError:
            return False
        log.info("outcomes of {id} written after an earlier failure", id=ident)
        message = self.unwritten.pop(ident)
        self._track(message)
        return True

    def _update_stats(self, now: float) -> None:
        messages = self._messages
        self.stats["queue_messages"] = len(messages)
        self.stats["queue_bytes"] = self._bytes
        # Oldest first: the initial listing is sorted by id (arrival
        # time) and later arrivals are appended.
        oldest = next(iter(messages.values()), None)
        self.stats["oldest_age"] = max(0.0, now - oldest.created) if oldest else 0.0
        self.stats["in_flight"] = len(self.in_flight)

    def _start(self, message: QueuedMessage, group: _Group) -> None:
        key = (group.message_id, group.domain)
        self.in_flight.add(key)
        self._per_domain[group.domain] += 1
        self.stats["in_flight"] = len(self.in_flight)
        d = Deferred.fromCoroutine(self._deliver(message, group))
        self._running_deliveries.add(d)

        def done(result: Any) -> None:
            self._running_deliveries.discard(d)
            self.in_flight.discard(key)
            self._per_domain[group.domain] -= 1
            if self._per_domain[group.domain] <= 0:
                del self._per_domain[group.domain]
            if group.domain in self._waiting:
                self._freed.add(group.domain)
            self.stats["in_flight"] = len(self.in_flight)
            if isinstance(result, Failure):
                log.failure(
                    "delivery of {id} to {domain} failed",
                    result,
                    id=group.message_id,
                    domain=group.domain,
                )
            self.wake()

        d.addBoth(done)

    async def _deliver(self, message: QueuedMessage, group: _Group) -> None:
        # No event here: the outcome is logged once per recipient (_apply).
        try:
            body = self.queue.open_body(group.message_id)
        except QueueError:
            return  # deleted meanwhile (e.g. queue delete)
        outcomes: dict[str, tuple[str, int | None, str, str | None]] = {}
        try:
            try:
                result = await self.deliverer.deliver(
                    message.sender, list(group.recipients), body
                )
                for outcome in result.outcomes:
                    outcomes[outcome.recipient] = (
                        outcome.status.value,
                        outcome.code,
                        outcome.message,
                        outcome.mx_host,
                    )
            except Exception as e:  # noqa: BLE001 - any deliverer bug: retry later
                log.failure(
                    "deliverer failed for {id} at {domain}",
                    id=group.message_id,
                    domain=group.domain,
                )
                self.stats["deliveries"]["error"] += 1
                for r in group.recipients:
                    outcomes[r] = (
                        "transient",
                        None,
                        f"4.3.0 Internal error during delivery: {e}",
                        None,
                    )
        finally:
            body.close()
        for r in group.recipients:
            # A recipient the deliverer did not report on is retried.
            outcomes.setdefault(
                r, ("transient", None, "4.3.0 No outcome reported", None)
            )
        self._apply(group, outcomes)

    # -- outcomes ----------------------------------------------------------

    def _apply(
        self,
        group: _Group,
        outcomes: dict[str, tuple[str, int | None, str, str | None]],
    ) -> None:
        self.in_flight.discard(
            (group.message_id, group.domain)
        )  # this delivery is over
        try:
            message = self.unwritten.get(group.message_id) or self.queue.get(group.message_id)
        except QueueError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            log.failure("cannot read envelope of {id}", id=group.message_id)
            return
        now = float(self.clock.seconds())
        failed: list[tuple[str, str, str, str | None]] = []
        last_error = message.last_error
        for address in group.recipients:
            try:
                state = message.recipient(address)
            except KeyError:
                continue
            if state.state is not RecipientStatus.PENDING:
                continue
            status, code, text, mx = outcomes[address]
            reason = f"{code} {text}" if code is not None else text
            self.stats["deliveries"][status] += 1
            if status == "delivered":
                state = attrs.evolve(
                    state,
                    state=RecipientStatus.DELIVERED,
                    reason=reason,
                    status_code=status_code_of(code, text, "2.0.0"),
                    remote_mta=mx,
                )
                log.info(
                    "delivered {id} to <{rcpt}> via {mx}",
                    id=message.id,
                    rcpt=address,
                    mx=mx,
                )
            elif status == "permanent":
                state = attrs.evolve(
                    state,
                    state=RecipientStatus.FAILED,
                    reason=reason,
                    status_code=status_code_of(code, text, "5.0.0"),
                    remote_mta=mx,
                )
                failed.append((address, state.status_code or "5.0.0", reason, mx))
                last_error = reason
                log.warn(  # noqa: G010 - twisted.logger has warn, not warning
                    "permanent failure of {id} to <{rcpt}>: {reason}",
                    id=message.id,
                    rcpt=address,
                    reason=reason,
                )
            else:
                attempts = state.attempts + 1
                last_error = reason
                code_str = status_code_of(code, text, "4.0.0")
                if code_str[0] == "5":
                    code_str = "4" + code_str[1:]
                if now - message.created >= self.settings.expiry:
                    state = attrs.evolve(
                        state,
                        state=RecipientStatus.FAILED,
                        attempts=attempts,
                        reason=reason,
                        status_code="4.4.7",
                        remote_mta=mx,
                    )
                    failed.append(
                        (
                            address,
                            "4.4.7",
                            f"delivery time expired; last error: {reason}",
                            mx,
                        )
                    )
                    self.stats["deliveries"]["expired"] += 1
                else:
                    delay = self.settings.retry_delay(attempts)
                    state = attrs.evolve(
                        state,
                        attempts=attempts,
                        next_attempt=now + delay,
                        reason=reason,
                        status_code=code_str,
                        remote_mta=mx,
                    )
                    log.info(
                        "transient failure of {id} to <{rcpt}>, retry in {delay}s: {reason}",
                        id=message.id,
                        rcpt=address,
                        delay=delay,
                        reason=reason,
                    )
            message = message.with_recipient(state)
        message = attrs.evolve(
            message, attempts=message.attempts + 1, last_error=last_error
        )
        self._commit(message, failed)

    def _commit(
        self, message: QueuedMessage, failed: list[tuple[str, str, str, str | None]]
    ) -> None:
        # The DSN is durable before the recipients are marked failed: a
        # crash in between repeats the DSN rather than losing it.
        if failed and not self._send_dsn(message, failed):
            # No DSN could be queued (queue or disk full): keep those
            # recipients pending and try again later, never drop silently.
            retry_at = float(self.clock.seconds()) + self.settings.retry_base
            for address, _, _, _ in failed:
                state = message.recipient(address)
                message = message.with_recipient(
                    attrs.evolve(
                        state, state=RecipientStatus.PENDING, next_attempt=retry_at
                    )
                )
        if not message.pending and not any(k[0] == message.id for k in self.in_flight):
            # Every recipient is final: removing the message (an fsynced
            # rename) records that durably, so writing its envelope first
            # would only cost another fsync.
            try:
                self.queue.remove(message.id)
            except QueueError:
                pass  # already gone
            except OSError:
                log.failure("cannot remove {id}; recording its outcomes instead", id=message.id)
            else:
                self.unwritten.pop(message.id, None)
                return
        try:
            self.queue.update(message)
        except QueueFullError as e:
            # Not on disk: keep it in memory (see tick) rather than
            # delivering again at every poll while the disk is full.
            log.error("cannot record the outcomes of {id}: {error}; kept in memory until it can",
                      id=message.id, error=str(e))
            self.unwritten[message.id] = message
            return
        except QueueError:
            return
        except OSError:
            log.failure(
                "cannot update envelope of {id}; kept in memory until it can",
                id=message.id,
            )
            self.unwritten[message.id] = message
            return
        self.unwritten.pop(message.id, None)
        self._finish_if_done(message)

    def _finish_if_done(self, message: QueuedMessage) -> None:
        if message.pending or any(k[0] == message.id for k in self.in_flight):
            return
        try:
            self.queue.remove(message.id)
        except QueueError:
            pass
        except OSError:
            # Tried again at the next poll (see _reload).
            log.failure("cannot remove {id}", id=message.id)

    def _expire(self, message: QueuedMessage, now: float) -> None:
        if any(k[0] == message.id for k in self.in_flight):
            return
        failed = []
        for r in message.pending:
            reason = r.reason or "no delivery attempt succeeded"
            failed.append(
                (
                    r.address,
                    "4.4.7",
                    f"delivery time expired; last error: {reason}",
                    r.remote_mta,
                )
            )
            message = message.with_recipient(
                attrs.evolve(r, state=RecipientStatus.FAILED, status_code="4.4.7")
            )
            self.stats["deliveries"]["expired"] += 1
        if failed:
            log.warn(  # noqa: G010 - twisted.logger has warn, not warning
                "message {id} expired for {count} recipient(s)",
                id=message.id,
                count=len(failed),
            )
        self._commit(message, failed)

    def _send_dsn(
        self, message: QueuedMessage, failed: list[tuple[str, str, str, str | None]]
    ) -> bool:
        """Queue a DSN about C{failed} if the sender gets one; C{False} if that failed."""
        if not needs_dsn(message.sender):
            log.info("no DSN for {id}: null sender", id=message.id)
            return True
        try:
            with self.queue.open_body(message.id) as body:
                headers = read_headers(body)
        except (QueueError, OSError):
            headers = b""
        dsn = build_dsn(
            message,
            failed,
            self.settings.reporting_mta,
            kind="failed",
            original_headers=headers,
            date=float(self.clock.seconds()),
        )
        try:
            queued = self.queue.enqueue(
                "", [message.sender], dsn
            )  # null sender, RFC 3464 §1
        except (QueueError, OSError) as e:
            log.error(
                "cannot queue DSN for {id} to <{sender}>: {error}",
                id=message.id,
                sender=message.sender,
                error=str(e),
            )
            return False
        self.stats["dsn_queued"] += 1
        log.info(
            "DSN {dsn} queued to <{sender}> for {id}",
            dsn=queued.id,
            sender=message.sender,
            id=message.id,
        )
        return True
