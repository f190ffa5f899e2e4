"""
A Postfix socketmap policy server answering C{smtp_tls_policy_maps} lookups
from the MTA-STS policy cache.

Postfix is pointed at it with one line of C{main.cf}, the same line that
serves postfix-mta-sts-resolver ("the peer")::

    smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:postfix

Protocol (socketmap_table(5)): every request and every reply is one
netstring (C{<len>:<data>,}); a request is C{NAME <space> KEY}; a reply is
C{OK <data>}, C{NOTFOUND }, C{TEMP <reason>}, C{TIMEOUT <reason>} or
C{PERM <reason>}, at most 100000 characters.  Requests may be pipelined:
answers go out strictly in request order.

Answers (one example per case; "the peer" answers the same unless noted):

  - enforce, exact patterns only (no C{*.}): the patterns, without an MX
    lookup (Postfix checks the certificate of whichever MX host it reaches
    against this list, so listing the patterns is exactly as strict)::

        OK secure match=mx1.example.com:mx2.example.com servername=hostname

  - enforce with a wildcard pattern, MX hosts known::

        OK secure match=mx1.example.com:mx7.example.net servername=hostname

    The peer answers C{match=.example.net} for an C{mx: *.example.net}
    pattern, but Postfix's C{.example.net} matches any depth of subdomain
    while an MTA-STS wildcard matches exactly one label (RFC 8461 §4.1).  We
    list the domain's actual MX hosts that match the policy instead, so
    C{mx.sub.example.net} is never accepted.  The MX answer comes from our
    resolver (TTL cached) and the rendered answer is memoised per policy
    domain, policy object and record id until the MX TTL ends.
  - enforce, MX lookup failed temporarily: the peer's form, with a warning
    logged (at most once per C{mx_retry} seconds and domain)::

        OK secure match=mx1.example.com:.example.com servername=hostname

  - enforce with a wildcard, no MX host matches the policy: the policy's exact
    patterns only; Postfix then fails TLS verification with every MX and
    defers the mail, which is what RFC 8461 §5.1 asks for under enforce::

        OK secure match=mx1.example.com servername=hostname

    When the policy has only wildcard patterns there is no safe C{match}
    list (C{.example.com} would admit the very hosts that do not match), so
    we answer C{TEMP}: Postfix defers the mail ("temporarily fail the
    message", RFC 8461 §5.1) without connecting anywhere::

        TEMP no MX host of example.com matches its MTA-STS policy

  - testing, mode none, no policy, address literals (C{[192.0.2.1]}, bare
    IPs) and parent-domain keys (C{.example.com})::

        NOTFOUND 

  - testing with C{strict_testing}: answered like enforce.
  - C{tlsrpt_attributes} (Postfix >= 3.10, TLSRPT_README "MTA-STS support"):
    the enforce answer gains the policy attributes; values with spaces use
    Postfix's C{{ name = value }} form::

        OK secure match=mx1.example.com servername=hostname policy_type=sts
        policy_domain=example.com mx_host_pattern=mx1.example.com
        mx_host_pattern=*.example.com { policy_string = version: STSv1 }
        { policy_string = mode: enforce } ...

    (one line on the wire).  Postfix has no report-only TLS security level,
    so a testing policy is answered with C{testing_level} (default C{may}:
    opportunistic TLS, what Postfix does anyway with the stock
    C{smtp_tls_security_level}) plus the attributes, so Postfix delivers as
    it would without MTA-STS but knows the policy to report under::

        OK may policy_type=sts policy_domain=example.com mx_host_pattern=...

    An operator whose default level is C{dane} or C{encrypt} should set
    C{testing_level} to that level (a C{may} answer would override it for
    testing domains), or to L{None} to answer C{NOTFOUND } as without
    attributes.
  - temporary failure with nothing cached (the cache's
    L{PolicyLookupTemporaryError})::

        TEMP MTA-STS policy of example.com unavailable (dns-lookup)

    or C{NOTFOUND } with C{fail_open}.
  - a malformed request (no space, empty key, non-UTF-8, not a domain name,
    unknown map name when C{map_names} is set) answers C{PERM <reason>} and
    the connection goes on; only a broken netstring (bad length, missing
    comma, longer than C{max_request}) closes it, after the requests before
    the breakage are answered.

Every lookup's TLSRPT result goes to the optional L{IResultSink}; Postfix
records the delivery itself.  The hot path of a cached answer is: the frame
cut from the input, a dict hit for the parsed key, L{PolicyCache.get} (whose
already-fired L{Deferred} is read without adding callbacks), a dict hit for
the rendered answer, one C{send} on the socket (L{ImmediateWriter}).  Nothing
is logged per request.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, ISSLTransport, ISystemHandle
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtasts_twisted.cache import Lookup, PolicyLookupTemporaryError
from mtasts_twisted.dns import DNSNoRecordError, MXAnswer
from mtasts_twisted.policy import DomainError, Mode, MTASTSError, Policy, to_alabel

__all__ = [
    "ANSWER_KINDS",
    "ImmediateWriter",
    "MAX_REPLY",
    "MalformedRequestError",
    "NetstringDecoder",
    "NetstringError",
    "ParsedKey",
    "SocketmapFactory",
    "SocketmapProtocol",
    "SocketmapSettings",
    "encode_netstring",
    "parse_key",
    "parse_request",
    "policy_has_wildcard",
    "render_answer",
    "render_failure",
]

log = Logger()

#: socketmap_table(5): "replies are not longer than 100000 characters".
MAX_REPLY = 100000

#: The answer kinds counted in L{SocketmapFactory.counts} and passed to the
#: C{metrics} counter as its C{answer} label.
ANSWER_KINDS = ("ok", "notfound", "temp", "perm")

#: Connection events also counted in L{SocketmapFactory.counts}.
CONNECTION_EVENTS = ("broken", "idle", "refused")

_INF = float("inf")


# --- netstrings (http://cr.yp.to/proto/netstrings.txt) -------------------------


class NetstringError(ValueError):
    """
    The input is not a sequence of netstrings within the size limit: the
    stream cannot be resynchronised, so the connection must be closed.

    @ivar frames: the complete netstrings decoded from the same chunk before
        the breakage, in order (they are valid requests and may be answered).
    """

    def __init__(self, message: str, frames: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.frames: list[bytes] = frames if frames is not None else []


def encode_netstring(data: bytes) -> bytes:
    """Return C{data} as one netstring: C{b"<len>:<data>,"}."""
    return b"%d:%s," % (len(data), data)


class NetstringDecoder:
    """
    An incremental netstring decoder: feed it bytes as they arrive, get the
    complete payloads back.

    Strict as the netstring definition asks: the length is a non-empty run of
    ASCII digits without leading zeros ("[len] begins with <30> exactly when
    [string] is empty"), followed by C{:}, the payload and C{,}.  A length
    above C{max_length} is an error as soon as its digits are seen, so a huge
    length prefix never makes the decoder buffer anything.  Once broken, the
    decoder stays broken.

    A payload that is still incomplete is kept as a list of chunks and joined
    once, when its last byte arrives, so byte-at-a-time input costs linear
    time.
    """

    __slots__ = ("_broken", "_buffer", "_chunks", "_digits", "_have", "_want", "max_length")

    def __init__(self, max_length: int = 10000) -> None:
        """
        @param max_length: the largest payload accepted, in bytes.
        """
        if max_length < 0:
            raise ValueError("max_length must not be negative")
        self.max_length = max_length
        self._digits = len(str(max_length))
        self._buffer = b""
        self._chunks: list[bytes] = []
        self._have = 0
        self._want = 0
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete netstring are held."""
        return self._have if self._want else len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """
        Add C{data} and return the payloads of every netstring it completes.

        @raise NetstringError: the input is not a netstring (its C{frames}
            hold the payloads completed before the breakage).
        """
        if self._broken is not None:
            raise NetstringError(self._broken)
        if self._want:
            # A payload is incomplete: collect chunks until it can be complete.
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._want:
                return []
            buf = b"".join(self._chunks)
            self._chunks = []
            self._have = self._want = 0
        elif self._buffer:
            buf = self._buffer + data
        else:
            buf = data
        frames: list[bytes] = []
        pos = 0
        size = len(buf)
        digits = self._digits
        while pos < size:
            colon = buf.find(b":", pos, pos + digits + 1)
            if colon < 0:
                head = buf[pos:pos + digits + 1]
                if len(head) > digits or not head.isdigit():
                    raise self._break("netstring length is not a decimal number within the limit", frames)
                if len(head) > 1 and head[0] == 0x30:
                    raise self._break("netstring length has leading zeros", frames)
                if int(head) > self.max_length:
                    raise self._break(f"netstring longer than {self.max_length} bytes", frames)
                break  # the length is still arriving
            head = buf[pos:colon]
            if not head.isdigit():  # bytes.isdigit(): ASCII digits only
                raise self._break("netstring length is not a decimal number", frames)
            if len(head) > 1 and head[0] == 0x30:
                raise self._break("netstring length has leading zeros", frames)
            length = int(head)
            if length > self.max_length:
                raise self._break(f"netstring longer than {self.max_length} bytes", frames)
            end = colon + 1 + length
            if end >= size:
                # Incomplete payload (or its comma): wait for end + 1 bytes.
                rest = buf[pos:]
                self._chunks = [rest]
                self._have = len(rest)
                self._want = end + 1 - pos
                self._buffer = b""
                return frames
            if buf[end] != 0x2C:
                raise self._break("netstring not terminated by a comma", frames)
            frames.append(buf[colon + 1:end])
            pos = end + 1
        self._buffer = buf[pos:] if pos < size else b""
        return frames

    def _break(self, reason: str, frames: list[bytes]) -> NetstringError:
        self._broken = reason
        self._buffer = b""
        self._chunks = []
        self._have = self._want = 0
        return NetstringError(reason, frames)


# --- requests and keys -----------------------------------------------------------


class MalformedRequestError(MTASTSError):
    """A request is not C{NAME KEY}, or its key is not a next-hop name."""

    reason = "malformed-request"


@attrs.frozen
class ParsedKey:
    """
    A normalised C{smtp_tls_policy_maps} lookup key.

    @ivar domain: the policy domain in A-labels (lower case, no trailing dot),
        or L{None} when no MTA-STS policy can apply: an address literal or a
        parent-domain key (C{.example.com}, sent when
        C{parent_domain_matches_subdomains} covers the map).
    @ivar bracketed: the key was C{[name]} or C{[name]:port}: Postfix connects
        to that host itself, without an MX lookup.
    @ivar port: the port of a C{name:port} key, if any.
    """

    domain: str | None
    bracketed: bool = False
    port: int | None = None


_BAD_KEY_CHARS = re.compile(r"[\x00-\x20\x7f]")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _port(text: str, key: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) < 65536:
        raise MalformedRequestError(f"bad port in key {key[:80]!r}")
    return int(text)


def parse_key(key: str) -> ParsedKey:
    """
    Normalise a Postfix TLS policy lookup key (the next-hop destination).

    Accepted: C{domain}, C{[domain]}, C{domain:port}, C{[domain]:port}, in
    any case, with or without a trailing dot, in U-labels (converted to
    A-labels with UTS 46 / IDNA 2008).  Address literals (C{[192.0.2.1]},
    C{[IPv6:2001:db8::1]}, bare IPs, with or without port) and parent-domain
    keys (C{.example.com}) parse with C{domain=None}: no policy applies.

    @raise MalformedRequestError: an empty key, one with spaces or control
        characters, unbalanced brackets, a bad port or an invalid domain.
    """
    if not key:
        raise MalformedRequestError("empty key")
    if _BAD_KEY_CHARS.search(key):
        raise MalformedRequestError(f"space or control character in key {key[:80]!r}")
    port = None
    bracketed = key[0] == "["
    if bracketed:
        close = key.find("]")
        if close < 0:
            raise MalformedRequestError(f"unbalanced bracket in key {key[:80]!r}")
        host = key[1:close]
        rest = key[close + 1:]
        if rest:
            if rest[0] != ":":
                raise MalformedRequestError(f"text after ']' in key {key[:80]!r}")
            port = _port(rest[1:], key)
        if host[:5].lower() == "ipv6:" or _is_ip(host):
            return ParsedKey(None, True, port)  # address literal: no policy domain
    else:
        if _is_ip(key):
            return ParsedKey(None)  # a bare IPv4 or IPv6 address
        host, colon, port_text = key.rpartition(":")
        if colon:
            port = _port(port_text, key)
        else:
            host = key
        if _is_ip(host.rstrip(".")):
            return ParsedKey(None, False, port)
    if host.startswith("."):
        return ParsedKey(None, bracketed, port)  # a Postfix parent-domain lookup
    if not host:
        raise MalformedRequestError(f"no host name in key {key[:80]!r}")
    if "[" in host or "]" in host or ":" in host:
        raise MalformedRequestError(f"malformed key {key[:80]!r}")
    try:
        return ParsedKey(to_alabel(host), bracketed, port)
    except DomainError as e:
        raise MalformedRequestError(str(e)) from None


def parse_request(data: bytes) -> tuple[str, str]:
    """
    Split a socketmap request payload into C{(name, key)} (socketmap_table(5):
    C{name <space> key}).

    @raise MalformedRequestError: no space, an empty name or key, or bytes
        that are not UTF-8.
    """
    name, space, key = data.partition(b" ")
    if not space:
        raise MalformedRequestError("request is not 'name key'")
    if not name:
        raise MalformedRequestError("empty map name")
    if not key:
        raise MalformedRequestError("empty key")
    try:
        return name.decode("utf-8"), key.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequestError("request is not UTF-8") from None


# --- answers ---------------------------------------------------------------------


def _frozen_names(value: Iterable[str] | None) -> frozenset[str] | None:
    return None if value is None else frozenset(value)


@attrs.frozen
class SocketmapSettings:
    """
    How the socketmap server answers.

    @ivar strict_testing: answer a C{testing} policy like C{enforce}.
    @ivar tlsrpt_attributes: add the Postfix >= 3.10 TLSRPT attributes
        (C{policy_type}, C{policy_domain}, C{mx_host_pattern},
        C{policy_string}) to policy answers, and answer C{testing} policies
        with C{testing_level}.
    @ivar fail_open: answer C{NOTFOUND } instead of C{TEMP} when the policy
        cannot be determined now and nothing is cached (Postfix then
        delivers with its default TLS level instead of deferring).
    @ivar max_request: the largest request payload, in bytes; a longer
        netstring closes the connection.
    @ivar idle_timeout: seconds without a complete request after which a
        connection with no request in flight is closed (bytes of a partial
        request do not count, so a slowloris client is closed too);
        L{None} (or 0) for never.
    @ivar map_names: the socketmap names accepted (the last field of
        C{socketmap:inet:host:port:name}); L{None} accepts any.
    @ivar max_connections: connections served at once; more are closed on
        accept (default 1024: Postfix opens one per smtp(8) process).
        L{None} for no limit.
    @ivar testing_level: the Postfix TLS security level answered for a
        C{testing} policy when C{tlsrpt_attributes} is on (see the module
        docstring); L{None} answers C{NOTFOUND }.
    @ivar mx_retry: seconds an answer built without a usable MX answer
        (lookup failed or no MX) is reused before the MX is looked up again.
    @ivar memo_size: rendered answers kept, and parsed keys kept (each table
        evicts its oldest entry when full).
    """

    strict_testing: bool = False
    tlsrpt_attributes: bool = False
    fail_open: bool = False
    max_request: int = 10000
    idle_timeout: float | None = 300.0
    map_names: frozenset[str] | None = attrs.field(default=None, converter=_frozen_names)
    max_connections: int | None = 1024
    testing_level: str | None = "may"
    mx_retry: float = 60.0
    memo_size: int = 10000


_DEFAULT_SETTINGS = SocketmapSettings()


def _dedupe(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _policy_attributes(policy_domain: str, policy: Policy, strings: bool = True, patterns: bool = True) -> str:
    """The TLSRPT attributes of Postfix >= 3.10 for C{policy}, with a leading space."""
    parts = [" policy_type=sts policy_domain=", policy_domain]
    if patterns:
        for pattern in policy.mx:
            parts.append(" mx_host_pattern=")
            parts.append(pattern)
    if strings:
        for line in policy.policy_strings:
            if "{" in line or "}" in line:
                # Postfix's "{ name = value }" cannot carry an unbalanced
                # brace; such an extension line is left out of the report.
                continue
            parts.append(" { policy_string = ")
            parts.append(line.strip())
            parts.append(" }")
    return "".join(parts)


def _with_attributes(head: str, policy_domain: str, policy: Policy, settings: SocketmapSettings) -> str:
    if not settings.tlsrpt_attributes:
        return head
    answer = head + _policy_attributes(policy_domain, policy)
    if len(answer) > MAX_REPLY:
        # Keep within socketmap_table(5)'s limit: the policy strings go first.
        answer = head + _policy_attributes(policy_domain, policy, strings=False)
    if len(answer) > MAX_REPLY:
        answer = head + _policy_attributes(policy_domain, policy, strings=False, patterns=False)
    return answer


def render_answer(
    policy_domain: str,
    policy: Policy | None,
    settings: SocketmapSettings = _DEFAULT_SETTINGS,
    mx_hosts: Sequence[str] | None = None,
) -> str:
    """
    The socketmap reply (without netstring framing) for a policy.

    Pure: no I/O.  See the module docstring for the formats.

    @param policy_domain: the policy domain in A-labels.
    @param policy: the policy that applies, or L{None} for none.
    @param mx_hosts: the hosts Postfix may connect to (the domain's MX hosts
        in preference order, or the host of a C{[host]} key), in A-labels;
        L{None} when they are unknown (the MX lookup failed temporarily), which
        falls back to the peer's pattern form (C{*.x} written C{.x}).
    @return: C{"OK ..."}, C{"NOTFOUND "} or, for an enforced policy that no
        MX host matches and that has no exact pattern, C{"TEMP ..."}.
    """
    if policy is None or policy.mode is Mode.NONE:
        return "NOTFOUND "
    if policy.mode is Mode.TESTING and not settings.strict_testing:
        if settings.tlsrpt_attributes and settings.testing_level:
            return _with_attributes("OK " + settings.testing_level, policy_domain, policy, settings)
        return "NOTFOUND "
    if mx_hosts is None:
        # The patterns themselves.  For a wildcard this is the peer's form:
        # Postfix's ".x" admits any depth below x, more than RFC 8461 §4.1's
        # one label; so it is used only when the MX hosts are unknown.
        names = _dedupe(p[1:] if p.startswith("*.") else p for p in policy.mx)
        if not names:
            return f"TEMP MTA-STS policy of {policy_domain} lists no MX host"
    else:
        # RFC 8461 §4.1: only MX hosts matching a pattern are candidates.
        names = _dedupe(h.lower().rstrip(".") for h in mx_hosts if policy.matches(h))
        if not names:
            # No MX host matches: exact patterns only; Postfix fails the
            # verification against every MX and defers (RFC 8461 §5.1).
            names = _dedupe(p for p in policy.mx if not p.startswith("*."))
        if not names:
            return f"TEMP no MX host of {policy_domain} matches its MTA-STS policy"
    head = "OK secure match=" + ":".join(names) + " servername=hostname"
    answer = _with_attributes(head, policy_domain, policy, settings)
    if len(answer) > MAX_REPLY:
        return f"TEMP MTA-STS answer for {policy_domain} exceeds the socketmap reply limit"
    return answer


def policy_has_wildcard(policy: Policy) -> bool:
    """Has C{policy} a C{*.} pattern (whose match list needs the MX hosts)?"""
    return any(pattern.startswith("*.") for pattern in policy.mx)


def render_failure(policy_domain: str, reason: str, settings: SocketmapSettings = _DEFAULT_SETTINGS) -> str:
    """
    The reply when the policy cannot be determined now and nothing usable is
    cached: C{TEMP <reason>} (Postfix defers the mail), or C{NOTFOUND } with
    C{fail_open} (Postfix delivers with its default TLS level).

    @param reason: a short machine reason, e.g. C{dns-lookup}.
    """
    if settings.fail_open:
        return "NOTFOUND "
    return f"TEMP MTA-STS policy of {policy_domain} unavailable ({reason})"


def _frame(text: str) -> bytes:
    return encode_netstring(text.encode("utf-8"))


_NOTFOUND = _frame("NOTFOUND ")
_NOTFOUND_ANSWER = ("notfound", _NOTFOUND)


def _kind(text: str) -> str:
    return text.partition(" ")[0].lower()


def _consume(failure: Failure) -> None:
    return None


def _evict(table: dict, size: int) -> None:
    """Bound C{table} to C{size} entries, oldest insertion first (no LRU bookkeeping on hits)."""
    while len(table) >= size > 0:
        del table[next(iter(table))]


# --- the server ------------------------------------------------------------------


class ImmediateWriter:
    """
    Writes to a connection's socket at once while nothing is buffered.

    Twisted's socket transports buffer every C{write} and send it on the
    next reactor turn: two C{epoll_ctl} calls and a second dispatch per
    answer, about half of the CPU of a cached lookup.  A socketmap answer is
    small and Postfix waits for it, so this writer calls the socket's
    C{send} directly (the socket comes from the public
    L{ISystemHandle.getHandle}).  The first time the kernel does not take a
    whole answer (a partial send, C{EAGAIN}, or an error such as a reset),
    the rest goes to C{transport.write} and so does every later write on
    this connection: the transport's buffer then keeps the bytes in order,
    and the transport notices and reports a dead connection as usual.

    Used only on plain TCP and UNIX socket transports
    (L{FileDescriptor}s whose handle is a socket, without TLS); any other
    transport (a TLS wrapper, a test transport) is written to normally.
    Everything written on the connection must go through this writer.
    """

    __slots__ = ("_send", "_transport")

    def __init__(self, transport: Any, send: Any = None) -> None:
        """
        @param transport: the connection's transport.
        @param send: the socket's C{send} (default: found on C{transport} if
            it is a plain socket transport); tests pass their own.
        """
        self._transport = transport
        if send is None and (
            isinstance(transport, FileDescriptor)
            and ISystemHandle.providedBy(transport)
            and not ISSLTransport.providedBy(transport)
        ):
            handle = transport.getHandle()
            if isinstance(handle, socket.socket):
                send = handle.send
        self._send = send

    @property
    def direct(self) -> bool:
        """Do writes still go straight to the socket?"""
        return self._send is not None

    def write(self, data: bytes) -> None:
        """Send C{data} now if the socket takes all of it, else via the transport."""
        send = self._send
        if send is not None:
            try:
                sent = send(data)
            except OSError:
                # BlockingIOError, or a dead connection: the transport gets the
                # bytes and finds out about the connection itself.
                sent = 0
            if sent == len(data):
                return
            self._send = None  # from now on the transport's buffer keeps the order
            data = data[sent:]
        self._transport.write(data)


class SocketmapProtocol(Protocol):
    """
    One Postfix socketmap connection: netstring requests in, answers out in
    request order, even when an earlier answer waits for a lookup and a
    later one is immediate.

    @ivar factory: the L{SocketmapFactory} that does the lookups.
    """

    def __init__(self, factory: SocketmapFactory) -> None:
        """
        @param factory: the L{SocketmapFactory} serving this connection.
        """
        self.factory = factory
        self._decoder = NetstringDecoder(factory.settings.max_request)
        self._queue: deque[list[bytes | None]] = deque()
        self._closing = False
        self._lost = False
        self._clock = factory.clock
        self._timeout = factory.settings.idle_timeout
        self._timer: Any = None
        self._last = 0.0
        self._write: Any = None

    def connectionMade(self) -> None:
        """Count the connection and start the idle timer."""
        self._write = ImmediateWriter(self.transport).write
        self.factory.connections += 1
        if self._timeout:
            self._last = self._clock.seconds()
            self._timer = self._clock.callLater(self._timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        """Answer every complete request in C{data}, in order."""
        if self._closing:
            return
        try:
            frames = self._decoder.feed(data)
        except NetstringError as e:
            # A broken netstring cannot be resynchronised: answer what came
            # before it, then close.
            frames = e.frames
            self._closing = True
            self.factory.counts["broken"] += 1
            self.transport.pauseProducing()
        if self._timeout and (frames or not self._decoder.buffered):
            # Only complete requests are activity: a client trickling a
            # partial request (slowloris) is idle and closed on time.
            self._last = self._clock.seconds()
        respond = self.factory.respond
        queue = self._queue
        out: list[bytes] = []
        for frame in frames:
            answer = respond(frame)
            if answer.__class__ is bytes:
                if queue:
                    queue.append([answer])  # type: ignore[list-item]
                else:
                    out.append(answer)  # type: ignore[arg-type]
            else:
                if out:
                    # Earlier answers go out first, should this one fire at once.
                    self._write(b"".join(out))
                    out = []
                slot: list[bytes | None] = [None]
                queue.append(slot)
                answer.addCallback(self._fill, slot)  # type: ignore[union-attr]
        if out:
            self._write(out[0] if len(out) == 1 else b"".join(out))
        if self._closing and not queue:
            self.transport.loseConnection()

    def _fill(self, frame: bytes, slot: list[bytes | None]) -> None:
        slot[0] = frame
        if self._lost:
            return
        queue = self._queue
        out = []
        while queue and queue[0][0] is not None:
            out.append(queue.popleft()[0])
        if out:
            if self._timeout:
                self._last = self._clock.seconds()
            self._write(b"".join(out))  # type: ignore[arg-type]
        if self._closing and not queue:
            self.transport.loseConnection()

    def _check_idle(self) -> None:
        self._timer = None
        if self._lost:
            return
        timeout = self._timeout
        assert timeout
        idle = self._clock.seconds() - self._last
        if self._queue:
            idle = 0.0  # Postfix is waiting for an answer: not idle
        if idle >= timeout:
            self.factory.counts["idle"] += 1
            self.transport.loseConnection()
            return
        self._timer = self._clock.callLater(timeout - idle, self._check_idle)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Forget pending answers, stop the timer, uncount the connection."""
        self._lost = True
        self._closing = True
        self._queue.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.connections -= 1


class SocketmapFactory(Factory):
    """
    Serves Postfix C{smtp_tls_policy_maps} socketmap lookups from a
    L{PolicyCache<mtasts_twisted.cache.PolicyCache>}.

    @ivar settings: the L{SocketmapSettings}.
    @ivar clock: the C{IReactorTime} for idle timeouts and MX answer expiry.
    @ivar connections: connections open now.
    @ivar counts: requests by answer kind (L{ANSWER_KINDS}) and connection
        events (C{broken}: closed on a broken netstring; C{idle}: closed
        after the idle timeout; C{refused}: over C{max_connections}).  A
        plain dict, cheap to update and to read from a metrics collector.
    """

    protocol = SocketmapProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        cache: Any,
        resolver: Any,
        clock: Any,
        settings: SocketmapSettings = _DEFAULT_SETTINGS,
        sink: Any = None,
        metrics: Any = None,
    ) -> None:
        """
        @param cache: a L{PolicyCache<mtasts_twisted.cache.PolicyCache>} (or
            anything with its C{get(domain) -> Deferred[Lookup]}).
        @param resolver: an L{IDNSResolver<mtasts_twisted.interfaces.IDNSResolver>}
            for the MX lookups (its answer cache honours TTLs).
        @param clock: an C{IReactorTime}.
        @param settings: the L{SocketmapSettings}.
        @param sink: an optional L{IResultSink<mtasts_twisted.interfaces.IResultSink>}
            receiving every lookup's TLSRPT result.
        @param metrics: an optional C{prometheus_client.Counter} declared with
            C{labelnames=["answer"]} (in any registry; none is imported
            here): incremented per request with the answer kind.
        """
        self._cache = cache
        self._resolver = resolver
        self.clock = clock
        self.settings = settings
        self._sink = sink
        self.connections = 0
        self.counts: dict[str, int] = dict.fromkeys(ANSWER_KINDS + CONNECTION_EVENTS, 0)
        self._children: dict[str, Any] | None = None
        if metrics is not None:
            self._children = {kind: metrics.labels(answer=kind) for kind in ANSWER_KINDS}
        self._names = (
            None if settings.map_names is None else frozenset(n.encode("utf-8") for n in settings.map_names)
        )
        self._testing_attributes = bool(settings.tlsrpt_attributes and settings.testing_level)
        self._strict = settings.strict_testing
        # request payload -> ParsedKey, or (kind, frame) of an immediate answer
        self._requests: dict[bytes, Any] = {}
        # memo key -> (policy, record_id, expires, kind, frame)
        self._memo: dict[str, tuple[Policy, str | None, float, str, bytes]] = {}

    def buildProtocol(self, addr: IAddress) -> SocketmapProtocol | None:  # type: ignore[override]
        """A protocol for a new connection, or L{None} (close) over C{max_connections}."""
        limit = self.settings.max_connections
        if limit is not None and self.connections >= limit:
            self.counts["refused"] += 1
            return None
        return SocketmapProtocol(self)

    # --- per request ---------------------------------------------------------------

    def _count(self, kind: str) -> None:
        self.counts[kind] += 1
        if self._children is not None:
            self._children[kind].inc()

    def respond(self, request: bytes) -> bytes | Deferred[bytes]:
        """
        Answer one request payload.

        @return: the framed answer, or a L{Deferred} firing with it (never
            failing) when a lookup is in flight.
        """
        parsed = self._requests.get(request)
        if parsed is None:
            parsed = self._parse(request)
        if parsed.__class__ is tuple:
            self._count(parsed[0])
            return parsed[1]
        try:
            d = self._cache.get(parsed.domain)
            if d.called and not d.paused:
                # Already fired (a hot cache answer): read it without a callback.
                result = d.result
                if result.__class__ is Lookup:
                    answer = self._answer(result, parsed)
                    if answer.__class__ is bytes:
                        return answer
                    return answer.addErrback(self._internal_error, parsed)  # type: ignore[union-attr]
                if isinstance(result, Failure):
                    d.addErrback(_consume)
                    return self._failed(result, parsed)
        except Exception:  # noqa: BLE001 - one bad answer must not stall the connection
            return self._internal_error(Failure(), parsed)
        return d.addCallbacks(self._answer, self._failed, callbackArgs=(parsed,), errbackArgs=(parsed,)).addErrback(
            self._internal_error, parsed
        )

    def _parse(self, request: bytes) -> Any:
        try:
            name, key = parse_request(request)
            if self._names is not None and request.partition(b" ")[0] not in self._names:
                raise MalformedRequestError(f"unknown map name {name[:40]!r}")
            parsed: Any = parse_key(key)
        except MalformedRequestError as e:
            parsed = ("perm", _frame("PERM " + str(e)[:200]))
        else:
            if parsed.domain is None:
                parsed = _NOTFOUND_ANSWER
        _evict(self._requests, self.settings.memo_size)
        self._requests[request] = parsed
        return parsed

    def _answer(self, lookup: Lookup, parsed: ParsedKey) -> bytes | Deferred[bytes]:
        sink = self._sink
        if sink is not None:
            sink.record(lookup.result)
        policy = lookup.policy
        if policy is None:
            self._count("notfound")
            return _NOTFOUND
        mode = policy.mode
        if mode is Mode.ENFORCE or (mode is Mode.TESTING and self._strict):
            need_mx = True
        elif mode is Mode.TESTING and self._testing_attributes:
            need_mx = False
        else:
            self._count("notfound")
            return _NOTFOUND
        domain: str = parsed.domain  # type: ignore[assignment]
        key = "[" + domain + "]" if parsed.bracketed else domain
        memo = self._memo.get(key)
        if (
            memo is not None
            and memo[0] is policy
            and memo[1] == lookup.record_id
            and memo[2] > self.clock.seconds()
        ):
            self._count(memo[3])
            return memo[4]
        if not need_mx:
            return self._render(key, domain, lookup, None, _INF)
        if parsed.bracketed:
            # Postfix connects to a [host] next hop itself: no MX lookup.
            return self._render(key, domain, lookup, (domain,), _INF)
        if not policy_has_wildcard(policy):
            # Exact patterns only: the match list is the patterns themselves,
            # as safe as any MX-derived list (Postfix verifies the MX host's
            # certificate against it), so no MX query is needed.
            return self._render(key, domain, lookup, None, _INF)
        d = self._resolver.lookup_mx(domain)
        if d.called and not d.paused and not isinstance(d.result, Deferred):
            result = d.result
            if isinstance(result, Failure):
                d.addErrback(_consume)
            return self._mx_answered(result, key, domain, lookup)
        return d.addBoth(self._mx_answered, key, domain, lookup)

    def _mx_answered(self, result: Any, key: str, domain: str, lookup: Lookup) -> bytes:
        now = self.clock.seconds()
        hosts: tuple[str, ...] | None
        if isinstance(result, MXAnswer):
            hosts = tuple(mx.host for mx in result.hosts)
            expires = now + max(result.ttl, 0)
        elif isinstance(result, Failure) and result.check(DNSNoRecordError):
            hosts = ()  # no MX and no address: nothing can match
            expires = now + self.settings.mx_retry
        else:
            error = result.value if isinstance(result, Failure) else result
            log.warn(  # noqa: G010 - twisted.logger has no warning()
                "MX lookup of {domain} failed ({error}); answering with the policy's patterns, "
                "which let Postfix accept MX hosts at any depth below a wildcard",
                domain=domain,
                error=error,
            )
            hosts = None
            expires = now + self.settings.mx_retry
        return self._render(key, domain, lookup, hosts, expires)

    def _render(
        self, key: str, domain: str, lookup: Lookup, hosts: Sequence[str] | None, expires: float
    ) -> bytes:
        policy = lookup.policy
        assert policy is not None
        text = render_answer(domain, policy, self.settings, hosts)
        kind = _kind(text)
        frame = _frame(text)
        _evict(self._memo, self.settings.memo_size)
        self._memo[key] = (policy, lookup.record_id, expires, kind, frame)
        self._count(kind)
        return frame

    def _failed(self, failure: Failure, parsed: ParsedKey) -> bytes:
        error = failure.value
        domain: str = parsed.domain  # type: ignore[assignment]
        if isinstance(error, PolicyLookupTemporaryError):
            if self._sink is not None:
                self._sink.record(error.result)
            text = render_failure(domain, error.reason, self.settings)
        elif isinstance(error, DomainError):
            text = "PERM " + str(error)[:200]
        else:
            log.failure("MTA-STS policy lookup of {domain} failed", failure, domain=domain)
            text = render_failure(domain, "internal-error", self.settings)
        self._count(_kind(text))
        return _frame(text)

    def _internal_error(self, failure: Failure, parsed: ParsedKey) -> bytes:
        log.failure("socketmap answer for {domain} failed", failure, domain=parsed.domain)
        self._count("temp")
        return _frame("TEMP internal error")
