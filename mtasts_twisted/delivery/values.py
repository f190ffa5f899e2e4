"""
The values delivery takes and gives: L{DeliverySettings} in; an
L{Envelope} (the message, scanned once by L{scan_message} into
L{MessageInfo}, and its paths in wire form) through every session; a
L{DeliveryResult} of one L{RecipientOutcome} per recipient, each with a
L{Status}, out.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import BinaryIO

import attrs

from mtasts_twisted.delivery.protocol import Path
from mtasts_twisted.delivery.requiretls import tls_required_no
from mtasts_twisted.policy import Mode
from mtasts_twisted.results import Result

__all__ = [
    "CHUNK_SIZE",
    "DeliveryResult",
    "DeliverySettings",
    "Envelope",
    "MessageInfo",
    "RecipientOutcome",
    "Status",
    "scan_message",
]

#: Bytes read from the message file at a time (scan and send).
CHUNK_SIZE = 64 * 1024


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
    How L{Deliverer<mtasts_twisted.delivery.Deliverer>} talks to MX hosts.

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
        L{Deliverer<mtasts_twisted.delivery.Deliverer>} that reuses
        sessions must be closed (L{Deliverer.close
        <mtasts_twisted.delivery.Deliverer.close>}); the relay sets 2 s.
        See "Session reuse" in the L{mtasts_twisted.delivery} docstring.
    @ivar reuse_max_transactions: transactions one session carries at most.
    @ivar reuse_max_age: seconds after connecting when a session is no
        longer reused.
    @ivar reuse_max_idle_sessions: sessions kept open for reuse at most, for
        all destinations together (the oldest is closed first).
    @ivar dane: use DANE (RFC 7672) for hosts of DNSSEC-secure MX RRsets:
        TLSA records looked up per MX host (C{_PORT._tcp.HOST}, PORT the
        port delivery connects to, L{port_of}) decide the host before
        MTA-STS (RFC 8461 §2).  Needs a resolver backed by a trusted
        validating resolver (the AD bit).  Off by default.
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
    dane: bool = False

    def port_of(self, host: str) -> int:
        """The port to connect to on MX host C{host}."""
        return self.port_for.get(host, self.port)


@attrs.frozen
class RecipientOutcome:
    """
    The outcome of delivery for one recipient.

    @ivar recipient: the address as given to L{Deliverer.deliver
        <mtasts_twisted.delivery.Deliverer.deliver>}.
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
    What L{Deliverer.deliver<mtasts_twisted.delivery.Deliverer.deliver>}
    did for one recipient domain.

    @ivar domain: the recipient domain in A-labels.
    @ivar policy_mode: the policy's L{Mode}, or L{None} without a policy.
    @ivar outcomes: one L{RecipientOutcome} per recipient, in the order given.
    @ivar results: the TLSRPT results: the policy lookup's first, then one
        per TLS negotiation (see "TLSRPT accounting" in the
        L{mtasts_twisted.delivery} docstring).
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
    @ivar tls_required_no: whether its header carries C{TLS-Required: No}
        (RFC 8689 §3; L{tls_required_no
        <mtasts_twisted.delivery.requiretls.tls_required_no>}), read from
        its first L{MAX_HEADER_SCAN} octets.
    """

    start: int
    size: int
    eight_bit: bool
    tls_required_no: bool = False


#: The most octets of a message's header read for C{TLS-Required}.
MAX_HEADER_SCAN = 64 * 1024
_HEADER_END = re.compile(rb"\n\r?\n")


def scan_message(message: BinaryIO) -> MessageInfo:
    """
    Read a message file once, in chunks, from its current position, and
    seek back there.

    @param message: a seekable binary file.
    """
    start = message.tell()
    size = 0
    eight_bit = False
    head = bytearray()
    head_done = False
    while True:
        chunk = message.read(CHUNK_SIZE)
        if not chunk:
            break
        size += len(chunk)
        if not eight_bit and not chunk.isascii():
            eight_bit = True
        if not head_done:
            head += chunk[: MAX_HEADER_SCAN - len(head)]
            m = _HEADER_END.search(b"\n" + head)  # an empty line ends the header
            if m is not None:
                del head[m.start():]
                head_done = True
            elif len(head) >= MAX_HEADER_SCAN:
                head_done = True
    message.seek(start)
    return MessageInfo(start, size, eight_bit, tls_required_no(bytes(head)))


@attrs.frozen
class Envelope:
    """
    One message for recipients of one domain, as every transaction of one
    delivery sends it, whichever session carries it (RFC 5321 §3.3).

    @ivar reverse_path: the sender's L{Path} (C{b""} for the null sender).
    @ivar forward_paths: each recipient (as given, without duplicates, in
        the order given) and its L{Path}.
    @ivar message: the seekable message file; streamed from
        C{info.start} by every transaction, never read whole.
    @ivar info: what L{scan_message} found: where the message starts, its
        size (for C{SIZE}, RFC 1870) and whether it has 8-bit data (for
        C{BODY=8BITMIME}, RFC 6152).
    @ivar smtputf8: the message was submitted with C{SMTPUTF8} (RFC 6531
        §3.4): with 8-bit data it may have UTF-8 header fields (RFC 6532),
        so it is sent with C{SMTPUTF8} and only to a server that offers it.
    @ivar requiretls: the message was submitted with C{REQUIRETLS} (RFC
        8689 §4.1): see L{mtasts_twisted.delivery.requiretls}.
    """

    reverse_path: Path
    forward_paths: Mapping[str, Path]
    message: BinaryIO
    info: MessageInfo
    smtputf8: bool = False
    requiretls: bool = False

    @property
    def recipients(self) -> tuple[str, ...]:
        """The recipients, as given, in order."""
        return tuple(self.forward_paths)
