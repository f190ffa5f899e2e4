"""
What a lookup answers: frozen values for TXT (L{TXTAnswer}), MX
(L{MXAnswer} of L{MXHost}s), address (L{AddressAnswer}), TLSA
(L{TLSAAnswer} of L{TLSARecord}s) and CNAME (L{CNAMEAnswer}) lookups, as
L{mtasts_twisted.interfaces.IDNSResolver} promises them to every
implementation, the fakes in L{mtasts_twisted.testing} included.

Every answer says whether it is C{secure}: the validating resolver set the
AD bit on every reply the answer was made of, CNAMEs included (RFC 4035
§3.2.3, §4.3; RFC 7672 §2.1.1, §2.1.3: an insecure link anywhere in a
CNAME chain makes the final answer insecure).  Whether the resolver is
trusted to set it honestly is the caller's configuration (RFC 7672 §2.1.1:
a local validating resolver).
"""

from __future__ import annotations

from typing import Any, Iterable

import attrs

__all__ = ["AddressAnswer", "CNAMEAnswer", "MXAnswer", "MXHost", "TLSAAnswer", "TLSARecord", "TXTAnswer"]


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
    @ivar secure: the AD bit of every reply used was set (DNSSEC
        "secure", RFC 4035 §4.3).
    """

    name: str
    strings: tuple[str, ...] = attrs.field(converter=_tuple)
    ttl: int
    secure: bool = False


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
    @ivar secure: the AD bit of every reply used was set (DNSSEC
        "secure", RFC 4035 §4.3).
    @ivar implicit: there was no MX, so the domain itself stands as the
        only exchange with preference 0 (RFC 5321 §5.1).
    @ivar null: the domain publishes a null MX: it accepts no mail
        (RFC 7505).
    """

    domain: str
    hosts: tuple[MXHost, ...] = attrs.field(converter=_tuple)
    ttl: int
    secure: bool = False
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
    @ivar secure: the AD bit of every reply used was set (DNSSEC
        "secure", RFC 4035 §4.3).
    @ivar canonical: the name the addresses belong to after following
        CNAMEs (the "fully CNAME-expanded" name of RFC 7672 §2.2.2), or
        C{host} when it is not an alias.
    """

    host: str
    addresses: tuple[str, ...] = attrs.field(converter=_tuple)
    ttl: int
    secure: bool = False
    canonical: str = attrs.field(default=attrs.Factory(lambda self: self.host, takes_self=True))


@attrs.frozen
class TLSARecord:
    """
    One TLSA record (RFC 6698 §2.1), as published: nothing here says
    whether it is usable (that is L{mtasts_twisted.dane}'s question).

    The resolver keeps a record whose association data does not fit its
    matching type (a SHA-256 digest that is not 32 bytes): RFC 6698 §4.1
    and RFC 7671 §9 make such a record "unusable", not the RRset a lookup
    failure, so it must reach the code that judges usability.

    @ivar usage: the certificate usage (0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA,
        3 DANE-EE; RFC 7218).
    @ivar selector: 0 the full certificate, 1 its SubjectPublicKeyInfo.
    @ivar mtype: the matching type: 0 exact, 1 SHA-256, 2 SHA-512.
    @ivar data: the certificate association data.
    """

    usage: int
    selector: int
    mtype: int
    data: bytes

    def to_text(self) -> str:
        """The record's presentation form, C{"3 1 1 ab01..."} (RFC 6698 §2.2)."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@attrs.frozen
class TLSAAnswer:
    """
    The TLSA records of a name (C{_25._tcp.mx.example.com}, RFC 7672 §2.2.3).

    @ivar name: the name asked for (A-labels, lower case, no trailing dot);
        a CNAME at it is followed and does not change it (RFC 7672 §2.2.3:
        the TLSA base domain stays the one asked for).
    @ivar records: the distinct records, in the order received.
    @ivar ttl: seconds the answer may be reused.
    @ivar secure: the AD bit of every reply used was set: only then may
        the records be used (RFC 6698 §4.1, RFC 7672 §2.2).
    """

    name: str
    records: tuple[TLSARecord, ...] = attrs.field(converter=_tuple)
    ttl: int
    secure: bool = False


@attrs.frozen
class CNAMEAnswer:
    """
    The CNAME record of a name, asked for as such (type CNAME): what RFC
    7672 §2.1.3 needs to learn whether the first link of an alias chain is
    secure when the chain as a whole is not.

    @ivar name: the name asked for (A-labels, lower case, no trailing dot).
    @ivar target: the alias target (A-labels, lower case, no trailing dot).
    @ivar ttl: seconds the answer may be reused.
    @ivar secure: the AD bit of the reply was set.
    """

    name: str
    target: str
    ttl: int
    secure: bool = False
