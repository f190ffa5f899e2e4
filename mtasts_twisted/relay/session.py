"""
One SMTP session of the relay's intake as a connection
(L{IntakeSession}): who may open one, how long it may last, and how its
input is read.  The commands said in it are L{RelaySMTP
<mtasts_twisted.relay.intake.RelaySMTP>}, a subclass.

  - Only clients in C{allowed_networks} (default: loopback) may connect;
    anyone else gets C{554 5.7.1} as the greeting and is disconnected
    (RFC 5321 §3.1) — never an open relay.  No AUTH: access is by network
    only.
  - Limits: connections per client and in total (C{421 4.7.0} beyond;
    every loopback address, 127.0.0.0/8 and ::1, is one client), idle
    timeout per command/line (C{421}, RFC 5321 §4.5.3.2.7), a maximum
    session time (C{421}).
  - Lines: CRLF ends a line (twisted.mail's C{LineOnlyReceiver}); a bare
    LF or CR is kept as data inside the line, so only CRLF.CRLF ends the
    DATA (no SMTP smuggling); the deliverer turns bare line ends into CRLF
    and dot-stuffs after that.  A line over C{max_line_length} gets
    C{500 5.5.2} and the connection is closed (resynchronising a DATA
    stream after a dropped partial line is not safe).  A control character
    in any command (a bare CR or LF, NUL, TAB) is C{501 5.5.2}
    (L{mtasts_twisted.relay.commands.check_line}); a command word that is
    not ASCII is an unknown command.
  - Pipelining (RFC 2920): while the end of a message's data is being
    committed, the lines after it wait unprocessed, so replies stay in
    order; what came in plaintext with STARTTLS is never run under TLS
    (RFC 3207 §5).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from typing import Protocol, cast

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.mail.smtp import ESMTP
from twisted.python.failure import Failure

from mtasts_twisted.relay.commands import Refusal, check_line
from mtasts_twisted.relay.settings import RelaySettings, client_key

__all__ = ["HELD_INPUT_MAX", "IntakeFactory", "IntakeSession"]

# The intake's events keep the namespace they had before this module was split off.
log = Logger(namespace="mtasts_twisted.relay.intake")

#: Octets of input kept while an end of data is committed before reading
#: stops (a pipelining client's next commands are far less).
HELD_INPUT_MAX = 64 * 1024


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


class IntakeFactory(Protocol):
    """
    What a session uses of its factory
    (L{RelaySMTPFactory<mtasts_twisted.relay.intake.RelaySMTPFactory>}):
    the settings, the clock and the connection counts.
    """

    settings: RelaySettings
    clock: IReactorTime
    #: SMTP connections open now.
    connections: int
    #: Open connections per client (L{client_key}).
    per_ip: Counter[str]

    def lost(self, proto: IntakeSession) -> None:
        """C{proto}'s connection has ended: stop tracking it."""


class IntakeSession(ESMTP):
    """
    The connection side of the relay's ESMTP server (see the module
    docstring): admission, limits, timers and the reading of lines.
    """

    factory: IntakeFactory
    #: The client's key in C{factory.per_ip} (L{client_key}), once counted.
    _counted_ip: str | None = None
    #: The client's IP address, as C{ipaddress} writes it.
    _client_ip = "0.0.0.0"
    _session_call: IDelayedCall | None = None
    _refused = False
    #: STARTTLS was just answered: the rest of this read is plaintext.
    _plaintext_dropped = False
    #: Lines received while an end of data is being committed (None: none is).
    _held: list[bytes] | None = None
    #: Octets in C{_held}; past L{HELD_INPUT_MAX} reading stops.
    _held_size = 0
    #: Reading stopped because too much arrived while held.
    _held_paused = False

    @property
    def _connection(self) -> _Connection:
        # While connected, the transport is a TCP (or TLS) connection.
        return cast(_Connection, self.transport)

    def hold_input(self) -> None:
        """
        Keep further lines unprocessed until the end of data being
        committed is answered: a pipelining client (RFC 2920) must get its
        replies in order, and twisted.mail's server would otherwise answer
        the next MAIL before the dot.  Reading stops only once more than
        L{HELD_INPUT_MAX} octets are held.
        """
        if self._held is None:
            self._held = []
            self._held_size = 0
            # Reading goes on: a pipelining client sends its next few
            # commands meanwhile, kept here.  Only a client that sends more
            # than HELD_INPUT_MAX is stopped (stopping and restarting every
            # connection's reading for each message cost two epoll changes
            # per message; bench/RESULTS.md, issue 19).

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
            self._held_size += len(line) + 2
            if self._held_size > HELD_INPUT_MAX and not self._held_paused and self.transport is not None:
                self._held_paused = True
                self._connection.pauseProducing()
            return None
        return ESMTP.lineReceived(self, line)

    def _release_input(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        if self._held_paused:
            self._held_paused = False
            self._connection.resumeProducing()
        tls = self.startedTLS
        held.reverse()  # taken from the end: up to HELD_INPUT_MAX of lines
        while held and not self._connection.disconnecting:
            self.lineReceived(held.pop())
            if self.startedTLS and not tls:
                # Sent in the clear before the handshake: never treat it as
                # protected (RFC 3207 §4.2; no command injection).
                return
            if self._held is not None:
                held.reverse()
                self._held[:0] = held  # another dot is being committed
                self._held_size += sum(len(line) + 2 for line in held)
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
        self.factory.lost(self)

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
