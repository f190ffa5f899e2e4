"""
The query/reply codec: the wire form of a query (L{_Query}, built from a
dnspython-made template) and the part of a reply the resolver uses
(L{_Reply}), read with dnspython's own wire parsers (L{_read_reply}) and
left to dnspython's full C{dns.message.from_wire} for anything unusual.

No I/O here: L{mtasts_twisted.dns.transport} sends and receives the bytes.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import attrs
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.wire

from mtasts_twisted.dns.answers import TLSARecord
from mtasts_twisted.dns.rdata_read import _DNSSEC_TYPES, _TLSA, _check_dnssec_rdata, _tlsa_record

__all__ = ["EDNS_PAYLOAD"]

#: EDNS UDP payload we advertise (DNS flag day 2020: avoids fragmentation).
EDNS_PAYLOAD = 1232



# The query wire, built once per (name, type) try with the header and EDNS
# OPT record taken from a dnspython-built template: dnspython's make_query
# and to_wire cost ~150 us per query (Message, RRset and OPT objects, enum
# conversions) for bytes that differ only in the ID, the name and the type.
# test_dns checks the result byte for byte against make_query.
_QUERY_FLAGS = dns.flags.RD | dns.flags.AD  # RFC 6840 §5.7: AD asks for the AD bit
# RFC 3225 §3: the DO bit in the OPT record's flags says we are
# security-aware, so a validating resolver sets AD on secure answers (RFC
# 4035 §3.2.3) and keeps the DNSSEC records in them (RFC 7672 §2.1.1 needs
# the security status of every MX, address and TLSA answer).  CD stays
# clear: the resolver must validate.
_TEMPLATE = dns.message.make_query(
    dns.name.root, dns.rdatatype.A, use_edns=0, payload=EDNS_PAYLOAD, id=0, flags=_QUERY_FLAGS, want_dnssec=True
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
        of L{EDNS_PAYLOAD} and the DO bit (RFC 3225).
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
        # Without a file to write to, to_wire returns the bytes (typed Optional).
        name_wire: bytes = qname.to_wire()  # type: ignore[assignment]
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

    @property
    def authenticated_data(self) -> bool:
        """
        The AD bit: the resolver validated every RRset of the answer and
        authority sections as DNSSEC "secure" (RFC 4035 §3.2.3).
        """
        return bool(self.flags & dns.flags.AD)

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
            (
                rrset.name,
                int(rrset.rdtype),
                _RRs(
                    rrset.ttl,
                    tuple(
                        TLSARecord(r.usage, r.selector, r.mtype, r.cert) for r in rrset
                    ) if rrset.rdtype == _TLSA else tuple(rrset),
                ),
            )
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
            if rr_type in _DNSSEC_TYPES:
                # Never used, only checked: see _check_dnssec_rdata.
                _check_dnssec_rdata(wire, pos, pos + rdlen, rr_type)
                pos += rdlen
                continue
            rdata: Any
            if rr_type == _TLSA:
                rdata = _tlsa_record(wire[pos : pos + rdlen])
            else:
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
        if dns.rdatatype.is_singleton(self.rdtype):  # type: ignore[arg-type]  # any int will do
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
