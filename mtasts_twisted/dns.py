"""
Deferred DNS lookups: dnspython builds and parses the messages, Twisted
carries them over UDP, and over TCP when a UDP reply is truncated.

L{DNSResolver} implements L{mtasts_twisted.interfaces.IDNSResolver}: TXT,
MX and address lookups against configured nameservers (or those of
C{/etc/resolv.conf}), with per-try timeouts, a total time budget, checks of
every reply against its question, and a small TTL-honouring answer cache.
Unlike C{twisted.names.client} it keeps the AD bit of the reply and talks to
any port.

L{DNSHostnameResolver} is an L{IHostnameResolver} backed by it, and
L{reactor_with_resolver} wraps a reactor so that L{HostnameEndpoint} (and so
treq's C{Agent} and the SMTP client) resolve names through our nameservers,
never through the system's C{getaddrinfo}.

This module is named C{dns} inside the package; the dnspython imports below
are absolute, so they load dnspython's top-level C{dns} package.
"""

from __future__ import annotations

import collections
import errno
import functools
import ipaddress
import os
import socket
import struct
from typing import Any, Iterable, Sequence, Union

import attrs
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.wire
import idna
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorFDSet,
    IReactorPluggableNameResolver,
    IReadDescriptor,
    IResolutionReceiver,
)
from twisted.internet.protocol import DatagramProtocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from mtasts_twisted.interfaces import IDNSResolver
from mtasts_twisted.policy import DomainError, MTASTSError

__all__ = [
    "AddressAnswer",
    "DNSError",
    "DNSHostnameResolver",
    "DNSNoRecordError",
    "DNSResolver",
    "DNSTemporaryError",
    "MXAnswer",
    "MXHost",
    "TXTAnswer",
    "format_nameserver",
    "parse_nameserver",
    "reactor_with_resolver",
    "system_nameservers",
]

log = Logger()

#: A nameserver: an IP address (text) and a port.
Nameserver = tuple[str, int]

DEFAULT_PORT = 53
#: Seconds to wait for one reply from one nameserver.
DEFAULT_TIMEOUT = 2.0
#: Seconds one lookup (all servers, retries and CNAME steps) may take.
DEFAULT_BUDGET = 10.0
#: Rounds over the nameserver list (resolv.conf's default C{attempts:2}).
DEFAULT_ATTEMPTS = 2
#: Entries in the answer cache.
DEFAULT_CACHE_SIZE = 1024
#: Longest a negative answer is cached (RFC 2308 §5 lets us choose less).
MAX_NEGATIVE_TTL = 60
#: Longest a positive answer is cached, whatever its TTL says.
MAX_CACHE_TTL = 86400
#: CNAMEs followed in one lookup before giving up.
MAX_CNAME_CHAIN = 8
#: Largest reply accepted over TCP (the 2-byte length prefix allows no more).
MAX_TCP_REPLY = 65535
#: EDNS UDP payload we advertise (DNS flag day 2020: avoids fragmentation).
EDNS_PAYLOAD = 1232

# rcodes that are a definite answer; everything else is worth another server.
_DEFINITE_RCODES = frozenset({dns.rcode.NOERROR, dns.rcode.NXDOMAIN})


# --- errors ---------------------------------------------------------------


class DNSError(MTASTSError):
    """
    Base of DNS lookup failures.

    @ivar name: the name looked up (A-labels, no trailing dot).
    @ivar rdtype: the record type looked up, as text (C{"TXT"}).
    @ivar server: the nameserver that gave the decisive answer
        (C{"IP:PORT"}), or L{None}.
    """

    reason = "dns-lookup"

    def __init__(self, message: str, name: str = "", rdtype: str = "", server: str | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.rdtype = rdtype
        self.server = server


class DNSNoRecordError(DNSError):
    """
    A definite negative answer: the name does not exist (NXDOMAIN) or has no
    records of the type asked for (NODATA).

    @ivar nxdomain: C{True} for NXDOMAIN, C{False} for NODATA.
    """

    reason = "dns-no-record"

    def __init__(
        self, message: str, name: str = "", rdtype: str = "", server: str | None = None, nxdomain: bool = False
    ) -> None:
        super().__init__(message, name, rdtype, server)
        self.nxdomain = nxdomain


class DNSTemporaryError(DNSError):
    """
    A lookup that may succeed later: SERVFAIL, REFUSED, timeout, malformed
    reply, network error, broken CNAME chain or exhausted time budget.

    @ivar detail: what went wrong, per server tried, e.g.
        C{"SERVFAIL from 127.0.0.1:5353"}.
    """

    reason = "dns-lookup"

    def __init__(
        self, message: str, name: str = "", rdtype: str = "", server: str | None = None, detail: str = ""
    ) -> None:
        super().__init__(message, name, rdtype, server)
        self.detail = detail


# --- answers --------------------------------------------------------------


def _tuple(value: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(value)


@attrs.frozen
class TXTAnswer:
    """
    The TXT records of a name.

    @ivar name: the name asked for (A-labels, lower case, no trailing dot).
    @ivar strings: one text per RR: the RR's character-strings joined
        without separator (RFC 8461 §3.1), decoded as UTF-8 with
        replacement characters for invalid bytes.
    @ivar ttl: seconds the answer may be reused (the smallest TTL of the
        CNAME chain and the records; the remaining TTL when cached).
    @ivar authenticated: the AD bit of every reply used was set.
    """

    name: str
    strings: tuple[str, ...] = attrs.field(converter=_tuple)
    ttl: int
    authenticated: bool = False


@attrs.frozen(order=True)
class MXHost:
    """
    One mail exchanger.

    @ivar preference: the MX preference (lower is tried first).
    @ivar host: the exchange (A-labels, lower case, no trailing dot).
    """

    preference: int
    host: str


@attrs.frozen
class MXAnswer:
    """
    The mail exchangers of a domain.

    @ivar domain: the domain asked for (A-labels, no trailing dot).
    @ivar hosts: sorted by preference, then host name (stable; shuffling
        equal preferences is the delivery layer's job); C{()} for a null MX.
    @ivar ttl: seconds the answer may be reused.
    @ivar authenticated: the AD bit of every reply used was set.
    @ivar implicit: there was no MX, so the domain itself stands as the
        only exchange with preference 0 (RFC 5321 §5.1).
    @ivar null: the domain publishes a null MX: it accepts no mail
        (RFC 7505).
    """

    domain: str
    hosts: tuple[MXHost, ...] = attrs.field(converter=_tuple)
    ttl: int
    authenticated: bool = False
    implicit: bool = False
    null: bool = False


@attrs.frozen
class AddressAnswer:
    """
    The addresses of a host.

    @ivar host: the host asked for (A-labels, no trailing dot) or the IP
        literal given.
    @ivar addresses: IPv6 addresses (AAAA) first, then IPv4 (A), as text.
    @ivar ttl: seconds the answer may be reused.
    @ivar authenticated: the AD bit of every reply used was set.
    """

    host: str
    addresses: tuple[str, ...] = attrs.field(converter=_tuple)
    ttl: int
    authenticated: bool = False


# --- nameservers ----------------------------------------------------------


def _parse_port(text: str, original: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"invalid nameserver {original!r}: port {text!r} is not a number")
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"invalid nameserver {original!r}: port {port} out of range 1-65535")
    return port


def _parse_ip(text: str, original: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"invalid nameserver {original!r}: {text!r} is not an IP address"
            " (use IP, IP:PORT or [IPv6]:PORT; host names are not allowed)"
        ) from None


def parse_nameserver(text: str) -> Nameserver:
    """
    Parse a nameserver given as C{IP}, C{IPv4:PORT}, C{IPv6} or
    C{[IPv6]:PORT} (the CLI's and twistd's C{--nameserver}).

    @param text: the nameserver as written.
    @return: C{(ip, port)}, the IP normalised (IPv6 compressed), the port
        53 when not given.
    @raise ValueError: with a message naming C{text}, for anything else
        (host names, bad ports, unbalanced brackets, empty text).
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid nameserver {text!r}: expected text")
    value = text.strip()
    if not value:
        raise ValueError("invalid nameserver '': empty")
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"invalid nameserver {text!r}: missing ']'")
        address = _parse_ip(value[1:end], text)
        rest = value[end + 1 :]
        if not rest:
            port = DEFAULT_PORT
        elif rest.startswith(":"):
            port = _parse_port(rest[1:], text)
        else:
            raise ValueError(f"invalid nameserver {text!r}: unexpected {rest!r} after ']'")
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        address = _parse_ip(host, text)
        port = _parse_port(port_text, text)
    else:
        # A bare IPv4 address, or a bare IPv6 address (two or more colons).
        address = _parse_ip(value, text)
        port = DEFAULT_PORT
    return str(address), port


def format_nameserver(server: Nameserver) -> str:
    """
    Format a nameserver as C{IP:PORT} or C{[IPv6]:PORT} (the inverse of
    L{parse_nameserver}).

    @param server: C{(ip, port)}.
    @return: the text form, for messages and logs.
    """
    host, port = server
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def system_nameservers(path: str = "/etc/resolv.conf") -> tuple[Nameserver, ...]:
    """
    Read the nameservers of a resolv.conf file (no network I/O).

    @param path: the file to read.
    @return: its C{nameserver} lines as C{(ip, 53)} pairs, in order, bad
        lines skipped; C{(("127.0.0.1", 53),)} when the file is missing or
        names none (resolv.conf(5)'s default: a server on this machine).
    """
    servers: list[Nameserver] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1])
            except ValueError:
                log.warn("ignoring bad nameserver {value!r} in {path}", value=fields[1], path=path)
                continue
            servers.append((str(address), DEFAULT_PORT))
    return tuple(servers) or (("127.0.0.1", DEFAULT_PORT),)


def _is_ipv6(host: str) -> bool:
    return ":" in host


def _ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    # A host name is neither IPv6 (a colon) nor IPv4 (a final digit: no TLD
    # is numeric): skip the costly parse for the usual case.
    if ":" not in value and not value[-1:].isdigit():
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


# --- names ----------------------------------------------------------------


def _to_dns_name(name: str | bytes) -> dns.name.Name:
    """
    Turn a name into an absolute, lower-case, A-label L{dns.name.Name}.

    Labels are converted one by one so that underscore labels
    (C{_mta-sts}, C{_smtp._tls}) pass while U-labels get IDNA 2008 (UTS 46).
    """
    return _to_dns_name_and_text(name)[0]


#: Characters of a name whose text form needs no escaping (RFC 1035 §5.1).
_PLAIN_NAME = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def _to_dns_name_and_text(name: str | bytes) -> tuple[dns.name.Name, str]:
    """
    L{_to_dns_name}, and the name as L{_name_text} would give it, without
    the cost of formatting it again.
    """
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            raise DomainError(f"{name!r} is not an ASCII name") from None
    if not isinstance(name, str):
        raise DomainError(f"name must be text, not {type(name).__name__}")
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise DomainError(f"empty name {name!r}")
    labels = []
    for label in text.split("."):
        if label.isascii():
            labels.append(label.lower())
            continue
        try:
            labels.append(idna.encode(label, uts46=True, transitional=False).decode("ascii").lower())
        except (idna.IDNAError, UnicodeError) as e:
            raise DomainError(f"{name!r} is not a valid internationalised name: {e}") from None
    text = ".".join(labels)
    try:
        qname = dns.name.from_text(text + ".")
    except dns.exception.DNSException as e:
        raise DomainError(f"{name!r} is not a valid DNS name: {e}") from None
    if not _PLAIN_NAME.issuperset(text):
        text = _name_text(qname)  # escapes, as dnspython writes them
    return qname, text


def _name_text(name: dns.name.Name) -> str:
    """A name as lower-case text without the trailing dot."""
    return name.to_text(omit_final_dot=True).lower()


@functools.cache
def _type_text(rdtype: int) -> str:
    """C{dns.rdatatype.to_text}, once per type (an enum lookup otherwise)."""
    return dns.rdatatype.to_text(rdtype)


# --- the wire: one query to one server ------------------------------------


class _TryFailed(Exception):
    """One try at one server failed in a way another server may not."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# The query wire, built once per (name, type) try with the header and EDNS
# OPT record taken from a dnspython-built template: dnspython's make_query
# and to_wire cost ~150 us per query (Message, RRset and OPT objects, enum
# conversions) for bytes that differ only in the ID, the name and the type.
# test_dns checks the result byte for byte against make_query.
_QUERY_FLAGS = dns.flags.RD | dns.flags.AD  # RFC 6840 §5.7: AD asks for the AD bit
_TEMPLATE = dns.message.make_query(
    dns.name.root, dns.rdatatype.A, use_edns=0, payload=EDNS_PAYLOAD, id=0, flags=_QUERY_FLAGS
).to_wire()
#: Header after the ID: flags, QDCOUNT 1, ANCOUNT 0, NSCOUNT 0, ARCOUNT 1.
_HEADER_TAIL = _TEMPLATE[2:12]
#: The additional section: the OPT pseudo-RR (RFC 6891 §6.1.2).  In the
#: template it follows the root name (1 byte), QTYPE and QCLASS.
_OPT_RR = _TEMPLATE[12 + 1 + 4 :]
_IN_CLASS = int(dns.rdataclass.IN).to_bytes(2, "big")
# rcodes after which dnspython's is_response accepts an empty question.
_QUESTIONLESS_RCODES = frozenset({dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED})


@attrs.frozen
class _Query:
    """
    One query as sent: its ID, question and wire form.

    @ivar id: the random query ID (RFC 5452 §9.2).
    @ivar qname: the absolute name asked for.
    @ivar rdtype: the type asked for (class IN).
    @ivar wire: the message as sent: RD and AD set, EDNS0 with a payload
        of L{EDNS_PAYLOAD}.
    @ivar name_wire: C{qname} in wire form, lower case (to recognise the
        question of a reply without parsing it).
    @ivar question_tail: QTYPE and QCLASS in wire form.
    """

    id: int
    qname: dns.name.Name
    rdtype: int
    wire: bytes
    name_wire: bytes
    question_tail: bytes

    @classmethod
    def make(cls, qname: dns.name.Name, rdtype: int) -> _Query:
        """A query for C{qname}/C{rdtype} with a fresh random ID."""
        # RFC 5452 §9.2: an unpredictable ID (with the random port).
        query_id = int.from_bytes(os.urandom(2), "big")
        name_wire = qname.to_wire()
        question_tail = int(rdtype).to_bytes(2, "big") + _IN_CLASS
        wire = b"".join((query_id.to_bytes(2, "big"), _HEADER_TAIL, name_wire, question_tail, _OPT_RR))
        return cls(query_id, qname, rdtype, wire, name_wire.lower(), question_tail)

    def is_response(self, reply: _Reply) -> bool:
        """
        Whether C{reply} answers this query: QR set, same ID and opcode
        (QUERY), and our question (name case-insensitively, type, class IN),
        the rules of dnspython's C{Message.is_response}: like it, an error
        reply (FORMERR, SERVFAIL, NOTIMP, REFUSED) may omit the question.
        """
        flags = reply.flags
        if not flags & dns.flags.QR or reply.id != self.id or dns.opcode.from_flags(flags) != dns.opcode.QUERY:
            return False
        question = reply.question
        if not question:
            return reply.rcode in _QUESTIONLESS_RCODES
        # Every question of the reply must be ours and ours must be there:
        # one distinct question, ours (duplicates of it, as dnspython allows).
        return all(
            rdclass == dns.rdataclass.IN and rdtype == self.rdtype and name == self.qname
            for name, rdtype, rdclass in question
        )


# --- the reply: what the resolver uses of it ------------------------------


@attrs.frozen
class _RRs:
    """
    The records of one name and type (class IN) in a reply's answer
    section, as dnspython's C{from_wire} gathers them into an RRset.

    @ivar ttl: the smallest TTL of the records (RFC 2181 §5.2 wants them
        equal; a TTL with the top bit set counts as 0, RFC 2181 §8).
    @ivar rdatas: the distinct rdatas in order of appearance (for a
        singleton type such as CNAME: the last one).
    """

    ttl: int
    rdatas: tuple[Any, ...]


@attrs.frozen
class _Reply:
    """
    What the resolver uses of one reply, and nothing more.

    @ivar id: the message ID.
    @ivar flags: the header flags (QR, opcode, AA, TC, RD, RA, AD, CD and
        the low rcode bits).
    @ivar rcode: the full rcode, with the EDNS extended bits of the OPT
        record (RFC 6891 §6.1.3).
    @ivar question: C{(name, rdtype, rdclass)} per question entry.
    @ivar answers: C{(name, rdtype, L{_RRs})} for the answer section's
        RRsets of class IN whose type is the one asked or CNAME, in order
        of first appearance: all that following a CNAME chain needs.
    @ivar soa: C{(ttl, minimum)} of the authority section's first SOA
        RRset, for the negative-caching TTL (RFC 2308 §5), or L{None}.
    """

    id: int
    flags: int
    rcode: int
    question: tuple[tuple[dns.name.Name, int, int], ...]
    answers: tuple[tuple[dns.name.Name, int, _RRs], ...]
    soa: tuple[int, int] | None

    def records(self, name: dns.name.Name, rdtype: int) -> _RRs | None:
        """The answer records of C{name} (any case) and C{rdtype}, or L{None}."""
        for owner, owner_type, rrs in self.answers:
            if owner_type == rdtype and (owner is name or owner == name):
                return rrs
        return None

    @classmethod
    def from_message(cls, message: dns.message.Message, rdtype: int) -> _Reply:
        """
        The view of a message parsed by dnspython, for a query of C{rdtype}.
        """
        answers = tuple(
            (rrset.name, int(rrset.rdtype), _RRs(rrset.ttl, tuple(rrset)))
            for rrset in message.answer
            if rrset.rdclass == dns.rdataclass.IN
            and rrset.rdtype in (rdtype, dns.rdatatype.CNAME)
            and rrset.covers == dns.rdatatype.NONE
            and len(rrset)
        )
        soa = next(
            (
                (rrset.ttl, rrset[0].minimum)
                for rrset in message.authority
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset)
            ),
            None,
        )
        question = tuple((q.name, int(q.rdtype), int(q.rdclass)) for q in message.question)
        return cls(message.id, int(message.flags), int(message.rcode()), question, answers, soa)

    @classmethod
    def from_wire(cls, wire: bytes, query: _Query) -> _Reply:
        """
        Parse a reply to C{query}: L{_read_reply} for the usual reply, and
        dnspython's full C{dns.message.from_wire} for anything else, so that
        every malformed reply fails as C{from_wire} fails it.

        @raise Exception: what C{dns.message.from_wire} raises.
        """
        try:
            return _read_reply(wire, query)
        except Exception:  # noqa: BLE001 - any failure: from_wire decides
            # Unusual or malformed (truncated mid-record, TSIG, an OPT out of
            # place, an opcode other than QUERY, trailing bytes): let
            # dnspython decide, and raise, exactly as it always did.
            return cls.from_message(dns.message.from_wire(wire), query.rdtype)


class _Unusual(Exception):
    """A reply L{_read_reply} leaves to dnspython's full parser."""


_HEADER = struct.Struct("!HHHHHH")
_RR_HEADER = struct.Struct("!HHIH")
#: RFC 1035 §4.1.4: a compression pointer to offset 12, where a reply's
#: question name starts; the usual owner name of answer records.
_POINTER_TO_QUESTION = b"\xc0\x0c"
_OPCODE_BITS = 0x7800
_ANSWER, _AUTHORITY, _ADDITIONAL = 1, 2, 3
_SIGNATURE_TYPES = frozenset({dns.rdatatype.RRSIG, dns.rdatatype.SIG})


def _read_reply(wire: bytes, query: _Query) -> _Reply:
    """
    Read the parts of a reply the resolver uses, with dnspython's own
    parsers (C{dns.wire.Parser}, C{dns.name.from_wire_parser},
    C{dns.rdata.from_wire_parser}) but without building a
    C{_Reply}: C{from_wire} spends most of its ~200 us on
    RRset objects, their hashing and enum conversions for records nobody
    reads.

    It is never more lenient than C{dns.message.from_wire}: every record's
    owner name and rdata are parsed (so malformed ones fail), the OPT rules
    and the absence of trailing bytes are checked; whatever it does not
    handle raises, and the caller falls back to C{from_wire}.  test_dns
    compares both over generated and mutated replies.

    @raise Exception: anything, for a reply to leave to C{from_wire}.
    """
    msg_id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    rdtype = query.rdtype
    if flags & _OPCODE_BITS or rdtype in _SIGNATURE_TYPES:
        raise _Unusual("opcode other than QUERY, or a signature type asked")
    parser = dns.wire.Parser(wire)
    qname = query.qname
    name_wire = query.name_wire
    name_end = 12 + len(name_wire)
    # The question as we sent it (any case, uncompressed), as nearly every
    # server echoes it: compared as bytes instead of parsed.
    if (
        qdcount == 1
        and wire[12:name_end].lower() == name_wire
        and wire[name_end : name_end + 4] == query.question_tail
    ):
        question: tuple[tuple[dns.name.Name, int, int], ...] = ((qname, rdtype, dns.rdataclass.IN),)
        pos = name_end + 4
        at_question: dns.name.Name | None = qname
    else:
        parser.seek(12)
        entries = []
        for _ in range(qdcount):
            name = dns.name.from_wire_parser(parser, True)
            entry_type, entry_class = parser.get_struct("!HH")
            entries.append((name, entry_type, entry_class))
        question = tuple(entries)
        pos = parser.current
        at_question = None  # what offset 12 names is not known: parse pointers
    answers: list[_Gathering] = []
    soa: tuple[dns.name.Name, int, int, Any] | None = None
    ednsflags = 0
    opt_seen = False
    for section, count in ((_ANSWER, ancount), (_AUTHORITY, nscount), (_ADDITIONAL, arcount)):
        for _ in range(count):
            if at_question is not None and wire[pos : pos + 2] == _POINTER_TO_QUESTION:
                name = at_question
                pos += 2
            elif wire[pos : pos + 1] == b"\x00":
                name = dns.name.root  # the OPT record's owner
                pos += 1
            else:
                parser.seek(pos)
                name = dns.name.from_wire_parser(parser, True)
                pos = parser.current
            rr_type, rr_class, ttl, rdlen = _RR_HEADER.unpack_from(wire, pos)
            pos += 10
            if rr_type == dns.rdatatype.OPT:
                # dnspython's BadEDNS rules (RFC 6891 §6.1.1).
                if section != _ADDITIONAL or opt_seen or name != dns.name.root:
                    raise _Unusual("misplaced OPT record")
                opt_seen = True
                ednsflags = ttl
            elif rr_type == dns.rdatatype.TSIG:
                raise _Unusual("TSIG record")
            if rr_type == dns.rdatatype.OPT:
                if rdlen:
                    # EDNS options: parsed only to fail as from_wire fails;
                    # an empty OPT rdata is always valid.
                    parser.seek(pos)
                    with parser.restrict_to(rdlen):
                        dns.rdata.from_wire_parser(rr_class, rr_type, parser, None)
                pos += rdlen
                continue
            parser.seek(pos)
            with parser.restrict_to(rdlen):
                rdata = dns.rdata.from_wire_parser(rr_class, rr_type, parser, None)
            pos += rdlen
            if ttl > 0x7FFFFFFF:
                ttl = 0  # RFC 2181 §8, as from_wire does
            if section == _ANSWER:
                if rr_class == dns.rdataclass.IN and (rr_type == rdtype or rr_type == dns.rdatatype.CNAME):
                    _add_record(answers, name, rr_type, ttl, rdata)
            elif section == _AUTHORITY and rr_type == dns.rdatatype.SOA:
                # Only the first SOA RRset counts; SOA is a singleton type:
                # a later record of that RRset replaces the earlier one.
                if soa is None:
                    soa = (name, rr_class, ttl, rdata)
                elif soa[1] == rr_class and soa[0] == name:
                    soa = (name, rr_class, min(soa[2], ttl), rdata)
    if pos != len(wire):
        raise _Unusual("trailing bytes")
    rcode = (flags & 0x000F) | ((ednsflags >> 20) & 0xFF0)  # RFC 6891 §6.1.3
    return _Reply(
        msg_id,
        flags,
        rcode,
        question,
        tuple((g.name, g.rdtype, _RRs(g.ttl, tuple(g.rdatas))) for g in answers),
        None if soa is None else (soa[2], soa[3].minimum),
    )


def _add_record(answers: list[_Gathering], name: dns.name.Name, rr_type: int, ttl: int, rdata: Any) -> None:
    """Add a record to its RRset as dnspython's C{Rdataset.add} does."""
    for gathering in answers:
        if gathering.rdtype == rr_type and (gathering.name is name or gathering.name == name):
            gathering.add(ttl, rdata)
            return
    answers.append(_Gathering(name, rr_type, ttl, rdata))


#: Records of one RRset compared one by one before a set is built: hashing
#: an rdata means rendering it, costlier than a few comparisons.
_LINEAR_DEDUP = 4


class _Gathering:
    """The records of one RRset while a reply is read (mutable, short-lived)."""

    __slots__ = ("_seen", "name", "rdatas", "rdtype", "ttl")

    def __init__(self, name: dns.name.Name, rdtype: int, ttl: int, rdata: Any) -> None:
        self.name = name
        self.rdtype = rdtype
        self.ttl = ttl
        self.rdatas = [rdata]
        self._seen: set[Any] | None = None

    def add(self, ttl: int, rdata: Any) -> None:
        # Rdataset.add: the smallest TTL; a singleton type keeps the last
        # record; otherwise a set in order of first appearance.
        self.ttl = min(self.ttl, ttl)
        if dns.rdatatype.is_singleton(self.rdtype):
            self.rdatas = [rdata]
            return
        if self._seen is None:
            if rdata in self.rdatas:
                return
            self.rdatas.append(rdata)
            if len(self.rdatas) > _LINEAR_DEDUP:
                self._seen = set(self.rdatas)
        elif rdata not in self._seen:
            self._seen.add(rdata)
            self.rdatas.append(rdata)


def _reply_id(data: bytes) -> int | None:
    if len(data) < 2:
        return None
    return int.from_bytes(data[:2], "big")


def _parse_reply(query: _Query, data: bytes, server: str, transport: str) -> _Reply | None:
    """
    Parse a reply and check it against the question.

    The ID is checked before the (costly) parse; the source address before
    this is called.  No log event for an ignored datagram: a flood of
    forged replies must not turn into a flood of log lines.

    @return: the reply; L{None} when it does not answer our query (wrong ID
        or question, not a response): such datagrams are ignored and we keep
        waiting, since anyone can send them (RFC 5452 §9.1).
    @raise _TryFailed: when the reply carries our ID but cannot be parsed.
    """
    if _reply_id(data) != query.id:
        return None
    try:
        reply = _Reply.from_wire(data, query)
    except Exception as e:  # dnspython raises many exception types for bad wire data
        raise _TryFailed(f"malformed reply from {server} over {transport}: {e.__class__.__name__}: {e}") from None
    # Checks QR, ID, opcode and the question (name, type and class).
    if not query.is_response(reply):
        return None
    return reply


def _same_host(address: Any, host: str) -> bool:
    """Whether C{address} (as a socket reports it) is the IP text C{host}."""
    if address == host:
        return True
    try:
        return ipaddress.ip_address(address) == ipaddress.ip_address(host)
    except (ValueError, TypeError):
        return False


class _UDPExchange(DatagramProtocol):
    """
    Receives the reply to one query on one connected UDP socket: either a
    Twisted UDP port (L{IReactorUDP.listenUDP}) or a L{_UDPSocket}.
    """

    noisy = False  # no "starting/stopping protocol" log lines per query

    def __init__(self, query: _Query, server: Nameserver, label: str) -> None:
        self.query = query
        self.server = server
        self.label = label
        self.reply: Deferred[_Reply] = Deferred()
        #: Set before we close the socket ourselves, so that stopProtocol
        #: does not fail a reply the closing coroutine is still handling.
        self.closing = False

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.reply.called:
            return
        # The socket is connected, so the kernel filters sources already;
        # check anyway, in case the transport is not (RFC 5452 §9.1).
        try:
            same_source = addr[1] == self.server[1] and _same_host(addr[0], self.server[0])
        except (TypeError, IndexError):
            same_source = False
        if not same_source:
            return
        try:
            reply = _parse_reply(self.query, data, self.label, "UDP")
        except _TryFailed as e:
            self.reply.errback(e)
            return
        if reply is not None:
            self.reply.callback(reply)

    def time_out(self, timeout: float) -> None:
        """No reply came within C{timeout} seconds."""
        if not self.reply.called:
            self.reply.errback(_TryFailed(f"timeout after {timeout:g}s waiting for {self.label} (UDP)"))

    def connectionRefused(self) -> None:
        # ICMP port unreachable: nothing listens there.
        if not self.reply.called:
            self.reply.errback(_TryFailed(f"connection refused by {self.label} (UDP)"))

    def networkError(self, error: OSError) -> None:
        """The socket reported an error other than a refusal."""
        if not self.reply.called:
            self.reply.errback(_TryFailed(f"network error on UDP socket for {self.label}: {error}"))

    def stopProtocol(self) -> None:
        # The reactor closes the socket itself on a socket error (an ICMP
        # port unreachable reported as EPOLLERR, for one).
        if not self.reply.called and not self.closing:
            self.reply.errback(_TryFailed(f"UDP socket for {self.label} closed by a network error (unreachable?)"))


#: Datagrams read per readiness event: bounded, so that a flood of forged
#: datagrams cannot keep the reactor in one socket.
_MAX_READS = 16


@implementer(IReadDescriptor)
class _UDPSocket:
    """
    A connected, non-blocking UDP socket for one query, read by the
    reactor (L{IReactorFDSet}) directly.

    Why not C{listenUDP}: a Twisted UDP port per query costs a C{Port}
    object, an unconditional "UDP Port Opened/Closed" log event each way,
    and a close deferred to the next reactor turn; this costs the system
    calls only.  The port is still fresh and kernel-chosen at random per
    query (RFC 5452 §9.2): C{connect} on an unbound UDP socket binds it
    like C{bind} to port 0 does (Linux picks a random ephemeral port).
    """

    def __init__(self, reactor: Any, server: Nameserver, exchange: _UDPExchange) -> None:
        """
        @raise OSError: the socket cannot be made or connected.
        """
        host, port = server
        self._reactor = reactor
        self._exchange = exchange
        self._socket = socket.socket(socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._socket.setblocking(False)
            self._socket.connect((host, port))
        except OSError:
            self._socket.close()
            raise
        self._fileno = self._socket.fileno()
        self._reading = False

    def start(self, data: bytes) -> None:
        """
        Send C{data} and start reading.

        @raise OSError: sending failed.
        """
        self._reactor.addReader(self)
        self._reading = True
        self._socket.send(data)

    def close(self) -> None:
        """Stop reading and close the socket (idempotent)."""
        if self._reading:
            self._reading = False
            # Before close: a closed socket's number may be reused at once.
            self._reactor.removeReader(self)
        self._socket.close()

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "DNS-UDP"

    def doRead(self) -> None:
        exchange = self._exchange
        for _ in range(_MAX_READS):
            if exchange.reply.called:
                return
            try:
                data, addr = self._socket.recvfrom(MAX_TCP_REPLY)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                # ICMP port unreachable for an earlier datagram.
                exchange.connectionRefused()
                return
            except OSError as e:
                exchange.networkError(e)
                return
            exchange.datagramReceived(data, addr)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw an error condition (EPOLLERR: an ICMP error on the
        # connected socket) and stopped reading.
        self._reading = False
        error = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error == errno.ECONNREFUSED:
            self._exchange.connectionRefused()
        else:
            self._exchange.networkError(OSError(error, os.strerror(error)) if error else OSError(reason.getErrorMessage()))


class _TCPExchange(Int16StringReceiver):
    """
    Sends one query over TCP (RFC 1035 §4.2.2: 2-byte length prefix) and
    fires L{done} once the connection is closed after the reply.
    """

    MAX_LENGTH = MAX_TCP_REPLY

    def __init__(self, query: _Query, server: Nameserver) -> None:
        self.query = query
        self.label = format_nameserver(server)
        self.done: Deferred[_Reply] = Deferred(self._cancel)
        self._outcome: _Reply | _TryFailed | None = None

    def _cancel(self, d: Deferred[_Reply]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionMade(self) -> None:
        self.sendString(self.query.wire)

    def stringReceived(self, data: bytes) -> None:
        if self._outcome is not None:
            return
        try:
            reply = _parse_reply(self.query, data, self.label, "TCP")
        except _TryFailed as e:
            self._outcome = e
        else:
            if reply is None:
                return
            self._outcome = reply
        self.transport.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        self._outcome = _TryFailed(f"reply of {length} bytes from {self.label} over TCP exceeds {self.MAX_LENGTH}")
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if isinstance(self._outcome, _Reply):
            self.done.callback(self._outcome)
        elif isinstance(self._outcome, _TryFailed):
            self.done.errback(self._outcome)
        else:
            self.done.errback(
                _TryFailed(f"TCP connection to {self.label} closed without a reply: {reason.getErrorMessage()}")
            )


# --- the answer cache -----------------------------------------------------


@attrs.frozen
class _Records:
    """The records of one (name, type) after following CNAMEs."""

    rdatas: tuple[Any, ...]
    ttl: int
    authenticated: bool
    server: str


@attrs.frozen
class _Negative:
    """A cached definite negative answer."""

    nxdomain: bool
    target: str
    server: str


#: (the name as L{_name_text} gives it: lower case, escaped, no final dot; type)
_CacheKey = tuple[str, int]
_Cached = Union[_Records, _Negative]


class _AnswerCache:
    """A bounded LRU map whose entries expire on the reactor's clock."""

    def __init__(self, clock: Any, size: int) -> None:
        self._clock = clock
        self._size = size
        self._entries: collections.OrderedDict[_CacheKey, tuple[float, _Cached]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: _CacheKey) -> tuple[_Cached, int] | None:
        """Return the live entry and its remaining whole seconds, or L{None}."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        remaining = expires - self._clock.seconds()
        if remaining <= 0:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value, int(remaining)

    def put(self, key: _CacheKey, value: _Cached, ttl: float) -> None:
        """Store C{value} for C{ttl} seconds (nothing when C{ttl <= 0})."""
        if self._size <= 0 or ttl <= 0:
            return
        self._entries[key] = (self._clock.seconds() + min(ttl, MAX_CACHE_TTL), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()


def _negative_ttl(reply: _Reply) -> int:
    # RFC 2308 §5: a negative answer lives for min(SOA TTL, SOA MINIMUM);
    # without an SOA in the authority section it SHOULD NOT be cached.
    if reply.soa is None:
        return 0
    ttl, minimum = reply.soa
    return max(0, min(ttl, minimum, MAX_NEGATIVE_TTL))


# --- the resolver ---------------------------------------------------------


@implementer(IDNSResolver)
class DNSResolver:
    """
    Deferred DNS lookups against a list of recursive nameservers.

    Each query goes over UDP from a fresh socket on a random port with a
    random ID; a truncated reply is retried over TCP at the same server.
    SERVFAIL, REFUSED, timeouts, malformed replies and network errors move
    on to the next server; servers are tried in turn for C{attempts}
    rounds, all within C{budget} seconds per lookup.

    @ivar nameservers: the C{(ip, port)} pairs, in the order tried.
    """

    def __init__(
        self,
        reactor: Any,
        nameservers: Sequence[str | Nameserver] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        budget: float = DEFAULT_BUDGET,
        attempts: int = DEFAULT_ATTEMPTS,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        """
        @param reactor: provides C{IReactorTime}, C{IReactorUDP} and
            C{IReactorTCP}; its C{seconds()} is the cache's clock.
        @param nameservers: C{"IP[:PORT]"} strings or C{(ip, port)} pairs;
            L{None} reads C{/etc/resolv.conf}.
        @param timeout: seconds to wait for one reply.
        @param budget: seconds one lookup may take in total.
        @param attempts: rounds over the nameserver list.
        @param cache_size: answers kept; 0 disables the cache.
        @raise ValueError: for an empty nameserver list, a bad nameserver or
            a non-positive timeout, budget or attempts.
        """
        if nameservers is None:
            servers = system_nameservers()
        else:
            servers = tuple(
                parse_nameserver(s) if isinstance(s, str) else (str(ipaddress.ip_address(s[0])), int(s[1]))
                for s in nameservers
            )
        if not servers:
            raise ValueError("at least one nameserver is needed")
        if timeout <= 0 or budget <= 0 or attempts < 1:
            raise ValueError("timeout and budget must be positive and attempts at least 1")
        self._reactor = reactor
        self.nameservers: tuple[Nameserver, ...] = servers
        self._timeout = float(timeout)
        self._budget = float(budget)
        self._attempts = int(attempts)
        self._cache = _AnswerCache(reactor, cache_size)
        # Reactors with file descriptors (epoll, poll, select, kqueue) get
        # plain sockets; others (IOCP) and fakes get listenUDP.
        self._fd_reactor = IReactorFDSet.providedBy(reactor)

    def __repr__(self) -> str:
        servers = ", ".join(format_nameserver(s) for s in self.nameservers)
        return f"<DNSResolver [{servers}]>"

    def clear_cache(self) -> None:
        """Forget every cached answer."""
        self._cache.clear()

    # -- IDNSResolver --

    def lookup_txt(self, name: str) -> Deferred[TXTAnswer]:
        """
        Look up the TXT records of C{name}, following CNAMEs.

        @param name: a domain name (A-labels; U-labels are converted).
        @return: L{Deferred} firing with a L{TXTAnswer}, or failing with
            L{DNSNoRecordError}, L{DNSTemporaryError}, or L{DomainError} for
            a name that is not a valid DNS name.
        """
        return Deferred.fromCoroutine(self._lookup_txt(name))

    def lookup_mx(self, domain: str) -> Deferred[MXAnswer]:
        """
        Look up the mail exchangers of C{domain}.

        @param domain: a domain name (A-labels; U-labels are converted).
        @return: L{Deferred} firing with an L{MXAnswer}: hosts sorted by
            preference; the implicit MX when the domain has no MX but has
            addresses (RFC 5321 §5.1); C{null=True} for a null MX (RFC
            7505). Fails with L{DNSNoRecordError} when the domain does not
            exist or has neither MX nor addresses, L{DNSTemporaryError}
            otherwise.
        """
        return Deferred.fromCoroutine(self._lookup_mx(domain))

    def lookup_addresses(self, host: str) -> Deferred[AddressAnswer]:
        """
        Look up the AAAA and A records of C{host} (in parallel).

        An IP literal is answered without DNS. One type failing
        temporarily while the other has addresses still succeeds.

        @param host: a host name or IP literal.
        @return: L{Deferred} firing with an L{AddressAnswer} (IPv6 first),
            or failing with L{DNSNoRecordError} when neither type has
            records, L{DNSTemporaryError} when either failed temporarily
            and neither had records.
        """
        return Deferred.fromCoroutine(self._lookup_addresses(host))

    # -- lookups --

    async def _lookup_txt(self, name: str) -> TXTAnswer:
        qname, text = _to_dns_name_and_text(name)
        records = await self._resolve(qname, dns.rdatatype.TXT, text)
        # RFC 8461 §3.1: the character-strings of one TXT RR are concatenated
        # without separator before parsing; RRs stay separate.
        strings = tuple(b"".join(rdata.strings).decode("utf-8", errors="replace") for rdata in records.rdatas)
        return TXTAnswer(text, strings, records.ttl, records.authenticated)

    async def _lookup_mx(self, domain: str) -> MXAnswer:
        qname, text = _to_dns_name_and_text(domain)
        try:
            records = await self._resolve(qname, dns.rdatatype.MX, text)
        except DNSNoRecordError as e:
            if e.nxdomain:
                raise
            # RFC 5321 §5.1: no MX records, but the name has an address:
            # it is its own implicit MX with preference 0.
            try:
                addresses = await self._addresses(qname, text)
            except DNSNoRecordError as e2:
                raise DNSNoRecordError(
                    f"{text} has no MX records and no A/AAAA records for an implicit MX"
                    f" (RFC 5321 §5.1; from {e2.server or e.server})",
                    text,
                    "MX",
                    e2.server or e.server,
                    nxdomain=False,
                ) from None
            return MXAnswer(
                text, (MXHost(0, text),), addresses.ttl, addresses.authenticated, implicit=True
            )
        hosts = {(rdata.preference, rdata.exchange) for rdata in records.rdatas}
        # RFC 7505 §3: a null MX is a single MX whose exchange is the root.
        if all(exchange == dns.name.root for _, exchange in hosts):
            return MXAnswer(text, (), records.ttl, records.authenticated, null=True)
        # RFC 7505 §3 forbids a null MX beside other MXes; such a "." host
        # cannot be connected to, so it is dropped and the others are kept.
        ordered = sorted(
            MXHost(int(preference), _name_text(exchange))
            for preference, exchange in hosts
            if exchange != dns.name.root
        )
        return MXAnswer(text, tuple(ordered), records.ttl, records.authenticated)

    async def _lookup_addresses(self, host: str) -> AddressAnswer:
        literal = _ip_literal(host) if isinstance(host, str) else None
        if literal is not None:
            return AddressAnswer(str(literal), (str(literal),), 0, False)
        return await self._addresses(*_to_dns_name_and_text(host))

    async def _addresses(self, qname: dns.name.Name, text: str) -> AddressAnswer:
        types = (dns.rdatatype.AAAA, dns.rdatatype.A)
        # Both types at once (their queries are in flight together).
        lookups = [Deferred.fromCoroutine(self._resolve(qname, rdtype, text)) for rdtype in types]
        results = await defer.DeferredList(lookups, consumeErrors=True)
        addresses: list[str] = []
        ttls: list[int] = []
        authenticated = True
        errors: list[BaseException] = []
        for ok, value in results:
            if ok:
                for rdata in value.rdatas:
                    if rdata.address not in addresses:
                        addresses.append(rdata.address)
                ttls.append(value.ttl)
                authenticated = authenticated and value.authenticated
            else:
                errors.append(value.value)
        if addresses:
            return AddressAnswer(text, tuple(addresses), min(ttls), authenticated)
        temporary = [e for e in errors if isinstance(e, DNSTemporaryError)]
        if temporary:
            detail = "; ".join(f"{e.rdtype}: {e.detail}" for e in temporary)
            raise DNSTemporaryError(
                f"address lookup of {text} failed temporarily: {detail}",
                text,
                "AAAA/A",
                temporary[0].server,
                detail,
            )
        if len(errors) == len(types) and all(isinstance(e, DNSNoRecordError) for e in errors):
            nxdomain = any(e.nxdomain for e in errors)  # type: ignore[attr-defined]
            server = errors[0].server  # type: ignore[attr-defined]
            what = "does not exist" if nxdomain else "has no AAAA or A records"
            raise DNSNoRecordError(f"{text} {what} (from {server})", text, "AAAA/A", server, nxdomain=nxdomain)
        raise errors[0]

    # -- (name, type) → records, following CNAMEs, through the cache --

    async def _resolve(self, qname: dns.name.Name, rdtype: int, name: str) -> _Records:
        """
        @param name: C{qname} as L{_name_text} gives it (for messages, and
            as the cache key: a short string costs a quarter of a C{Name}).
        """
        key = (name, rdtype)
        type_text = _type_text(rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            value, remaining = cached
            if isinstance(value, _Negative):
                raise self._no_record(name, type_text, value.target, value.server, value.nxdomain)
            return attrs.evolve(value, ttl=remaining)

        deadline = self._reactor.seconds() + self._budget
        chain: list[dns.name.Name] = [qname]
        ttl = MAX_CACHE_TTL
        authenticated = True
        current = qname
        while True:
            reply, server = await self._query(current, rdtype, deadline, name, type_text)
            authenticated = authenticated and bool(reply.flags & dns.flags.AD)
            asked = current
            # Walk the answer section from the name asked: the records, or
            # a CNAME to follow (RFC 1034 §3.6.2).
            while True:
                rrs = reply.records(current, rdtype)
                if rrs is not None:
                    records = _Records(rrs.rdatas, min(ttl, rrs.ttl), authenticated, server)
                    self._cache.put(key, records, records.ttl)
                    return records
                cname = reply.records(current, dns.rdatatype.CNAME)
                if cname is None:
                    break
                ttl = min(ttl, cname.ttl)
                target = cname.rdatas[0].target
                # A CNAME loop or an over-long chain is a broken zone that
                # its owner can fix: temporary, as recursive resolvers
                # (which answer SERVFAIL) treat it, never "no record".
                if target in chain:
                    path = " -> ".join(_name_text(n) for n in chain + [target])
                    raise self._temporary(name, type_text, server, f"CNAME loop: {path} (from {server})")
                chain.append(target)
                if len(chain) - 1 > MAX_CNAME_CHAIN:
                    raise self._temporary(
                        name, type_text, server, f"CNAME chain longer than {MAX_CNAME_CHAIN} from {server}"
                    )
                current = target
            if reply.rcode == dns.rcode.NXDOMAIN:
                # RFC 6604 §2: after a CNAME chain, NXDOMAIN is about its
                # last name.
                negative = _Negative(True, _name_text(current), server)
            elif current == asked:
                negative = _Negative(False, _name_text(current), server)
            else:
                # The server gave a CNAME but not the records of its target
                # (an authoritative server, or a chain leaving its zones):
                # ask for the target.
                continue
            self._cache.put(key, negative, min(ttl, _negative_ttl(reply)))
            raise self._no_record(name, type_text, negative.target, server, negative.nxdomain)

    def _no_record(self, name: str, rdtype: str, target: str, server: str, nxdomain: bool) -> DNSNoRecordError:
        via = "" if target == name else f" (via CNAME to {target})"
        if nxdomain:
            message = f"{name}{via} does not exist (NXDOMAIN for {rdtype} from {server})"
        else:
            message = f"{name}{via} has no {rdtype} records (NODATA from {server})"
        return DNSNoRecordError(message, name, rdtype, server, nxdomain=nxdomain)

    def _temporary(self, name: str, rdtype: str, server: str | None, detail: str) -> DNSTemporaryError:
        log.info("DNS {rdtype} lookup of {name} failed: {detail}", rdtype=rdtype, name=name, detail=detail)
        return DNSTemporaryError(
            f"{rdtype} lookup of {name} failed temporarily: {detail}", name, rdtype, server, detail
        )

    async def _query(
        self, qname: dns.name.Name, rdtype: int, deadline: float, name: str, type_text: str
    ) -> tuple[_Reply, str]:
        """
        Ask the nameservers in turn until one gives a definite answer
        (NOERROR or NXDOMAIN).

        @return: the reply and the server (text) that gave it.
        @raise DNSTemporaryError: when none did within the budget.
        """
        failures: list[str] = []
        for _ in range(self._attempts):
            for server in self.nameservers:
                remaining = deadline - self._reactor.seconds()
                if remaining <= 0:
                    failures.append(f"time budget of {self._budget:g}s exhausted")
                    raise self._temporary(name, type_text, None, "; ".join(failures))
                try:
                    return await self._exchange(qname, rdtype, server, deadline), format_nameserver(server)
                except _TryFailed as e:
                    log.debug(
                        "DNS {rdtype} query for {qname} failed: {detail}",
                        rdtype=type_text,
                        qname=_name_text(qname),
                        detail=e.detail,
                    )
                    failures.append(e.detail)
        last = format_nameserver(self.nameservers[-1])
        raise self._temporary(name, type_text, last, "; ".join(dict.fromkeys(failures)))

    async def _exchange(
        self, qname: dns.name.Name, rdtype: int, server: Nameserver, deadline: float
    ) -> _Reply:
        """One server: UDP, then TCP if the reply is truncated."""
        label = format_nameserver(server)
        query = _Query.make(qname, rdtype)
        timeout = min(self._timeout, deadline - self._reactor.seconds())
        # No log line per query or per cache hit: under twistd every debug
        # event is written, and these are on the lookup hot path.
        reply = await self._udp_try(query, server, label, timeout)
        if reply.flags & dns.flags.TC:
            # RFC 7766 §5 / RFC 1035 §4.2.1: truncated, so ask again over TCP.
            timeout = min(self._timeout, deadline - self._reactor.seconds())
            if timeout <= 0:
                raise _TryFailed(f"truncated reply from {label} and no time left for TCP")
            log.debug("truncated DNS reply from {server}; retrying over TCP", server=label)
            reply = await self._tcp_try(query, server, timeout)
        rcode = reply.rcode
        if rcode not in _DEFINITE_RCODES:
            raise _TryFailed(f"{dns.rcode.to_text(rcode)} from {label}")
        return reply

    async def _udp_try(self, query: _Query, server: Nameserver, label: str, timeout: float) -> _Reply:
        exchange = _UDPExchange(query, server, label)
        if self._fd_reactor:
            return await self._socket_try(exchange, server, label, timeout)
        return await self._port_try(exchange, server, label, timeout)

    async def _socket_try(
        self, exchange: _UDPExchange, server: Nameserver, label: str, timeout: float
    ) -> _Reply:
        """A UDP try on a L{_UDPSocket} (reactors with L{IReactorFDSet})."""
        try:
            # RFC 5452 §9.2: a fresh socket, so a fresh random source port,
            # per query.
            udp = _UDPSocket(self._reactor, server, exchange)
        except OSError as e:
            raise _TryFailed(f"cannot open a UDP socket for {label}: {e}") from None
        try:
            try:
                udp.start(exchange.query.wire)
            except OSError as e:
                raise _TryFailed(f"network error sending to {label}: {e}") from None
            return await self._wait(exchange, label, timeout)
        finally:
            exchange.closing = True
            udp.close()

    async def _port_try(
        self, exchange: _UDPExchange, server: Nameserver, label: str, timeout: float
    ) -> _Reply:
        """
        A UDP try on a Twisted UDP port, for reactors without
        L{IReactorFDSet} (the IOCP reactor; test fakes).
        """
        host, port_number = server
        try:
            # Port 0: a fresh, kernel-chosen random source port per query.
            port = self._reactor.listenUDP(0, exchange, interface="::" if _is_ipv6(host) else "")
        except ierror.CannotListenError as e:
            raise _TryFailed(f"cannot open a UDP socket for {label}: {e}") from None
        try:
            try:
                port.connect(host, port_number)
                port.write(exchange.query.wire)
            except OSError as e:
                raise _TryFailed(f"network error sending to {label}: {e}") from None
            return await self._wait(exchange, label, timeout)
        finally:
            exchange.closing = True
            stopped = port.stopListening()
            if isinstance(stopped, Deferred):
                await stopped

    async def _wait(self, exchange: _UDPExchange, label: str, timeout: float) -> _Reply:
        # A plain timer that fails the reply itself: Deferred.addTimeout
        # costs a cancellation, a translation of its CancelledError and two
        # more callbacks per query, on the cold-lookup path.
        timer = self._reactor.callLater(timeout, exchange.time_out, timeout)
        try:
            return await exchange.reply
        finally:
            if timer.active():
                timer.cancel()

    async def _tcp_try(self, query: _Query, server: Nameserver, timeout: float) -> _Reply:
        host, port_number = server
        label = format_nameserver(server)
        endpoint_type = TCP6ClientEndpoint if _is_ipv6(host) else TCP4ClientEndpoint
        # The endpoint's own connect timeout is a backstop: addTimeout below
        # covers connect and reply together.
        endpoint = endpoint_type(self._reactor, host, port_number, timeout=max(1, int(timeout) + 1))
        exchange = _TCPExchange(query, server)
        waiting: Deferred[Any] = connectProtocol(endpoint, exchange)
        waiting.addCallback(lambda _: exchange.done)
        waiting.addTimeout(timeout, self._reactor)
        try:
            return await waiting
        except defer.TimeoutError:
            raise _TryFailed(f"timeout after {timeout:g}s waiting for {label} (TCP)") from None
        except ierror.ConnectError as e:
            raise _TryFailed(f"TCP connection to {label} failed: {e}") from None


# --- IHostnameResolver ----------------------------------------------------


@implementer(IHostResolution)
class _HostResolution:
    """One name resolution in progress; C{cancel} stops it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lookup: Deferred[Any] | None = None

    def cancel(self) -> None:
        if self._lookup is not None:
            self._lookup.cancel()


@implementer(IHostnameResolver)
class DNSHostnameResolver:
    """
    An L{IHostnameResolver} that resolves names through an L{IDNSResolver}
    (so through the configured nameservers, not the system's
    C{getaddrinfo}). IP literals are resolved without DNS.

    Install it with L{reactor_with_resolver} so that L{HostnameEndpoint},
    treq's C{Agent} and the SMTP client use it.
    """

    def __init__(self, resolver: IDNSResolver) -> None:
        """
        @param resolver: the L{IDNSResolver} whose C{lookup_addresses}
            answers.
        """
        self._resolver = resolver

    @property
    def resolver(self) -> IDNSResolver:
        """The L{IDNSResolver} this resolves through."""
        return self._resolver

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """
        Resolve C{hostName}; see L{IHostnameResolver.resolveHostName}.

        Calls C{resolutionBegan} at once, then C{addressResolved} for each
        address (IPv6 first) of the families in C{addressTypes} (both when
        L{None}), then C{resolutionComplete} exactly once, also on failure
        (with no addresses; the failure is logged) and on cancellation.

        @return: the L{IHostResolution}.
        """
        if isinstance(hostName, bytes):
            hostName = hostName.decode("ascii", errors="replace")
        resolution = _HostResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        want6 = addressTypes is None or IPv6Address in addressTypes
        want4 = addressTypes is None or IPv4Address in addressTypes

        def deliver(addresses: Iterable[str]) -> None:
            for address in addresses:
                if _is_ipv6(address):
                    if want6:
                        resolutionReceiver.addressResolved(
                            IPv6Address(transportSemantics, address, portNumber)  # type: ignore[arg-type]
                        )
                elif want4:
                    resolutionReceiver.addressResolved(
                        IPv4Address(transportSemantics, address, portNumber)  # type: ignore[arg-type]
                    )

        literal = _ip_literal(hostName)
        if literal is not None:
            deliver([str(literal)])
            resolutionReceiver.resolutionComplete()
            return resolution

        def failed(failure: Failure) -> None:
            if failure.check(defer.CancelledError):
                log.debug("resolution of {name} cancelled", name=hostName)
            elif failure.check(DNSError, DomainError):
                log.info("cannot resolve {name}: {error}", name=hostName, error=failure.getErrorMessage())
            else:
                log.failure("resolving {name}", failure, name=hostName)

        lookup = self._resolver.lookup_addresses(hostName)
        resolution._lookup = lookup
        lookup.addCallback(lambda answer: deliver(answer.addresses))
        lookup.addErrback(failed)
        lookup.addCallback(lambda _: resolutionReceiver.resolutionComplete())
        lookup.addErrback(lambda f: log.failure("resolution receiver failed for {name}", f, name=hostName))
        return resolution


@implementer(IReactorPluggableNameResolver)
class _ReactorWithResolver:
    """
    A reactor proxy: everything is the wrapped reactor's, except
    C{nameResolver} (and C{resolve}), which use our resolver.
    """

    def __init__(self, reactor: Any, name_resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self._name_resolver = name_resolver
        directlyProvides(self, providedBy(reactor), IReactorPluggableNameResolver)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_reactor":
            raise AttributeError(name)
        return getattr(self._reactor, name)

    def __repr__(self) -> str:
        return f"<reactor {self._reactor!r} resolving with {self._name_resolver!r}>"

    @property
    def nameResolver(self) -> IHostnameResolver:
        """The L{IHostnameResolver} used by L{HostnameEndpoint}."""
        return self._name_resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        """Replace our name resolver (not the wrapped reactor's); return the old one."""
        old, self._name_resolver = self._name_resolver, resolver
        return old

    def resolve(self, name: str, timeout: Sequence[int] = (1, 3, 11, 45)) -> Deferred[str]:
        """C{IReactorCore.resolve}: the first IPv4 address of C{name}, via our resolver."""
        result: Deferred[str] = Deferred()
        found: list[str] = []

        @implementer(IResolutionReceiver)
        class Receiver:
            def resolutionBegan(self, resolution: IHostResolution) -> None:
                pass

            def addressResolved(self, address: IAddress) -> None:
                found.append(address.host)  # type: ignore[attr-defined]

            def resolutionComplete(self) -> None:
                if found:
                    result.callback(found[0])
                else:
                    result.errback(ierror.DNSLookupError(f"no IPv4 address for {name}"))

        self._name_resolver.resolveHostName(Receiver(), name, 0, [IPv4Address])
        return result


def reactor_with_resolver(reactor: Any, name_resolver: IHostnameResolver) -> Any:
    """
    Wrap C{reactor} so that its C{nameResolver} is C{name_resolver}.

    The proxy provides every interface C{reactor} provides, plus
    L{IReactorPluggableNameResolver}; everything else is delegated. Hand it
    to L{HostnameEndpoint}, treq's C{Agent} or the SMTP client so that they
    resolve through our nameservers. (C{connectTCP} with a host name still
    goes to the wrapped reactor's resolver: connect through endpoints.)

    @param reactor: the reactor to wrap.
    @param name_resolver: an L{IHostnameResolver}, e.g. a
        L{DNSHostnameResolver}.
    @return: the proxy.
    """
    return _ReactorWithResolver(reactor, name_resolver)
