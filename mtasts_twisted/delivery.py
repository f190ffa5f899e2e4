"""
Outbound delivery that enforces MTA-STS: MX list → policy filter → ESMTP
with STARTTLS → a per-recipient outcome plus TLSRPT results.

A relay hands every message to L{Deliverer.deliver} (or the one-off
L{deliver}), once per recipient domain::

    deliverer = Deliverer(reactor, resolver, cache, trust_root=None, sink=sink)
    result = await deliverer.deliver("alice@example.org",
                                     ["bob@example.com", "carol@example.com"],
                                     open("message.eml", "rb"))
    for outcome in result.outcomes:
        print(outcome.recipient, outcome.status.name, outcome.code, outcome.message)

What it does (RFC 8461 §4–§5, RFC 5321 §5):

  1. Looks the recipient domain's policy up in the L{PolicyCache}; a
     temporary lookup failure makes every recipient L{Status.TRANSIENT}.
  2. Looks up the MX hosts with our resolver (never the system's
     C{getaddrinfo}): by preference, shuffled within one preference
     (RFC 5321 §5.1), the implicit MX, a null MX (RFC 7505) → permanent.
  3. Per MX host, per address (IPv6 first, then IPv4; both capped), one
     connection to the address itself: greeting, EHLO, STARTTLS, EHLO again,
     one transaction (MAIL, one RCPT per recipient, DATA) for every
     recipient still pending, QUIT (or a parked session first, see
     "Session reuse").
  4. Policy C{enforce}: MX hosts outside the policy are skipped; STARTTLS
     is required and the certificate must verify (L{VerifyMode.VERIFY}:
     the handshake is aborted otherwise, so nothing of the message is
     ever sent in plaintext or over unverified TLS).  When every host
     fails, recipients are L{Status.TRANSIENT}, never permanent before a
     fresh policy check (RFC 8461 §5.1).  Policy C{testing}: the same
     checks in L{VerifyMode.RECORD_ONLY}; failures are reported and
     delivery goes on.  No policy or mode C{none}: opportunistic STARTTLS.

Opportunistic fallback (never under C{enforce}): a refused STARTTLS
(e.g. 454) goes on in plaintext on the same connection (RFC 3207 §4 leaves
that to the client); a failed TLS handshake is retried once on a new
connection to the same address without STARTTLS.

TLSRPT accounting (RFC 8460 §4): the results are the lookup's result
(first, as given) and one L{Result} per I{TLS negotiation}:

  - Under an C{sts} policy (C{enforce}, C{testing}): every session that
    reached the STARTTLS decision counts once: success when TLS was
    negotiated with a verified certificate, else a failure
    (C{starttls-not-supported}, the certificate's failure per
    L{TLSOutcome.classify}, or for an MX host outside the policy
    C{validation-failure}/C{mtasts-policy-mx-mismatch}, which wins over a
    TLS failure in C{testing}).  A host skipped under C{enforce} for not
    matching counts as one failure (no C{receiving-ip}).
  - Without a policy, or in mode C{none} (reported as
    C{no-policy-found}): a session whose TLS handshake completed counts as
    a success, verified or not (no policy asked for verification); a
    failed handshake counts as a failure; a session without TLS (STARTTLS
    not offered or refused) is not counted at all — there was no TLS
    negotiation to report, and no policy that required one.
  - Sessions that ended before the STARTTLS decision (connection refused,
    timeout, a 4xx/5xx greeting or EHLO) are not counted: RFC 8460 has no
    result type for them and they say nothing about TLS.  The plaintext
    retry after a failed handshake is not counted either (its handshake
    already was).

Session reuse (connection caching; off unless
L{DeliverySettings.reuse_idle_time} is set): after a transaction whose
replies are all in, a session that negotiated TLS is parked instead of
closed, for at most C{reuse_idle_time} seconds, C{reuse_max_transactions}
transactions and C{reuse_max_age} seconds after connecting (Postfix:
C{smtp_connection_cache_time_limit}, C{smtp_connection_reuse_count_limit},
C{smtp_connection_reuse_time_limit}).  A later delivery reuses it only
when that is exactly as safe as a new session:

  - the same policy domain, MX host and port, and the same policy (mode,
    MX patterns, policy text, TXT id): a changed policy never inherits a
    session checked against the old one, and a C{testing} session never
    carries C{enforce} mail;
  - under C{enforce}, only a session verified with verification required
    (its handshake would have been aborted otherwise) to a host the
    policy lists;
  - the host is one the MX loop reaches in its normal order (a parked
    session may only move its host first among hosts of equal
    preference), at one of the addresses it would try; plaintext
    sessions and the plaintext retry are never kept.

A parked session is probed with RSET (RFC 5321 §4.1.1.5) before reuse;
anything from the server while parked (a 421, §3.8), a lost connection, a
failed RSET or a failure before the end of data leave the recipients
pending for a new connection as if there had been no parked session (no
TLSRPT result, no error in the outcome).  A reused session adds no TLSRPT
result: RFC 8460 §4 counts TLS sessions, and it was counted once when it
was negotiated.  L{Deliverer.close} (the relay's C{stopService}) says QUIT
to the parked sessions.

Replies: a 5xx to RCPT makes that recipient L{Status.PERMANENT}, a 4xx
L{Status.TRANSIENT}; accepted recipients go on to DATA in the same
transaction, and the reply to the final dot decides them.  A 4xx/5xx
greeting or EHLO, a 4xx to MAIL, a lost connection or a timeout before the
final dot move on to the next address / MX host.  A 5xx to MAIL or DATA is
permanent for every recipient of the transaction.  A connection lost after
the final dot was sent is transient and not retried elsewhere in this call
(the message may have been delivered, RFC 1047).  Under C{enforce} none of
these replies is ever read from a host whose certificate did not verify.

Messages: the file is scanned once in chunks before delivery (size for
C{SIZE}, RFC 1870, and whether it has 8-bit bytes), then streamed with
L{FileSender}, line ends normalised to CRLF and dot-stuffed (RFC 5321
§4.5.2).  It is never read whole into memory.  8-bit data needs the
server's C{8BITMIME} (sent as C{BODY=8BITMIME}, RFC 6152); otherwise the
recipients are L{Status.PERMANENT} (C{5.6.3}) — no downgrade to 7 bit is
attempted.  An address with a non-ASCII local part needs C{SMTPUTF8}
(RFC 6531); without it that address is L{Status.PERMANENT} (C{5.6.7}).
A non-ASCII domain in an address with an ASCII local part is sent as
A-labels and needs nothing.

Outcomes decided here rather than by a server reply (null MX, no such
domain, missing 8BITMIME, all hosts failed, ...) have C{code} L{None} and
a message starting with an RFC 3463 enhanced status code.

Why not twisted.mail's C{ESMTPSender}: it sends no C{BODY=}, C{SMTPUTF8}
or C{SIZE} parameters, fails the whole send on a 4xx/5xx to MAIL or DATA
without telling which stage, has no session timeout, needs a reconnect
after a 454 to STARTTLS, and its Deferred needs help to fire on TLS
failures when connected through endpoints (DESIGN.md).  The client here is
a small L{LineReceiver} driven by one coroutine per session.
"""

from __future__ import annotations

import collections
import enum
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import FileSender, LineReceiver
from twisted.python.failure import Failure

from mtasts_twisted.cache import PolicyLookupTemporaryError
from mtasts_twisted.dns import DNSError, DNSNoRecordError, MXHost
from mtasts_twisted.policy import DomainError, Mode, Policy, to_alabel
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, Result, ResultType
from mtasts_twisted.sessions import SessionPool
from mtasts_twisted.tls import (
    MXTLSOptionsCache,
    VerifyMode,
    load_trust_root,
    mx_mismatch_details,
    starttls_not_supported_details,
)

__all__ = [
    "Deliverer",
    "DeliveryResult",
    "DeliverySettings",
    "MessageInfo",
    "RecipientOutcome",
    "Status",
    "deliver",
    "order_mx_hosts",
    "scan_message",
]

log = Logger()

#: Bytes read from the message file at a time (scan and send).
CHUNK_SIZE = 64 * 1024
#: Longest wait for the reply to QUIT (RFC 5321 §4.5.3.2 sets none).
QUIT_TIMEOUT = 10.0
#: Longest wait for a closed connection to be gone before aborting it.
CLOSE_TIMEOUT = 5.0
#: Errors of failed attempts kept for a transient outcome's message.
MAX_ERRORS_SHOWN = 4
#: Longest wait for the reply to the RSET that probes a parked session
#: before reuse (RFC 5321 §4.5.3.2 sets none; Postfix's smtp_rset_timeout).
RSET_TIMEOUT = 20.0


class Status(enum.Enum):
    """
    What became of one recipient.

    @cvar DELIVERED: the receiving server accepted the message (2xx to the
        final dot).
    @cvar TRANSIENT: not delivered now; try again later (4xx-class).
    @cvar PERMANENT: will never be delivered as is; bounce (5xx-class).
    """

    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@attrs.frozen
class DeliverySettings:
    """
    How L{Deliverer} talks to MX hosts.

    @ivar helo_name: the name sent with EHLO (and HELO).
    @ivar port: the SMTP port of every MX host (25; tests use the test
        server's ephemeral port).
    @ivar port_for: ports by MX host name (lower-case A-labels, as the
        resolver returns them), overriding C{port};
        for tests where several servers share 127.0.0.1, and for setups
        with non-standard ports.
    @ivar connect_timeout: seconds to wait for a TCP connection.
    @ivar reply_timeout: seconds to wait for each reply (RFC 5321
        §4.5.3.2 suggests 5 minutes and more; one value for all here).
    @ivar session_timeout: seconds one connection may last in total.
    @ivar max_mx_hosts: MX hosts tried at most, by preference.
    @ivar max_addresses_per_host: addresses of one MX host tried at most.
    @ivar reuse_idle_time: seconds a session is kept open for reuse after
        a transaction (like Postfix's C{smtp_connection_cache_time_limit});
        C{0} (the default here) closes every session with QUIT.  A
        L{Deliverer} that reuses sessions must be closed
        (L{Deliverer.close}); the relay sets 2 s.  See "Session reuse" in
        the module docstring.
    @ivar reuse_max_transactions: transactions one session carries at most.
    @ivar reuse_max_age: seconds after connecting when a session is no
        longer reused.
    @ivar reuse_max_idle_sessions: sessions kept open for reuse at most, for
        all destinations together (the oldest is closed first).
    """

    helo_name: str = "localhost"
    port: int = 25
    connect_timeout: float = 30.0
    reply_timeout: float = 300.0
    session_timeout: float = 900.0
    max_mx_hosts: int = 10
    max_addresses_per_host: int = 4
    port_for: Mapping[str, int] = attrs.field(factory=dict, hash=False)
    reuse_idle_time: float = 0.0
    reuse_max_transactions: int = 100
    reuse_max_age: float = 300.0
    reuse_max_idle_sessions: int = 50

    def port_of(self, host: str) -> int:
        """The port to connect to on MX host C{host}."""
        return self.port_for.get(host, self.port)


@attrs.frozen
class RecipientOutcome:
    """
    The outcome of delivery for one recipient.

    @ivar recipient: the address as given to L{Deliverer.deliver}.
    @ivar status: a L{Status}.
    @ivar code: the SMTP reply code that decided it, or L{None} when the
        decision was ours (then C{message} starts with an RFC 3463 code).
    @ivar message: a human-readable reason, or the server's reply text.
    @ivar mx_host: the MX host that decided it (or the last one tried).
    @ivar tls_version: e.g. C{"TLSv1.3"} when that session used TLS.
    @ivar verified: whether that session's certificate verified (PKIX and
        the MX host name, RFC 8461 §4.1).
    """

    recipient: str
    status: Status
    code: int | None
    message: str
    mx_host: str | None
    tls_version: str | None
    verified: bool


@attrs.frozen
class DeliveryResult:
    """
    What L{Deliverer.deliver} did for one recipient domain.

    @ivar domain: the recipient domain in A-labels.
    @ivar policy_mode: the policy's L{Mode}, or L{None} without a policy.
    @ivar outcomes: one L{RecipientOutcome} per recipient, in the order given.
    @ivar results: the TLSRPT results: the policy lookup's first, then one
        per TLS negotiation (see the module docstring).
    """

    domain: str
    policy_mode: Mode | None
    outcomes: tuple[RecipientOutcome, ...]
    results: tuple[Result, ...]

    def outcome(self, recipient: str) -> RecipientOutcome:
        """The outcome for C{recipient} (as given)."""
        for outcome in self.outcomes:
            if outcome.recipient == recipient:
                return outcome
        raise KeyError(recipient)


@attrs.frozen
class MessageInfo:
    """
    What L{scan_message} found out about a message file.

    @ivar start: the file position the message starts at.
    @ivar size: its size in octets (as stored; the CRLF form may differ).
    @ivar eight_bit: whether it has any octet above 127.
    """

    start: int
    size: int
    eight_bit: bool


def scan_message(message: BinaryIO) -> MessageInfo:
    """
    Read a message file once, in chunks, from its current position, and
    seek back there.

    @param message: a seekable binary file.
    """
    start = message.tell()
    size = 0
    eight_bit = False
    while True:
        chunk = message.read(CHUNK_SIZE)
        if not chunk:
            break
        size += len(chunk)
        if not eight_bit and not chunk.isascii():
            eight_bit = True
    message.seek(start)
    return MessageInfo(start, size, eight_bit)


def order_mx_hosts(hosts: Sequence[MXHost], rng: random.Random | Any = random) -> list[MXHost]:
    """
    Order MX hosts by preference, shuffling hosts of equal preference
    (RFC 5321 §5.1).

    @param rng: has C{shuffle}; the C{random} module by default.
    """
    groups: dict[int, list[MXHost]] = collections.defaultdict(list)
    for host in hosts:
        groups[host.preference].append(host)
    ordered: list[MXHost] = []
    for preference in sorted(groups):
        group = sorted(groups[preference])
        rng.shuffle(group)
        ordered.extend(group)
    return ordered


class _DataEncoder:
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
class _Reply:
    """One SMTP reply (RFC 5321 §4.2)."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " / ".join(line for line in self.lines if line)

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()

    @property
    def kind(self) -> int:
        return self.code // 100


class _SessionError(Exception):
    """One session ended without deciding the pending recipients."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class _ClientProtocol(LineReceiver):
    """
    The client side of one SMTP connection: parses replies and hands them
    to the session coroutine, one L{Deferred} per expected reply.
    """

    delimiter = b"\r\n"
    #: RFC 5321 §4.5.3.1.5 limits reply lines to 512 octets; allow slack.
    MAX_LENGTH = 8192
    #: Lines of one (multiline) reply at most: RFC 5321 sets no limit, so
    #: without one a server sending endless continuation lines would grow
    #: memory until the reply timeout.  Real replies have a few dozen.
    MAX_REPLY_LINES = 200

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._lines: list[str] = []
        self._replies: collections.deque[_Reply] = collections.deque()
        self._waiter: Deferred[_Reply] | None = None
        self._error: _SessionError | None = None
        self.closed: Deferred[None] = Deferred()
        #: Set before sending STARTTLS: the reply must be the last input
        #: before the handshake.
        self.switching = False
        #: Input that followed the reply to STARTTLS in plaintext.
        self.injected = b""
        #: Set while the session is parked for reuse: called (once) when
        #: anything arrives or the connection is lost meanwhile.
        self.parked_hook: Callable[[], None] | None = None

    @property
    def gone(self) -> bool:
        """Whether the connection is lost or being aborted."""
        return self._error is not None

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
            self.drop(_SessionError("input from the server while the session was idle"))
            hook()
            return
        super().dataReceived(data)

    def drop(self, error: _SessionError) -> None:
        """Mark the session unusable (its close then skips QUIT)."""
        if self._error is None:
            self._error = error

    def lineReceived(self, line: bytes) -> None:
        if self._error is not None:
            return  # expired or lost: the rest of the buffered input is not read
        code = line[:3]
        separator = line[3:4]
        if len(code) < 3 or not code.isdigit() or separator not in (b"", b" ", b"-"):
            self.expire(_SessionError(f"malformed reply line {line[:80]!r}"))
            return
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if separator == b"-":
            if len(self._lines) >= self.MAX_REPLY_LINES:
                self.expire(_SessionError(f"reply has too many lines (over {self.MAX_REPLY_LINES})"))
            return
        reply = _Reply(int(code), tuple(self._lines))
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
        self.expire(_SessionError("reply line too long"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._error is None:
            self._error = _SessionError(f"connection lost: {reason.getErrorMessage()}")
        self._fail_waiter()
        self.closed.callback(None)
        hook, self.parked_hook = self.parked_hook, None
        if hook is not None:
            hook()

    def expire(self, error: _SessionError) -> None:
        """End the session now with C{error} (timeouts, protocol errors)."""
        if self._error is None:
            self._error = error
        self._fail_waiter()
        if self.transport is not None and not self.closed.called:
            self.transport.abortConnection()

    def _fail_waiter(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and self._error is not None:
            waiter.errback(_SessionError(str(self._error), self._error.code))

    def reply(self, timeout: float, what: str) -> Deferred[_Reply]:
        """
        Wait for the next reply, at most C{timeout} seconds.

        @param what: the command it answers, for the timeout message.
        """
        if self._replies:
            return succeed(self._replies.popleft())
        if self._error is not None:
            return fail(_SessionError(str(self._error), self._error.code))
        waiter: Deferred[_Reply] = Deferred()
        self._waiter = waiter
        call = self._clock.callLater(
            timeout, self.expire, _SessionError(f"no reply to {what} within {timeout:g} s")
        )

        def done(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        return waiter.addBoth(done)

    def command(self, line: bytes, timeout: float) -> Deferred[_Reply]:
        """Send one command line and wait for its reply."""
        what = line.split(b" ", 1)[0].split(b":", 1)[0].decode("ascii", "replace")
        if self._error is None:
            self.sendLine(line)
        return self.reply(timeout, what)


def _parse_ehlo(reply: _Reply) -> dict[str, str]:
    """The EHLO keywords (upper case) and their parameters (RFC 5321 §4.1.1.1)."""
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


def _wire_address(address: str) -> tuple[bytes, bool]:
    """
    The address as sent in MAIL/RCPT and whether it needs SMTPUTF8.

    @raise ValueError: for an address that cannot be sent.
    """
    if any(c in address for c in "<>\r\n\0") or address != address.strip() or " " in address:
        raise ValueError(f"invalid address {address!r}")
    if address == "":
        return b"", False  # the null reverse-path, RFC 5321 §4.5.5
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise ValueError(f"address without local part or domain: {address!r}")
    if local.isascii():
        # RFC 6531 §3.2: an ASCII local part with an IDN domain is sent
        # with the domain in A-labels and needs no SMTPUTF8.
        try:
            return f"{local}@{to_alabel(domain)}".encode("ascii"), False
        except DomainError as e:
            raise ValueError(f"invalid domain in {address!r}: {e}") from None
    return address.encode("utf-8"), True


@attrs.frozen
class _Plan:
    """The policy decisions for one delivery."""

    domain: str
    policy: Policy | None
    descriptor: PolicyDescriptor
    record_id: str | None = None

    @property
    def mode(self) -> Mode | None:
        return self.policy.mode if self.policy is not None else None

    @property
    def enforce(self) -> bool:
        return self.mode is Mode.ENFORCE

    @property
    def sts(self) -> bool:
        """Is there a policy that asks for verified TLS (enforce or testing)?"""
        return self.mode in (Mode.ENFORCE, Mode.TESTING)

    def matches(self, host: str) -> bool:
        """Does MX host C{host} pass the policy (always, without an sts policy)?"""
        return not self.sts or self.policy.matches(host)  # type: ignore[union-attr]

    def reuse_key(self, host: str, port: int) -> tuple[Any, ...]:
        """
        What a parked session must have been made under to carry mail of
        this plan to C{host}: the same policy domain, MX host and port,
        and the same policy (mode, MX patterns, the policy text via the
        descriptor, and the TXT record id), so a changed policy never
        inherits a session checked against the old one.
        """
        return (self.domain, host, port, self.mode, self.policy, self.descriptor, self.record_id)


@attrs.define
class _Attempt:
    """What one session with one address of one MX host did."""

    host: str
    ip: str
    result: Result | None = None
    outcomes: dict[str, RecipientOutcome] = attrs.field(factory=dict)
    error: str | None = None
    code: int | None = None
    retry_plaintext: bool = False
    tls_version: str | None = None
    verified: bool = False

    def decide(self, recipient: str, status: Status, code: int | None, message: str) -> None:
        self.outcomes[recipient] = RecipientOutcome(
            recipient, status, code, message, self.host, self.tls_version, self.verified
        )


@attrs.define(eq=False)
class _Connection:
    """
    An open SMTP session past its (TLS) setup, as parked for reuse.

    @ivar key: its L{_Plan.reuse_key}.
    @ivar created: when it connected (the clock's seconds).
    @ivar verify_mode: the L{VerifyMode} its handshake ran under.
    @ivar extensions: the EHLO keywords after STARTTLS.
    @ivar transactions: transactions it has carried.
    """

    proto: _ClientProtocol
    timer: Any
    key: tuple[Any, ...]
    host: str
    ip: str
    created: float
    verify_mode: VerifyMode
    tls_version: str | None
    verified: bool
    extensions: dict[str, str]
    transactions: int = 0


def _status_of(reply: _Reply) -> Status:
    return Status.PERMANENT if reply.kind == 5 else Status.TRANSIENT


class Deliverer:
    """
    Delivers messages to the MX hosts of one recipient domain per call,
    enforcing the domain's MTA-STS policy (see the module docstring).
    """

    def __init__(
        self,
        reactor: Any,
        resolver: Any,
        cache: Any,
        trust_root: Any = None,
        sink: Any = None,
        settings: DeliverySettings = DeliverySettings(),
        *,
        rng: random.Random | None = None,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP} and C{IReactorTime}; all
            timeouts use its clock.
        @param resolver: an L{mtasts_twisted.interfaces.IDNSResolver}; MX
            hosts and their addresses are resolved through it only.
        @param cache: a L{mtasts_twisted.cache.PolicyCache} (anything with
            its C{get}).
        @param trust_root: the roots MX certificates must chain to: anything
            L{load_trust_root} takes (L{None}: the platform's).
        @param sink: an L{mtasts_twisted.interfaces.IResultSink} that
            records every TLSRPT result, or L{None}.
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
        self._rng: Any = rng if rng is not None else random
        self._helo = settings.helo_name.encode("ascii")
        #: QUIT-and-close of finished sessions, still running in the background.
        self._closing: set[Deferred[None]] = set()
        #: Sessions parked for reuse (None: reuse is off).
        self._pool: SessionPool[_Connection] | None = None
        if settings.reuse_idle_time > 0:
            self._pool = SessionPool(
                reactor, settings.reuse_idle_time, settings.reuse_max_idle_sessions, self._close_parked
            )
        #: Set by L{close}: sessions are no longer parked.
        self._shut = False

    def deliver(self, sender: str, recipients: Sequence[str], message: BinaryIO) -> Deferred[DeliveryResult]:
        """
        Deliver one message to recipients of one domain, in one transaction
        per session.

        @param sender: the reverse-path (C{""} for the null sender).
        @param recipients: addresses, all of the same domain; a duplicate
            is delivered (and reported) once.
        @param message: a seekable binary file holding the message (headers
            and body), from its current position; streamed, never read
            whole.  Left positioned where it started.
        @return: a L{Deferred} firing with a L{DeliveryResult}; it fails
            only with L{ValueError} for bad arguments (no recipients,
            several domains, an address literal, a malformed address) and
            with the file's L{OSError} when the message cannot be read.
        """
        return Deferred.fromCoroutine(self._deliver(sender, list(recipients), message))

    # -- one delivery --

    def _record(self, results: list[Result]) -> None:
        if self._sink is None:
            return
        for result in results:
            try:
                self._sink.record(result)
            except Exception:
                log.failure("TLSRPT sink failed to record a result")

    def _finish(
        self,
        domain: str,
        mode: Mode | None,
        recipients: list[str],
        outcomes: Mapping[str, RecipientOutcome],
        results: list[Result],
    ) -> DeliveryResult:
        self._record(results)
        result = DeliveryResult(
            domain=domain,
            policy_mode=mode,
            outcomes=tuple(outcomes[r] for r in recipients),
            results=tuple(results),
        )
        for outcome in result.outcomes:
            if outcome.status is Status.DELIVERED:
                # The caller has the result, the TLS layer logged the
                # session: no second event per delivered recipient.
                continue
            log.info(
                "{recipient}: {status} via {mx_host} ({tls}): {code} {message}",
                recipient=outcome.recipient,
                status=outcome.status.value,
                mx_host=outcome.mx_host,
                tls=(outcome.tls_version or "no TLS") + (", verified" if outcome.verified else ""),
                code=outcome.code,
                message=outcome.message,
            )
        return result

    @staticmethod
    def _all(
        recipients: list[str], status: Status, message: str, mx_host: str | None = None
    ) -> dict[str, RecipientOutcome]:
        return {r: RecipientOutcome(r, status, None, message, mx_host, None, False) for r in recipients}

    def _domain_of(self, recipients: list[str]) -> str:
        if not recipients:
            raise ValueError("no recipients")
        domains = set()
        for recipient in recipients:
            _, at, domain = recipient.rpartition("@")
            if not at:
                raise ValueError(f"recipient without a domain: {recipient!r}")
            try:
                domains.add(to_alabel(domain))
            except DomainError as e:
                # Address literals have no MTA-STS policy and no MX.
                raise ValueError(f"cannot deliver to {recipient!r}: {e}") from None
        if len(domains) != 1:
            raise ValueError(f"recipients of several domains: {sorted(domains)}")
        return domains.pop()

    async def _deliver(self, sender: str, recipients: list[str], message: BinaryIO) -> DeliveryResult:
        domain = self._domain_of(recipients)
        recipients = list(dict.fromkeys(recipients))
        addresses = {r: _wire_address(r) for r in recipients}
        reverse_path = _wire_address(sender)
        results: list[Result] = []

        try:
            lookup = await self._cache.get(domain)
        except PolicyLookupTemporaryError as e:
            results.append(e.result)
            return self._finish(
                domain,
                None,
                recipients,
                self._all(recipients, Status.TRANSIENT, f"4.4.3 MTA-STS policy lookup for {domain} failed: {e}"),
                results,
            )
        except Exception as e:
            # E.g. the store is down.  Never deliver without knowing the
            # policy (that would fail open): transient.
            log.failure("MTA-STS policy lookup for {domain} failed", domain=domain)
            return self._finish(
                domain,
                None,
                recipients,
                self._all(recipients, Status.TRANSIENT, f"4.3.0 MTA-STS policy lookup for {domain} failed: {e!r}"),
                results,
            )
        results.append(lookup.result)
        plan = _Plan(domain, lookup.policy, lookup.result.policy, getattr(lookup, "record_id", None))

        try:
            mx = await self._resolver.lookup_mx(domain)
        except DNSNoRecordError as e:
            return self._finish(
                domain,
                plan.mode,
                recipients,
                self._all(recipients, Status.PERMANENT, f"5.1.2 {domain} has no mail exchanger: {e}"),
                results,
            )
        except DNSError as e:
            return self._finish(
                domain,
                plan.mode,
                recipients,
                self._all(recipients, Status.TRANSIENT, f"4.4.3 MX lookup for {domain} failed: {e}"),
                results,
            )
        if mx.null:
            # RFC 7505 §4.2: a null MX; the bounce uses 556 5.1.10.
            return self._finish(
                domain,
                plan.mode,
                recipients,
                self._all(recipients, Status.PERMANENT, f"5.1.10 {domain} accepts no mail (null MX, RFC 7505)"),
                results,
            )

        info = scan_message(message)
        outcomes: dict[str, RecipientOutcome] = {}
        pending = list(recipients)
        errors: list[str] = []
        last_host: str | None = None
        last_code: int | None = None
        hosts = order_mx_hosts(mx.hosts, self._rng)
        if self._pool:
            # RFC 5321 §5.1 orders by preference and leaves equal ones to
            # us: among those, a host with a parked session comes first.
            # Never a less preferred host before a more preferred one.
            hosts.sort(
                key=lambda h: (h.preference, plan.reuse_key(h.host, self.settings.port_of(h.host)) not in self._pool)  # type: ignore[operator]
            )
        hosts = hosts[: self.settings.max_mx_hosts]
        try:
            for mx_host in hosts:
                if not pending:
                    break
                host = mx_host.host
                last_host = host
                if plan.enforce and not plan.matches(host):
                    # RFC 8461 §4.1: never deliver to an MX host outside an
                    # enforced policy.
                    results.append(Result(plan.descriptor, 0, [mx_mismatch_details(host)]))
                    errors.append(f"{host}: not an MX host of the MTA-STS policy")
                    continue
                try:
                    answer = await self._resolver.lookup_addresses(host)
                except DNSError as e:
                    errors.append(f"{host}: {e}")
                    continue
                ips = answer.addresses[: self.settings.max_addresses_per_host]
                while pending and self._pool:
                    # A parked session to this host, if one is exactly as
                    # good as a new one (see _take); a dead one falls back
                    # to a new connection below, unreported.
                    conn = self._take(plan, host, ips)
                    if conn is None:
                        break
                    reused = await self._reused_session(conn, plan, reverse_path, pending, addresses, message, info)
                    if reused is None:
                        continue
                    outcomes.update(reused.outcomes)
                    pending = [r for r in pending if r not in outcomes]
                    break
                for ip in ips:
                    if not pending:
                        break
                    attempt = await self._session(plan, host, ip, reverse_path, pending, addresses, message, info, True)
                    if attempt.result is not None:
                        results.append(attempt.result)
                    if attempt.retry_plaintext and not plan.enforce:
                        errors.append(f"{host} [{ip}]: {attempt.error}")
                        log.info("retrying {host} [{ip}] without STARTTLS", host=host, ip=ip)
                        attempt = await self._session(
                            plan, host, ip, reverse_path, pending, addresses, message, info, False
                        )
                    outcomes.update(attempt.outcomes)
                    pending = [r for r in pending if r not in outcomes]
                    if attempt.error is not None:
                        errors.append(f"{host} [{ip}]: {attempt.error}")
                        last_code = attempt.code
                    if not pending:
                        break
        finally:
            message.seek(info.start)

        if pending:
            shown = errors[-MAX_ERRORS_SHOWN:] or ["no MX host could be tried"]
            if plan.enforce:
                # RFC 8461 §5.1: never permanent before a fresh policy check;
                # the relay's retry looks the policy up again.
                text = f"4.7.5 no MX host of {domain} passed MTA-STS (enforce) checks and took the message: "
            else:
                text = f"4.4.1 no MX host of {domain} took the message: "
            for recipient in pending:
                outcomes[recipient] = RecipientOutcome(
                    recipient, Status.TRANSIENT, last_code, text + "; ".join(shown), last_host, None, False
                )
        return self._finish(domain, plan.mode, recipients, outcomes, results)

    # -- one session --

    def _session_result(
        self, plan: _Plan, host: str, ip: str, failure: FailureDetails | None, tls_done: bool
    ) -> Result | None:
        """The TLSRPT result of one session (see the module docstring)."""
        if plan.sts:
            if not plan.matches(host):
                return Result(plan.descriptor, 0, [mx_mismatch_details(host, ip)])
            if failure is not None:
                return Result(plan.descriptor, 0, [failure])
            return Result(plan.descriptor, 1)
        if tls_done:
            return Result(plan.descriptor, 1)
        if failure is not None and failure.result_type is not ResultType.STARTTLS_NOT_SUPPORTED:
            return Result(plan.descriptor, 0, [failure])
        return None

    async def _session(
        self,
        plan: _Plan,
        host: str,
        ip: str,
        reverse_path: tuple[bytes, bool],
        pending: list[str],
        addresses: Mapping[str, tuple[bytes, bool]],
        message: BinaryIO,
        info: MessageInfo,
        use_tls: bool,
    ) -> _Attempt:
        attempt = _Attempt(host, ip)
        proto = _ClientProtocol(self._reactor)
        endpoint_type = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
        port = self.settings.port_of(host)
        endpoint = endpoint_type(self._reactor, ip, port, timeout=self.settings.connect_timeout)
        created = self._reactor.seconds()
        try:
            await connectProtocol(endpoint, proto)
        except Exception as e:
            attempt.error = f"cannot connect to port {port}: {e}"
            return attempt
        timer = self._reactor.callLater(
            self.settings.session_timeout,
            proto.expire,
            _SessionError(f"session timed out after {self.settings.session_timeout:g} s"),
        )
        conn: _Connection | None = None
        try:
            extensions = await self._open(proto, attempt, plan, use_tls)
            conn = _Connection(
                proto,
                timer,
                plan.reuse_key(host, port),
                host,
                ip,
                created,
                VerifyMode.VERIFY if plan.enforce else VerifyMode.RECORD_ONLY,
                attempt.tls_version,
                attempt.verified,
                extensions,
            )
            await self._transaction(conn, attempt, plan, reverse_path, pending, addresses, message, info)
        except _SessionError as e:
            attempt.error = str(e)
            attempt.code = e.code
        except Exception as e:
            log.failure("SMTP session with {host} [{ip}] failed", host=host, ip=ip)
            attempt.error = f"internal error: {e!r}"
        if attempt.error is None:
            assert conn is not None
            self._release(conn, plan, use_tls)
        else:
            await self._close(proto, timer)
        return attempt

    # -- session reuse --

    def _reusable(self, conn: _Connection, plan: _Plan, use_tls: bool = True) -> bool:
        """
        May C{conn}, which just carried a transaction of C{plan} (or is
        parked under C{plan}'s key), carry the next one?
        """
        settings = self.settings
        if (
            not use_tls  # the plaintext retry: a new session tries STARTTLS first
            or conn.tls_version is None  # only sessions with TLS are kept
            or not conn.proto.idle
            or conn.transactions >= settings.reuse_max_transactions
            or self._reactor.seconds() - conn.created >= settings.reuse_max_age
            or conn.key != plan.reuse_key(conn.host, settings.port_of(conn.host))
        ):
            return False
        if plan.enforce:
            # RFC 8461 §5: only a session verified (PKIX and the MX host
            # name, §4.1) with verification required, to a host the policy
            # lists; the key's policy makes this hold already.
            return conn.verified and conn.verify_mode is VerifyMode.VERIFY and plan.matches(conn.host)
        return True

    def _release(self, conn: _Connection, plan: _Plan, use_tls: bool) -> None:
        """
        After a transaction whose replies are all in: park the session for
        reuse, or say QUIT and close it in the background.  Either way the
        outcomes are reported now, so a relay records a delivery without
        waiting for a slow peer (which would widen its window for
        duplicates after a crash).
        """
        if self._pool is not None and not self._shut and self._reusable(conn, plan, use_tls):
            conn.proto.parked_hook = lambda: self._parked_event(conn)
            self._pool.park(conn.key, conn)
        else:
            self._close_in_background(conn.proto, conn.timer)

    def _take(self, plan: _Plan, host: str, ips: Sequence[str]) -> _Connection | None:
        """
        A parked session that may carry C{plan}'s mail to C{host} now (at
        one of the addresses a new session would use), or L{None}.
        """
        assert self._pool is not None
        key = plan.reuse_key(host, self.settings.port_of(host))
        while (conn := self._pool.take(key)) is not None:
            conn.proto.parked_hook = None
            if conn.ip in ips and self._reusable(conn, plan):
                return conn
            self._close_in_background(conn.proto, conn.timer)
        return None

    async def _reused_session(
        self,
        conn: _Connection,
        plan: _Plan,
        reverse_path: tuple[bytes, bool],
        pending: list[str],
        addresses: Mapping[str, tuple[bytes, bool]],
        message: BinaryIO,
        info: MessageInfo,
    ) -> _Attempt | None:
        """
        One transaction on a parked session.  L{None} when the session
        turned out dead before the transaction began (the caller goes on
        as if it had never been parked).  A session that fails before the
        end of data leaves its undecided recipients pending for a new
        connection, like any failed session.  No TLSRPT result: RFC 8460
        §4 counts TLS sessions, and this one was counted when it was made.
        """
        proto = conn.proto
        # RFC 5321 §4.1.1.5: RSET aborts whatever the last transaction left
        # (e.g. all recipients refused) and, answered 250, shows the server
        # still has the session (Postfix probes cached sessions the same way).
        try:
            reply = await proto.command(b"RSET", min(self.settings.reply_timeout, RSET_TIMEOUT))
        except _SessionError as e:
            reply, why = None, str(e)
        else:
            why = str(reply)
        if reply is None or reply.code != 250:
            log.debug("parked session to {host} [{ip}] is gone ({why}); connecting anew",
                      host=conn.host, ip=conn.ip, why=why)
            if reply is not None:
                proto.drop(_SessionError(f"RSET: {reply}", reply.code))
            self._close_in_background(proto, conn.timer)
            return None
        log.debug(
            "reusing the session to {host} [{ip}] ({tls_version}, verified={verified}) for transaction {number}",
            host=conn.host,
            ip=conn.ip,
            tls_version=conn.tls_version,
            verified=conn.verified,
            number=conn.transactions + 1,
        )
        attempt = _Attempt(conn.host, conn.ip, tls_version=conn.tls_version, verified=conn.verified)
        try:
            await self._transaction(conn, attempt, plan, reverse_path, pending, addresses, message, info)
        except _SessionError as e:
            attempt.error = str(e)
            attempt.code = e.code
        except Exception as e:  # noqa: BLE001 - a bug here must not lose the delivery
            log.failure("SMTP session with {host} [{ip}] failed", host=conn.host, ip=conn.ip)
            attempt.error = f"internal error: {e!r}"
        if attempt.error is None:
            self._release(conn, plan, True)
        else:
            log.debug("reused session to {host} [{ip}] failed ({error}); connecting anew",
                      host=conn.host, ip=conn.ip, error=attempt.error)
            await self._close(proto, conn.timer)
        return attempt

    def _parked_event(self, conn: _Connection) -> None:
        """Input or a lost connection while parked: the session is not reused."""
        if self._pool is not None:
            self._pool.discard(conn)
        self._close_in_background(conn.proto, conn.timer)

    def _close_parked(self, conn: _Connection) -> None:
        """The pool gives C{conn} up (idle time over, pool full): QUIT."""
        conn.proto.parked_hook = None
        self._close_in_background(conn.proto, conn.timer)

    def _close_in_background(self, proto: _ClientProtocol, timer: Any) -> None:
        closing = Deferred.fromCoroutine(self._close(proto, timer))
        self._closing.add(closing)
        closing.addBoth(lambda _: self._closing.discard(closing))

    def wait_closed(self) -> Deferred[None]:
        """
        Say QUIT on every parked session, and fire when every session's
        QUIT-and-close has finished.
        """
        if self._pool is not None:
            for conn in self._pool.clear():
                self._close_parked(conn)
        return gatherResults(list(self._closing), consumeErrors=True).addCallback(lambda _: None)

    def close(self) -> Deferred[None]:
        """
        Stop keeping sessions for reuse, then L{wait_closed}.  Deliveries
        still work afterwards (and may be in flight); each of their
        sessions is closed after its transaction.
        """
        self._shut = True
        return self.wait_closed()

    async def _close(self, proto: _ClientProtocol, timer: Any) -> None:
        try:
            await self._quit(proto)
        finally:
            if timer.active():
                timer.cancel()

    async def _quit(self, proto: _ClientProtocol) -> None:
        if not proto.gone:
            try:
                await proto.command(b"QUIT", min(self.settings.reply_timeout, QUIT_TIMEOUT))
            except _SessionError:
                pass
        if not proto.closed.called:
            transport = proto.transport
            assert transport is not None
            transport.loseConnection()
            call = self._reactor.callLater(CLOSE_TIMEOUT, transport.abortConnection)
            await proto.closed
            if call.active():
                call.cancel()

    async def _ehlo(self, proto: _ClientProtocol) -> dict[str, str]:
        reply = await proto.command(b"EHLO " + self._helo, self.settings.reply_timeout)
        return await self._extensions(proto, reply, "EHLO")

    async def _extensions(self, proto: _ClientProtocol, reply: Any, what: str) -> dict[str, str]:
        """The extensions an EHLO C{reply} lists, or none after a HELO."""
        if reply.code == 250:
            return _parse_ehlo(reply)
        if reply.kind == 5:
            # RFC 5321 §3.2: a server that does not know EHLO: use HELO.
            helo = await proto.command(b"HELO " + self._helo, self.settings.reply_timeout)
            if helo.code == 250:
                return {}
            reply = helo
        raise _SessionError(f"{what} refused: {reply}", reply.code)

    async def _open(self, proto: _ClientProtocol, attempt: _Attempt, plan: _Plan, use_tls: bool) -> dict[str, str]:
        """Greeting, EHLO, STARTTLS and EHLO again; return the extensions to use."""
        timeout = self.settings.reply_timeout
        greeting = await proto.reply(timeout, "the greeting")
        if greeting.code != 220:
            # RFC 5321 §3.1: a 554 (or any non-220) greeting: try another host.
            raise _SessionError(f"greeting: {greeting}", greeting.code)
        extensions = await self._ehlo(proto)

        if use_tls:
            extensions = await self._starttls(proto, attempt, plan, extensions)

        if plan.enforce and not attempt.verified:
            # _starttls raised already; this guards the promise itself.
            raise _SessionError("not verified: refusing to send under enforce")
        return extensions

    async def _transaction(
        self,
        conn: _Connection,
        attempt: _Attempt,
        plan: _Plan,
        reverse_path: tuple[bytes, bool],
        pending: list[str],
        addresses: Mapping[str, tuple[bytes, bool]],
        message: BinaryIO,
        info: MessageInfo,
    ) -> None:
        if plan.enforce and not (conn.verified and conn.verify_mode is VerifyMode.VERIFY):
            # Guards the promise for new and reused sessions alike.
            raise _SessionError("not verified: refusing to send under enforce")
        conn.transactions += 1
        proto = conn.proto
        extensions = conn.extensions
        host = attempt.host
        timeout = self.settings.reply_timeout

        # -- what the message and addresses need (RFC 6152, RFC 6531, RFC 1870)
        params = b""
        if info.eight_bit:
            if "8BITMIME" not in extensions:
                for recipient in pending:
                    attempt.decide(
                        recipient,
                        Status.PERMANENT,
                        None,
                        f"5.6.3 the message has 8-bit data and {host} does not support 8BITMIME (RFC 6152)",
                    )
                return
            params += b" BODY=8BITMIME"
        utf8 = "SMTPUTF8" in extensions
        if reverse_path[1] and not utf8:
            for recipient in pending:
                attempt.decide(
                    recipient,
                    Status.PERMANENT,
                    None,
                    f"5.6.7 the sender address needs SMTPUTF8, which {host} does not support (RFC 6531)",
                )
            return
        sendable = []
        for recipient in pending:
            if addresses[recipient][1] and not utf8:
                attempt.decide(
                    recipient,
                    Status.PERMANENT,
                    None,
                    f"5.6.7 the address needs SMTPUTF8, which {host} does not support (RFC 6531)",
                )
            else:
                sendable.append(recipient)
        if not sendable:
            return
        if reverse_path[1] or any(addresses[r][1] for r in sendable):
            params += b" SMTPUTF8"
        if "SIZE" in extensions:
            limit = extensions["SIZE"]
            if limit.isdigit() and int(limit) and info.size > int(limit):
                for recipient in sendable:
                    attempt.decide(
                        recipient,
                        Status.PERMANENT,
                        None,
                        f"5.3.4 the message ({info.size} octets) exceeds the {limit} octets {host} accepts (RFC 1870)",
                    )
                return
            params += b" SIZE=%d" % info.size

        # -- the transaction (RFC 5321 §3.3)
        reply = await proto.command(b"MAIL FROM:<" + reverse_path[0] + b">" + params, timeout)
        if reply.kind == 5:
            for recipient in sendable:
                attempt.decide(recipient, Status.PERMANENT, reply.code, f"MAIL FROM refused: {reply.text}")
            return
        if reply.kind != 2:
            raise _SessionError(f"MAIL FROM: {reply}", reply.code)
        accepted = []
        for recipient in sendable:
            reply = await proto.command(b"RCPT TO:<" + addresses[recipient][0] + b">", timeout)
            if reply.kind == 2:
                accepted.append(recipient)
            else:
                attempt.decide(recipient, _status_of(reply), reply.code, reply.text)
        if not accepted:
            return
        reply = await proto.command(b"DATA", timeout)
        if reply.code != 354:
            for recipient in accepted:
                attempt.decide(recipient, _status_of(reply), reply.code, f"DATA refused: {reply.text}")
            return
        message.seek(info.start)
        encoder = _DataEncoder()
        transport = proto.transport
        assert transport is not None
        try:
            await FileSender().beginFileTransfer(message, transport, encoder.encode)
        except Exception:
            raise _SessionError(f"connection lost while sending the message ({proto._error or 'stopped'})")
        if proto.gone:
            raise _SessionError(f"connection lost while sending the message ({proto._error})")
        transport.write(encoder.finish())
        try:
            reply = await proto.reply(timeout, "the end of data")
        except _SessionError as e:
            # The final dot is sent: the server may have taken the message
            # (RFC 1047); do not send it elsewhere in this call.
            for recipient in accepted:
                attempt.decide(
                    recipient,
                    Status.TRANSIENT,
                    None,
                    f"4.4.2 no reply from {host} after the end of data ({e}); it may have been delivered",
                )
            return
        for recipient in accepted:
            if reply.kind == 2:
                attempt.decide(recipient, Status.DELIVERED, reply.code, reply.text)
            else:
                attempt.decide(recipient, _status_of(reply), reply.code, reply.text)

    async def _starttls(
        self, proto: _ClientProtocol, attempt: _Attempt, plan: _Plan, extensions: dict[str, str]
    ) -> dict[str, str]:
        """
        Negotiate TLS if offered; set C{attempt.result}, C{.tls_version},
        C{.verified}.  Return the extensions to use.
        """
        host, ip = attempt.host, attempt.ip
        timeout = self.settings.reply_timeout
        if "STARTTLS" not in extensions:
            attempt.result = self._session_result(plan, host, ip, starttls_not_supported_details(host, ip), False)
            if plan.enforce:
                # RFC 8461 §5: enforce requires TLS.
                raise _SessionError("STARTTLS not offered")
            return extensions
        proto.switching = True
        reply = await proto.command(b"STARTTLS", timeout)
        proto.switching = False
        if reply.code != 220:
            details = starttls_not_supported_details(host, ip, reply_code=reply.code)
            attempt.result = self._session_result(plan, host, ip, details, False)
            if plan.enforce:
                raise _SessionError(f"STARTTLS refused: {reply}", reply.code)
            # RFC 3207 §4: the client decides whether to go on; opportunistic
            # delivery goes on in plaintext on this connection.
            return extensions
        if proto.injected:
            raise _SessionError("plaintext data after the 220 reply to STARTTLS (command injection)")
        # One creator (one recorder) per session; the OpenSSL context under
        # it is cached per MX host (no context or trust store per session).
        creator = self._tls_options.creator(
            host, VerifyMode.VERIFY if plan.enforce else VerifyMode.RECORD_ONLY
        )
        transport = proto.transport
        assert transport is not None
        transport.startTLS(creator)  # type: ignore[attr-defined]
        # The EHLO is buffered by the TLS layer until the handshake is done,
        # so under VERIFY it never reaches a server that failed verification.
        try:
            reply = await proto.command(b"EHLO " + self._helo, timeout)
        except _SessionError as e:
            outcome = creator.outcome()
            if outcome is not None and outcome.handshake_completed:
                # TLS was negotiated; the session failed afterwards.
                attempt.tls_version = outcome.tls_version
                attempt.verified = outcome.verified
                attempt.result = self._session_result(plan, host, ip, outcome.failure_details(ip), True)
                raise
            if outcome is not None:
                details = outcome.failure_details(ip)
                classified = outcome.classify()
                kind = f"{classified[0].value} ({classified[1]})" if classified else "failed"
            else:
                details = None
                kind = "failed"
            if details is None:
                details = FailureDetails(
                    ResultType.VALIDATION_FAILURE,
                    receiving_mx_hostname=host,
                    receiving_ip=ip,
                    failure_reason_code="tls-handshake-failure",
                )
            attempt.result = self._session_result(plan, host, ip, details, False)
            attempt.retry_plaintext = not plan.enforce
            raise _SessionError(f"TLS with {host} failed: {kind}; {e}") from None
        outcome = creator.outcome()
        assert outcome is not None
        attempt.tls_version = outcome.tls_version
        attempt.verified = outcome.verified
        attempt.result = self._session_result(plan, host, ip, outcome.failure_details(ip), True)
        return await self._extensions(proto, reply, "EHLO after STARTTLS")


def deliver(
    reactor: Any,
    resolver: Any,
    cache: Any,
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
