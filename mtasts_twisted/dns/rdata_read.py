"""
The rdata the reply reader (L{mtasts_twisted.dns.wire}) handles without
dnspython's rdata classes: TLSA records, kept whatever their association
data (L{_tlsa_record}), and the DNSSEC records a reply to a query with the
DO bit carries, checked but never built (L{_check_dnssec_rdata}).

Each raises L{_NotCertain} for rdata it will not vouch for; the reader
then leaves the whole reply to dnspython's C{from_wire}.
"""

from __future__ import annotations

import dns.rdatatype

from mtasts_twisted.dns.answers import TLSARecord


class _NotCertain(Exception):
    """Rdata this module will not vouch for: dnspython's parser decides."""


_TLSA = dns.rdatatype.TLSA
_RRSIG, _NSEC, _NSEC3 = dns.rdatatype.RRSIG, dns.rdatatype.NSEC, dns.rdatatype.NSEC3
#: The DNSSEC records a reply to a query with the DO bit carries beside the
#: answer (RFC 4035 §3.2.1): signatures and denial proofs, which the
#: validating resolver has checked and we never read.
_DNSSEC_TYPES = frozenset({_RRSIG, _NSEC, _NSEC3})
#: RFC 1035 §3.1: a name is at most 255 octets on the wire.
_MAX_NAME_WIRE = 255


def _check_dnssec_rdata(wire: bytes, start: int, end: int, rr_type: int) -> None:
    """
    Check the rdata of an RRSIG, NSEC or NSEC3 record at C{wire[start:end]}
    without building it.

    With the DO bit, every answer comes with such records (a signature per
    RRset; for a denial, NSEC or NSEC3 records and theirs), and dnspython's
    parser spends more on each than on the whole rest of the reply.  The
    reader never uses them, but must still fail every reply that
    C{from_wire} fails: so this accepts only rdata that dnspython certainly
    accepts (the fields of RFC 4034 §3.1 and §4.1 and RFC 5155 §3.2, an
    uncompressed name, windows as dnspython's C{Bitmap} wants them) and
    raises L{_NotCertain} for anything else, leaving the reply to C{from_wire}.
    test_dns_reply compares both over generated and mutated records.

    @raise _NotCertain: the rdata is not certainly valid.
    """
    if rr_type == _RRSIG:
        # Type covered, algorithm, labels, original TTL, expiration,
        # inception, key tag: 18 octets; then the signer's name and the
        # signature (any octets).
        _plain_name_end(wire, start + 18, end)
        return
    if rr_type == _NSEC:
        _check_type_bitmap(wire, _plain_name_end(wire, start, end), end)
        return
    # NSEC3: hash algorithm, flags, iterations (4 octets), the salt and the
    # next hashed owner name (each with a length octet; a hash of 1 octet
    # at least), then the type bitmap.
    pos = start + 4
    if pos >= end:
        raise _NotCertain("short NSEC3 rdata")
    pos += 1 + wire[pos]
    if pos >= end or wire[pos] == 0:
        raise _NotCertain("NSEC3 salt or hash out of bounds")
    pos += 1 + wire[pos]
    _check_type_bitmap(wire, pos, end)


def _plain_name_end(wire: bytes, pos: int, end: int) -> int:
    """
    The end of the uncompressed, valid name at C{wire[pos:]} lying wholly
    before C{end}.

    @raise _NotCertain: it is not one (a compression pointer, another label
        type, too long, or running past C{end}).
    """
    start = pos
    while pos < end:
        count = wire[pos]
        if count == 0:
            if pos + 1 - start > _MAX_NAME_WIRE:
                raise _NotCertain("name too long")
            return pos + 1
        if count > 63:
            raise _NotCertain("compressed name or label type in DNSSEC rdata")
        pos += 1 + count
    raise _NotCertain("name runs past its rdata")


def _check_type_bitmap(wire: bytes, pos: int, end: int) -> None:
    """
    Check the type bitmap of NSEC or NSEC3 rdata (RFC 4034 §4.1.2) from
    C{pos} to exactly C{end}: windows in increasing order, each of 1 to 32
    octets, the last one non-zero.

    @raise _NotCertain: it is not certainly valid.
    """
    if pos > end:
        raise _NotCertain("NSEC3 hash runs past its rdata")
    last = -1
    while pos < end:
        if pos + 2 > end:
            raise _NotCertain("short type bitmap window")
        window, length = wire[pos], wire[pos + 1]
        pos += 2 + length
        if window <= last or not 1 <= length <= 32 or pos > end or wire[pos - 1] == 0:
            raise _NotCertain("type bitmap window out of order, size or bounds")
        last = window


def _tlsa_record(rdata: bytes) -> TLSARecord:
    """
    A TLSA record from its rdata (RFC 6698 §2.1), whatever its association
    data: dnspython refuses a SHA-256 or SHA-512 digest of the wrong length,
    which would fail the whole reply, when RFC 6698 §4.1 and RFC 7671 §9
    make only that record unusable (L{mtasts_twisted.dane} judges it).
    So the reader is more lenient than C{from_wire} for TLSA data, and for
    nothing else.

    @raise _NotCertain: the rdata is too short for the three one-byte fields
        (a malformed record: C{from_wire} then fails the reply).
    """
    if len(rdata) < 3:
        raise _NotCertain("TLSA rdata shorter than its three header bytes")
    return TLSARecord(rdata[0], rdata[1], rdata[2], rdata[3:])
