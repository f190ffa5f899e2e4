"""
The reply reader of L{mtasts_twisted.dns} (L{_read_reply}, L{_Reply}) against
dnspython's C{dns.message.from_wire}: over generated, hand-rendered replies
(compressed and not, odd sections, EDNS, TSIG, duplicates, big TTLs), their
truncations and byte flips, and random bytes, the reader must give the view
of the fully parsed message, or fail with the exception C{from_wire} raises.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.tlsabase import TLSABase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mtasts_twisted.dns.answers import TLSARecord
from mtasts_twisted.dns.wire import _Query, _read_reply, _Reply

QNAME = dns.name.from_text("_mta-sts.example.com.")
TARGET = dns.name.from_text("policy.example.net.")
OTHER = dns.name.from_text("other.example.")

IN, CH = dns.rdataclass.IN, dns.rdataclass.CH
T = dns.rdatatype


def _name(name: dns.name.Name, upper: bool = False) -> bytes:
    wire = name.to_wire()
    return wire.upper() if upper else wire


def _rdata(rdtype: int, text: str, origin_wire: bool = True) -> bytes:
    return dns.rdata.from_text(IN, rdtype, text).to_digestable()


# Valid rdata per type, rendered uncompressed.
_RDATAS: dict[int, list[bytes]] = {
    T.TXT: [_rdata(T.TXT, '"v=STSv1; id=1"'), _rdata(T.TXT, '"v=STSv1;" " id=2"'), _rdata(T.TXT, '"other"')],
    T.MX: [_rdata(T.MX, "10 mx.example.com."), _rdata(T.MX, "0 .")],
    T.A: [_rdata(T.A, "192.0.2.1"), _rdata(T.A, "192.0.2.2")],
    T.AAAA: [_rdata(T.AAAA, "2001:db8::1")],
    T.CNAME: [_rdata(T.CNAME, "policy.example.net."), _rdata(T.CNAME, "OTHER.example.")],
    T.SOA: [
        _rdata(T.SOA, "ns.example.com. host.example.com. 1 7200 3600 1209600 300"),
        _rdata(T.SOA, "ns.example.com. host.example.com. 2 7200 3600 1209600 30"),
    ],
    T.NS: [_rdata(T.NS, "ns.example.com.")],
    T.RRSIG: [
        _rdata(T.RRSIG, "TXT 8 3 300 20300101000000 20200101000000 1 example.com. AAAA"),
        _rdata(T.RRSIG, "A 13 2 4294967295 20300101000000 20200101000000 65535 . AAAA"),
        # No signature; a signer of 255 octets; a compressed signer (odd:
        # left to from_wire); a header too short.
        b"\x00\x01" + b"\x0d\x02" + b"\x00" * 14 + _name(OTHER),
        b"\x00\x10" + b"\x08\x03" + b"\x00" * 14 + b"\x3f" * 1 + b"a" * 63 + b"\x3f" + b"b" * 63
        + b"\x3f" + b"c" * 63 + b"\x3d" + b"d" * 61 + b"\x00" + b"sig",
        b"\x00\x10" + b"\x08\x03" + b"\x00" * 14 + b"\xc0\x0c" + b"sig",
        b"\x00\x10" + b"\x08\x03" + b"\x00" * 10,
    ],
    T.NSEC: [
        _rdata(T.NSEC, "a.example.com. A RRSIG NSEC"),
        _rdata(T.NSEC, "b.example.com. TYPE1234 TLSA"),
        _name(OTHER),  # no bitmap at all
        _name(OTHER) + b"\x00\x01\x00",  # a trailing zero octet
        _name(OTHER) + b"\x01\x01\x40\x00\x01\x40",  # windows out of order
        _name(OTHER) + b"\x00\x00",  # an empty window
        _name(OTHER) + b"\x00\x21" + b"\x01" * 33,  # a window of 33 octets
        _name(OTHER) + b"\x00\x02\x40",  # a window past the rdata
    ],
    T.NSEC3: [
        _rdata(T.NSEC3, "1 0 0 - 2T7B4G4VSA5SMI47K61MV5BV1A22BOJR A RRSIG"),
        _rdata(T.NSEC3, "1 1 10 aabbccdd 2T7B4G4VSA5SMI47K61MV5BV1A22BOJR"),
        b"\x01\x00\x00\x00\x00\x00",  # an empty hash
        b"\x01\x00\x00\x00\x02\xaa",  # the salt runs past the rdata
        b"\x01\x00\x00\x00\x00\x05abc",  # the hash runs past the rdata
        b"\x01\x00\x00",
    ],
    T.TLSA: [
        _rdata(T.TLSA, "3 1 1 " + "ab" * 32),
        _rdata(T.TLSA, "2 0 2 " + "cd" * 64),
        _rdata(T.TLSA, "3 0 0 3082"),
        b"\x03\x01\x07",  # an unknown matching type, no data
        b"\x03\x01",  # shorter than its three fields: malformed
    ],
    999: [b"", b"\x01\x02"],
}
# The OPT rdata: no options, a valid cookie option, a truncated option.
_OPT_RDATAS = [b"", b"\x00\x0a\x00\x08" + b"\x01" * 8, b"\x00\x0a\x00\x08\x01"]
# A valid, fake TSIG rdata (from_wire rejects it: no keyring).
_TSIG_RDATA = b"\x09hmac-sha1\x00" + b"\x00" * 6 + b"\x01\x2c" + b"\x00\x00" + b"\x00\x01" + b"\x00\x00" + b"\x00\x00"


def _rr(owner: bytes, rdtype: int, rdclass: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rdtype, rdclass, ttl, len(rdata)) + rdata


_GOOD_OWNERS = [b"\xc0\x0c", _name(QNAME), _name(QNAME, upper=True), _name(TARGET), _name(OTHER)]
_BAD_OWNERS = [
    b"\x00",
    b"\xc0\x02",  # pointer into the header
    b"\xc0\xff",  # pointer forward
    b"\x40abc\x00",  # bad label type
]
_ttls = st.sampled_from([0, 1, 300, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
_classes = st.sampled_from([IN, IN, IN, IN, CH, 254])


@st.composite
def _records(draw: Any) -> bytes:
    # Mostly well-formed records, so that most replies parse; the rest
    # are each odd in one way.
    odd = draw(st.integers(0, 39))
    owner = draw(st.sampled_from(_BAD_OWNERS if odd == 0 else _GOOD_OWNERS))
    if odd == 1:
        payload = draw(st.sampled_from([1232, 512, 4096]))
        ednsflags = draw(st.sampled_from([0, 0x8000, 0x01000000, 0xFF000000, 0x00010000]))
        return _rr(draw(st.sampled_from([b"\x00", b"\x00", owner])), T.OPT, payload, ednsflags,
                   draw(st.sampled_from(_OPT_RDATAS)))
    if odd == 2:
        return _rr(owner, T.TSIG, 255, 0, _TSIG_RDATA)
    rdtype = draw(st.sampled_from(sorted(_RDATAS)))
    if odd == 3:
        rdata = draw(st.binary(max_size=12))
    else:
        rdata = draw(st.sampled_from(_RDATAS[rdtype]))
    return _rr(owner, rdtype, draw(_classes), draw(_ttls), rdata)


def _opt(payload: int, ednsflags: int, rdata: bytes = b"") -> bytes:
    return _rr(b"\x00", T.OPT, payload, ednsflags, rdata)


@st.composite
def _replies(draw: Any) -> tuple[_Query, bytes]:
    rdtype = draw(st.sampled_from([T.TXT, T.MX, T.A, T.AAAA, T.TLSA, T.CNAME]))
    query = _Query.make(QNAME, rdtype)
    flags = draw(
        st.one_of(
            st.sampled_from(
                [
                    dns.flags.QR | dns.flags.RD | dns.flags.RA,
                    dns.flags.QR | dns.flags.RD | dns.flags.RA | dns.flags.AD,
                    dns.flags.QR | dns.flags.TC,
                    dns.flags.QR | dns.rcode.NXDOMAIN,
                    dns.flags.QR | dns.rcode.SERVFAIL,
                    dns.flags.QR | (5 << 11),  # opcode UPDATE
                ]
            ),
            # Any flags, opcode QUERY (other opcodes are left to from_wire).
            st.integers(0, 0xFFFF).map(lambda f: f & ~0x7800),
            st.integers(0, 0xFFFF),
        )
    )
    tail = struct.pack("!HH", rdtype, IN)
    questions = draw(
        st.lists(
            st.sampled_from(
                [
                    _name(QNAME) + tail,
                    _name(QNAME) + tail,
                    _name(QNAME, upper=True) + tail,
                    _name(OTHER) + tail,
                    _name(QNAME) + struct.pack("!HH", T.NS, IN),
                    _name(QNAME) + struct.pack("!HH", rdtype, CH),
                ]
            ),
            max_size=2,
        )
    )
    sections = [draw(st.lists(_records(), max_size=5)) for _ in range(3)]
    if draw(st.booleans()):
        # The usual EDNS OPT record, last; sometimes with extended rcode bits.
        sections[2].append(_opt(1232, draw(st.sampled_from([0, 0, 0x8000, 0x01000000, 0xFF000000]))))
    counts = [len(questions)] + [len(s) for s in sections]
    if draw(st.integers(0, 19)) == 0:
        counts[draw(st.integers(0, 3))] += draw(st.sampled_from([-1, 1]))
    counts = [max(0, c) for c in counts]
    wire = struct.pack("!HH", query.id, flags) + struct.pack("!HHHH", *counts)
    wire += b"".join(questions) + b"".join(b"".join(s) for s in sections)
    if draw(st.integers(0, 19)) == 0:
        wire += b"\x00"  # trailing junk
    return query, wire


@contextlib.contextmanager
def _tlsa_data_unchecked() -> Iterator[None]:
    """
    dnspython's C{from_wire}, except that TLSA association data of the wrong
    length for its matching type does not fail the message: the reader's
    one deliberate leniency (RFC 6698 §4.1: such a record is unusable, and
    L{mtasts_twisted.dane} judges it).
    """
    saved = TLSABase._cert_length_by_mtype
    TLSABase._cert_length_by_mtype = {}
    try:
        yield
    finally:
        TLSABase._cert_length_by_mtype = saved


def _expected(wire: bytes, query: _Query, lenient_tlsa: bool = True) -> tuple[str, Any]:
    try:
        if not lenient_tlsa:
            return "ok", _Reply.from_message(dns.message.from_wire(wire), query.rdtype)
        with _tlsa_data_unchecked():
            return "ok", _Reply.from_message(dns.message.from_wire(wire), query.rdtype)
    except Exception as e:  # noqa: BLE001 - the exception type is the verdict
        return "error", type(e)


def _actual(wire: bytes, query: _Query) -> tuple[str, Any]:
    try:
        return "ok", _Reply.from_wire(wire, query)
    except Exception as e:  # noqa: BLE001 - the exception type is the verdict
        return "error", type(e)


class ReplyReaderTests(unittest.SynchronousTestCase):
    """L{_Reply.from_wire} is C{from_wire}'s verdict, faster."""

    def check(self, query: _Query, wire: bytes) -> bool:
        """Compare; return whether the fast reader itself answered."""
        expected = _expected(wire, query)
        try:
            fast = _read_reply(wire, query)
        except Exception:  # noqa: BLE001 - left to from_wire
            # Left to from_wire itself, TLSA data checks and all.
            self.assertEqual(_actual(wire, query), _expected(wire, query, lenient_tlsa=False))
            return False
        # Never more lenient than from_wire (but for TLSA data), and the
        # same view.
        self.assertEqual(expected, ("ok", fast))
        self.assertEqual(_actual(wire, query), expected)
        return True

    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_replies())
    def test_generated(self, case: tuple[_Query, bytes]) -> None:
        self.check(*case)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_replies(), st.integers(0, 10_000), st.integers(1, 255))
    def test_truncated_and_flipped(self, case: tuple[_Query, bytes], where: int, xor: int) -> None:
        query, wire = case
        cut = where % (len(wire) + 1)
        self.check(query, wire[:cut])
        flipped = bytearray(wire)
        flipped[where % len(wire)] ^= xor
        self.check(query, bytes(flipped))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=80))
    def test_random_bytes(self, data: bytes) -> None:
        query = _Query.make(QNAME, T.TXT)
        self.check(query, query.wire[:2] + data)

    def test_usual_replies_take_the_fast_path(self) -> None:
        """dnspython-rendered (compressed) replies are read without from_wire."""
        for rdtype, texts in ((T.TXT, ['"v=STSv1; id=1"', '"a" "b"']), (T.A, ["192.0.2.1"]), (T.MX, ["10 mx.a."])):
            query = _Query.make(QNAME, rdtype)
            request = dns.message.from_wire(query.wire)
            positive = dns.message.make_response(request)
            positive.flags |= dns.flags.AD
            positive.answer.append(dns.rrset.from_text(QNAME, 300, IN, T.CNAME, "policy.example.net."))
            positive.answer.append(dns.rrset.from_text(TARGET, 200, IN, rdtype, *texts))
            negative = dns.message.make_response(request)
            negative.set_rcode(dns.rcode.NXDOMAIN)
            negative.authority.append(
                dns.rrset.from_text("example.com.", 600, IN, T.SOA, "ns.example.com. h.example.com. 1 2 3 4 60")
            )
            for message in (positive, negative):
                wire = message.to_wire()
                self.assertTrue(self.check(query, wire), message)
            reply = _read_reply(positive.to_wire(), query)
            self.assertEqual(reply.records(QNAME, T.CNAME).rdatas[0].target, TARGET)
            self.assertEqual(reply.records(TARGET, rdtype).ttl, 200)
            self.assertEqual(len(reply.records(TARGET, rdtype).rdatas), len(texts))
            self.assertTrue(reply.flags & dns.flags.AD)
            self.assertEqual(_read_reply(negative.to_wire(), query).soa, (600, 60))
            self.assertEqual(_read_reply(negative.to_wire(), query).rcode, dns.rcode.NXDOMAIN)

    def test_extended_rcode(self) -> None:
        """The OPT record's upper rcode bits count (RFC 6891 §6.1.3): BADVERS is 16."""
        query = _Query.make(QNAME, T.TXT)
        message = dns.message.make_response(dns.message.from_wire(query.wire))
        message.set_rcode(dns.rcode.BADVERS)
        wire = message.to_wire()
        self.assertTrue(self.check(query, wire))
        self.assertEqual(_read_reply(wire, query).rcode, dns.rcode.BADVERS)

    def test_duplicates_and_ttls(self) -> None:
        """Duplicate records count once; the smallest TTL wins; a CNAME RRset keeps its last record."""
        query = _Query.make(QNAME, T.TXT)
        header = struct.pack("!HHHHHH", query.id, dns.flags.QR, 1, 0, 0, 0)
        question = _name(QNAME) + struct.pack("!HH", T.TXT, IN)
        txt = _RDATAS[T.TXT]
        many = [_rr(b"\xc0\x0c", T.TXT, IN, 300 - i, txt[i % 2]) for i in range(12)]
        many += [_rr(b"\xc0\x0c", T.TXT, IN, 300, b"\x01%c" % (65 + i)) for i in range(20)]  # past the linear limit
        many += [_rr(b"\xc0\x0c", T.TXT, IN, 300, txt[0]), _rr(b"\xc0\x0c", T.TXT, IN, 0x80000001, txt[2])]
        cnames = [_rr(_name(OTHER), T.CNAME, IN, 50, _RDATAS[T.CNAME][0]), _rr(_name(OTHER), T.CNAME, IN, 70, _RDATAS[T.CNAME][1])]
        records = many + cnames
        wire = header[:6] + struct.pack("!H", len(records)) + header[8:] + question + b"".join(records)
        self.assertTrue(self.check(query, wire))
        reply = _read_reply(wire, query)
        self.assertEqual(reply.records(QNAME, T.TXT).ttl, 0)
        self.assertEqual(len(reply.records(QNAME, T.TXT).rdatas), 23)
        self.assertEqual(reply.records(OTHER, T.CNAME).ttl, 50)
        self.assertEqual(reply.records(OTHER, T.CNAME).rdatas[0].target, dns.name.from_text("other.example."))

    def test_malformed_fails_as_from_wire(self) -> None:
        """Short header, TSIG without a keyring, misplaced OPT, trailing bytes: from_wire's exceptions."""
        query = _Query.make(QNAME, T.TXT)
        question = _name(QNAME) + struct.pack("!HH", T.TXT, IN)

        def reply(an: list[bytes], ar: list[bytes], extra: bytes = b"") -> bytes:
            return (
                struct.pack("!HHHHHH", query.id, dns.flags.QR, 1, len(an), 0, len(ar))
                + question + b"".join(an) + b"".join(ar) + extra
            )

        opt = _rr(b"\x00", T.OPT, 1232, 0, b"")
        cases = {
            "short": query.wire[:11],
            "tsig": reply([], [_rr(b"\x00", T.TSIG, 255, 0, _TSIG_RDATA)]),
            "opt in answer": reply([opt], []),
            "two opts": reply([], [opt, opt]),
            "opt not at root": reply([], [_rr(b"\xc0\x0c", T.OPT, 1232, 0, b"")]),
            "trailing": reply([], [opt], b"\x00"),
            "bad rdata": reply([_rr(b"\xc0\x0c", T.A, IN, 1, b"\x01\x02")], []),
            "bad option": reply([], [_rr(b"\x00", T.OPT, 1232, 0, _OPT_RDATAS[2])]),
        }
        for name, wire in cases.items():
            expected = _expected(wire, query)
            self.assertEqual(expected[0], "error", name)
            self.assertEqual(_actual(wire, query), expected, name)
            self.assertRaises(Exception, _read_reply, wire, query)  # noqa: B017 - any: left to from_wire

    def test_first_soa_rrset(self) -> None:
        """The negative TTL comes from the authority's first SOA RRset, its last record and smallest TTL."""
        query = _Query.make(QNAME, T.TXT)
        soa300, soa30 = _RDATAS[T.SOA]
        authority = [
            _rr(_name(OTHER), T.SOA, IN, 100, soa300),
            _rr(_name(QNAME), T.SOA, IN, 10, soa30),
            _rr(_name(OTHER).upper(), T.SOA, IN, 50, soa30),
            _rr(_name(OTHER), T.SOA, CH, 5, soa30),
        ]
        wire = (
            struct.pack("!HHHHHH", query.id, dns.flags.QR | dns.rcode.NXDOMAIN, 1, 0, len(authority), 0)
            + _name(QNAME) + struct.pack("!HH", T.TXT, IN) + b"".join(authority)
        )
        self.assertTrue(self.check(query, wire))
        self.assertEqual(_read_reply(wire, query).soa, (50, 30))

    def test_signed_replies_take_the_fast_path(self) -> None:
        """
        With the DO bit, replies carry RRSIGs, and denials NSEC or NSEC3
        records: they are checked, not built, and the reply is read without
        from_wire.
        """
        query = _Query.make(QNAME, T.TLSA)
        request = dns.message.from_wire(query.wire)
        positive = dns.message.make_response(request)
        positive.flags |= dns.flags.AD
        positive.answer.append(dns.rrset.from_text(QNAME, 300, IN, T.TLSA, "3 1 1 " + "ab" * 32))
        positive.answer.append(dns.rrset.from_text(
            QNAME, 300, IN, T.RRSIG, "TLSA 13 4 300 20300101000000 20200101000000 1 example.com. AAAA"))
        nsec = dns.message.make_response(request)
        nsec.flags |= dns.flags.AD
        nsec.set_rcode(dns.rcode.NXDOMAIN)
        nsec.authority.append(
            dns.rrset.from_text("example.com.", 600, IN, T.SOA, "ns.example.com. h.example.com. 1 2 3 4 60"))
        nsec.authority.append(dns.rrset.from_text(
            "example.com.", 600, IN, T.RRSIG, "SOA 13 2 600 20300101000000 20200101000000 1 example.com. AAAA"))
        nsec.authority.append(dns.rrset.from_text("a.example.com.", 60, IN, T.NSEC, "z.example.com. A RRSIG NSEC"))
        nsec3 = dns.message.make_response(request)
        nsec3.authority.append(dns.rrset.from_text(
            "2t7b4g4vsa5smi47k61mv5bv1a22bojr.example.com.", 60, IN, T.NSEC3,
            "1 0 0 - 2T7B4G4VSA5SMI47K61MV5BV1A22BOJR A RRSIG"))
        for message in (positive, nsec, nsec3):
            self.assertTrue(self.check(query, message.to_wire()), message)
        reply = _read_reply(positive.to_wire(), query)
        [record] = reply.records(QNAME, T.TLSA).rdatas
        self.assertEqual(record, TLSARecord(3, 1, 1, bytes.fromhex("ab" * 32)))
        self.assertTrue(reply.authenticated_data)
        self.assertEqual(_read_reply(nsec.to_wire(), query).soa, (600, 60))

    def test_tlsa_data_kept_whatever_its_length(self) -> None:
        """
        A TLSA record whose digest has the wrong length for its matching
        type is unusable (RFC 6698 §4.1, RFC 7671 §9), not a malformed
        reply: the reader keeps it where from_wire refuses the reply.  A
        record too short for its three fields is malformed in both.
        """
        query = _Query.make(QNAME, T.TLSA)
        question = _name(QNAME) + struct.pack("!HH", T.TLSA, IN)

        def reply(*rdatas: bytes) -> bytes:
            return (struct.pack("!HHHHHH", query.id, dns.flags.QR | dns.flags.AD, 1, len(rdatas), 0, 0)
                    + question + b"".join(_rr(b"\xc0\x0c", T.TLSA, IN, 300, r) for r in rdatas))

        good = b"\x03\x01\x01" + b"\xab" * 32
        short_digest = b"\x03\x01\x01" + b"\xab" * 31
        wire = reply(good, short_digest)
        self.assertRaises(dns.exception.FormError, dns.message.from_wire, wire)
        self.assertEqual(_actual(wire, query), _expected(wire, query))
        records = _Reply.from_wire(wire, query).records(QNAME, T.TLSA)
        self.assertEqual(records.rdatas, (TLSARecord(3, 1, 1, b"\xab" * 32), TLSARecord(3, 1, 1, b"\xab" * 31)))
        malformed = reply(good, b"\x03\x01")
        self.assertEqual(_expected(malformed, query)[0], "error")
        self.assertEqual(_actual(malformed, query), _expected(malformed, query))
