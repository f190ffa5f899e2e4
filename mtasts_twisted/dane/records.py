"""
Which TLSA records an SMTP client may use (RFC 7672 §3.1, RFC 6698 §4.1,
RFC 7671 §9), judged one record at a time, and which of the usable ones to
match against (digest algorithm agility, RFC 7671 §9; RFC 7672 §5).

Pure functions of L{TLSARecord}s: no DNS and no certificates here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from mtasts_twisted.dns import TLSARecord

__all__ = [
    "MatchingType",
    "Selector",
    "Usage",
    "select_records",
    "unusable_reason",
]


class Usage(enum.IntEnum):
    """TLSA certificate usages, with the names of RFC 7218 §2.1."""

    PKIX_TA = 0
    PKIX_EE = 1
    DANE_TA = 2
    DANE_EE = 3


class Selector(enum.IntEnum):
    """TLSA selectors (RFC 7218 §2.2): what of a certificate is matched."""

    CERT = 0
    SPKI = 1


class MatchingType(enum.IntEnum):
    """TLSA matching types (RFC 7218 §2.3): how it is compared."""

    FULL = 0
    SHA2_256 = 1
    SHA2_512 = 2


#: RFC 6698 §2.1.3: the digest length of each hash matching type.
_DIGEST_LENGTHS = {MatchingType.SHA2_256: 32, MatchingType.SHA2_512: 64}
#: RFC 7671 §9: digest matching types, strongest first (the client's order).
_DIGEST_STRENGTH = (MatchingType.SHA2_512, MatchingType.SHA2_256)


def unusable_reason(record: TLSARecord) -> str | None:
    """
    Why an SMTP client cannot use C{record}, or L{None} when it can.

    @return: a short explanation citing the rule, for logs and reports.
    """
    if record.usage in (Usage.PKIX_TA, Usage.PKIX_EE):
        # RFC 7672 §3.1.3: PKIX-TA(0) and PKIX-EE(1) are unsupported for
        # MTA-to-MTA SMTP; clients MAY treat them as unusable, and we do.
        return f"certificate usage {Usage(record.usage).name.replace('_', '-')}({record.usage}) is not used for SMTP"
    if record.usage not in (Usage.DANE_TA, Usage.DANE_EE):
        # RFC 6698 §4.1: a usage, selector or matching type the client does
        # not understand makes the record unusable.
        return f"unknown certificate usage {record.usage}"
    if record.selector not in (Selector.CERT, Selector.SPKI):
        return f"unknown selector {record.selector}"
    if record.mtype not in (MatchingType.FULL, MatchingType.SHA2_256, MatchingType.SHA2_512):
        return f"unknown matching type {record.mtype}"
    expected = _DIGEST_LENGTHS.get(MatchingType(record.mtype))
    if expected is not None and len(record.data) != expected:
        # RFC 7671 §9: "incorrect digest length" is a malformed record,
        # discarded before anything else; RFC 6698 §4.1: unusable.
        return f"{MatchingType(record.mtype).name.replace('_', '-')} digest of {len(record.data)} octets, not {expected}"
    if record.mtype == MatchingType.FULL and not _is_der_sequence(record.data):
        # RFC 6698 §4.1: malformed association data (a full certificate or
        # SubjectPublicKeyInfo is one DER SEQUENCE).
        return "full association data is not one DER SEQUENCE"
    return None


def _is_der_sequence(data: bytes) -> bool:
    """Whether C{data} is exactly one DER SEQUENCE (tag and definite length)."""
    if len(data) < 2 or data[0] != 0x30:
        return False
    first = data[1]
    if first < 0x80:
        return len(data) == 2 + first
    octets = first & 0x7F
    if octets == 0 or octets > 4 or len(data) < 2 + octets:
        return False
    length = int.from_bytes(data[2 : 2 + octets], "big")
    return len(data) == 2 + octets + length


def select_records(records: Iterable[TLSARecord]) -> tuple[TLSARecord, ...]:
    """
    The records to match certificates against: the usable ones (see
    L{unusable_reason}), then, per usage and selector, those of matching
    type Full(0) and those of the strongest digest present (RFC 7671 §9,
    which RFC 7672 §5 makes mandatory: a key matching only a weaker
    digest's record is not accepted when a stronger one is published).

    @return: the chosen records, in their order of publication.
    """
    usable = [r for r in records if unusable_reason(r) is None]
    strongest: dict[tuple[int, int], int] = {}
    for record in usable:
        if record.mtype == MatchingType.FULL:
            continue
        key = (record.usage, record.selector)
        best = strongest.get(key)
        if best is None or _DIGEST_STRENGTH.index(MatchingType(record.mtype)) < _DIGEST_STRENGTH.index(
            MatchingType(best)
        ):
            strongest[key] = record.mtype
    return tuple(
        r for r in usable if r.mtype == MatchingType.FULL or strongest[(r.usage, r.selector)] == r.mtype
    )
