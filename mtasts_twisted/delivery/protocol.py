"""
The SMTP client's wire protocol (RFC 5321), below any MTA-STS decision.

  - L{ClientProtocol}: the client side of one connection; parses replies
    (L{Reply}) and hands them to the session coroutine, one L{Deferred}
    per expected reply.
  - L{parse_ehlo}: the extensions an EHLO reply lists.
  - L{DataEncoder}: message bytes → DATA content (CRLF line ends,
    dot-stuffing), chunk by chunk.
  - L{wire_address}: an address in the form sent in MAIL and RCPT
    (L{Path}), and whether it needs C{SMTPUTF8}.

The dialogue that drives a L{ClientProtocol} (greeting, EHLO, STARTTLS,
one transaction, QUIT) is L{mtasts_twisted.delivery.dialogue}.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, cast

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, ITLSTransport
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from mtasts_twisted.delivery.mailbox import MailboxError, parse_mailbox, quote_local_part
from mtasts_twisted.policy import DomainError, to_alabel

__all__ = [
    "ClientProtocol",
    "Clock",
    "DataEncoder",
    "Path",
    "Reply",
    "SessionError",
    "parse_ehlo",
    "wire_address",
]


class Clock(Protocol):
    """
    What delivery uses of an C{IReactorTime} (the reactor, or a
    C{task.Clock} in tests): every timeout and age runs on it.
    """

    def seconds(self) -> float:
        """The current time in seconds."""

    def callLater(
        self, delay: float, callable: Callable[..., Any], /, *args: object, **kwargs: object
    ) -> IDelayedCall:
        """Call C{callable(*args, **kwargs)} after C{delay} seconds."""


class DataEncoder:
    """
    Turns message bytes into DATA content: CRLF line ends (a bare CR or LF
    becomes CRLF, RFC 5321 §2.3.8) and dot-stuffing (§4.5.2), across
    chunk boundaries.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._pending_cr = False

    def encode(self, chunk: bytes) -> bytes:
        """Encode the next chunk."""
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            # It may be the first half of a CRLF split between chunks.
            self._pending_cr = True
            chunk = chunk[:-1]
        if not chunk:
            return b""
        chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        chunk = chunk.replace(b"\r\n.", b"\r\n..")
        if self._line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        self._line_start = chunk.endswith(b"\r\n")
        return chunk

    def finish(self) -> bytes:
        """The rest of the content and the end-of-data indication."""
        tail = b""
        if self._pending_cr:
            self._pending_cr = False
            tail = b"\r\n"
            self._line_start = True
        if not self._line_start:
            tail += b"\r\n"
        return tail + b".\r\n"


@attrs.frozen
class Reply:
    """
    One SMTP reply (RFC 5321 §4.2).

    @ivar code: the three-digit reply code.
    @ivar lines: the text of each line, after the code and separator.
    """

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The non-empty lines, joined with C{" / "}."""
        return " / ".join(line for line in self.lines if line)

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()

    @property
    def kind(self) -> int:
        """The first digit: 2 success, 3 intermediate, 4 transient, 5 permanent."""
        return self.code // 100


class SessionError(Exception):
    """
    One session ended without deciding the pending recipients.

    @ivar code: the reply code that ended it, or L{None}.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ClientProtocol(LineReceiver):
    """
    The client side of one SMTP connection: parses replies and hands them
    to the session coroutine, one L{Deferred} per expected reply.

    @ivar closed: fires (with L{None}) when the connection is lost.
    @ivar switching: set before sending STARTTLS: the reply must be the
        last input before the handshake.
    @ivar injected: input that followed the reply to STARTTLS in plaintext.
    @ivar parked_hook: set while the session is parked for reuse: called
        (once) when anything arrives or the connection is lost meanwhile.
    """

    delimiter = b"\r\n"
    #: RFC 5321 §4.5.3.1.5 limits reply lines to 512 octets; allow slack.
    MAX_LENGTH = 8192
    #: Lines of one (multiline) reply at most: RFC 5321 sets no limit, so
    #: without one a server sending endless continuation lines would grow
    #: memory until the reply timeout.  Real replies have a few dozen.
    MAX_REPLY_LINES = 200

    def __init__(self, clock: Clock) -> None:
        """
        @param clock: runs the reply timeouts.
        """
        self._clock = clock
        self._lines: list[str] = []
        self._replies: collections.deque[Reply] = collections.deque()
        self._waiter: Deferred[Reply] | None = None
        self._error: SessionError | None = None
        self.closed: Deferred[None] = Deferred()
        self.switching = False
        self.injected = b""
        self.parked_hook: Callable[[], None] | None = None

    @property
    def tls_transport(self) -> ITLSTransport:
        """
        The connection's transport, which (a TCP connection made by
        L{mtasts_twisted.delivery.Deliverer}) can also abort and start TLS.
        """
        assert self.transport is not None
        return cast(ITLSTransport, self.transport)

    @property
    def gone(self) -> bool:
        """Whether the connection is lost or being aborted."""
        return self._error is not None

    @property
    def error(self) -> SessionError | None:
        """Why the connection is lost or being aborted, or L{None}."""
        return self._error

    @property
    def idle(self) -> bool:
        """
        Whether the session is between commands with nothing unread: no
        reply awaited, queued or half received.  Only such a session may be
        parked; anything else means client and server are out of step.
        """
        return (
            self._error is None
            and self._waiter is None
            and not self._replies
            and not self._lines
            and not self._buffer
            and not self.switching
            and not self.closed.called
        )

    def dataReceived(self, data: bytes) -> None:
        hook = self.parked_hook
        if hook is not None:
            # RFC 5321 has no unsolicited replies except a 421 before the
            # server closes (§3.8): whatever it is, the parked session is
            # not reused (and the input is not read as a later reply).
            self.parked_hook = None
            self.drop(SessionError("input from the server while the session was idle"))
            hook()
            return
        super().dataReceived(data)

    def drop(self, error: SessionError) -> None:
        """Mark the session unusable (its close then skips QUIT)."""
        if self._error is None:
            self._error = error

    def lineReceived(self, line: bytes) -> None:
        if self._error is not None:
            return  # expired or lost: the rest of the buffered input is not read
        code = line[:3]
        separator = line[3:4]
        if len(code) < 3 or not code.isdigit() or separator not in (b"", b" ", b"-"):
            self.expire(SessionError(f"malformed reply line {line[:80]!r}"))
            return
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if separator == b"-":
            if len(self._lines) >= self.MAX_REPLY_LINES:
                self.expire(SessionError(f"reply has too many lines (over {self.MAX_REPLY_LINES})"))
            return
        reply = Reply(int(code), tuple(self._lines))
        self._lines = []
        if self.switching:
            # RFC 3207 §4: TLS starts right after the 220; anything the
            # server (or a man in the middle) sent after it in plaintext
            # must not be read as if it came under TLS.
            self.switching = False
            self.injected = self.clearLineBuffer()
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(reply)
        else:
            self._replies.append(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.expire(SessionError("reply line too long"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._error is None:
            self._error = SessionError(f"connection lost: {reason.getErrorMessage()}")
        self._fail_waiter()
        self.closed.callback(None)
        hook, self.parked_hook = self.parked_hook, None
        if hook is not None:
            hook()

    def expire(self, error: SessionError) -> None:
        """End the session now with C{error} (timeouts, protocol errors)."""
        if self._error is None:
            self._error = error
        self._fail_waiter()
        if self.transport is not None and not self.closed.called:
            self.tls_transport.abortConnection()

    def _fail_waiter(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and self._error is not None:
            waiter.errback(SessionError(str(self._error), self._error.code))

    def reply(self, timeout: float, what: str) -> Deferred[Reply]:
        """
        Wait for the next reply, at most C{timeout} seconds.

        @param what: the command it answers, for the timeout message.
        """
        if self._replies:
            return succeed(self._replies.popleft())
        if self._error is not None:
            return fail(SessionError(str(self._error), self._error.code))
        waiter: Deferred[Reply] = Deferred()
        self._waiter = waiter
        call = self._clock.callLater(
            timeout, self.expire, SessionError(f"no reply to {what} within {timeout:g} s")
        )

        def done(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        return waiter.addBoth(done)

    def send_group(self, lines: list[bytes]) -> None:
        """
        Send several command lines in one write (RFC 2920 pipelining); read
        their replies, in order, with L{reply}.
        """
        if self._error is None:
            assert self.transport is not None
            self.transport.write(b"".join(line + b"\r\n" for line in lines))

    def command(self, line: bytes, timeout: float) -> Deferred[Reply]:
        """Send one command line and wait for its reply."""
        what = line.split(b" ", 1)[0].split(b":", 1)[0].decode("ascii", "replace")
        if self._error is None:
            self.sendLine(line)
        return self.reply(timeout, what)


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """The EHLO keywords (upper case) and their parameters (RFC 5321 §4.1.1.1)."""
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


class Path(NamedTuple):
    """
    An address as sent in MAIL FROM or RCPT TO (RFC 5321 §4.1.2).

    @ivar address: the octets between C{<} and C{>}.
    @ivar smtputf8: whether it needs the server's C{SMTPUTF8} (RFC 6531).
    """

    address: bytes
    smtputf8: bool


def wire_address(address: str) -> Path:
    """
    The address as sent in MAIL/RCPT and whether it needs SMTPUTF8.

    C{address} is an RFC 5321 mailbox (L{mtasts_twisted.delivery.mailbox}),
    as a queue envelope holds it: a quoted local part is sent quoted (with
    the least quoting, RFC 5321 §4.1.2), an address literal as written.

    @raise ValueError: for an address that cannot be sent (no RFC 5321
        mailbox, a control character, a local part over 64 octets).
    """
    if address == "":
        return Path(b"", False)  # the null reverse-path, RFC 5321 §4.5.5
    try:
        mailbox = parse_mailbox(address)
    except MailboxError as e:
        raise ValueError(f"invalid address {address!r}: {e}") from None
    local = quote_local_part(mailbox.local)
    if mailbox.is_literal:
        return Path(f"{local}@{mailbox.domain}".encode("utf-8"), not local.isascii())
    if local.isascii():
        # RFC 6531 §3.2: an ASCII local part with an IDN domain is sent
        # with the domain in A-labels and needs no SMTPUTF8.
        try:
            return Path(f"{local}@{to_alabel(mailbox.domain)}".encode("ascii"), False)
        except DomainError as e:
            raise ValueError(f"invalid domain in {address!r}: {e}") from None
    # RFC 6531 §3.2: the whole mailbox in UTF-8, under SMTPUTF8.
    return Path(f"{local}@{mailbox.domain}".encode("utf-8"), True)
