"""
What a lookup answers: frozen values for TXT (L{TXTAnswer}), MX
(L{MXAnswer} of L{MXHost}s) and address (L{AddressAnswer}) lookups, as
L{mtasts_twisted.interfaces.IDNSResolver} promises them to every
implementation, the fakes in L{mtasts_twisted.testing} included.
"""

from __future__ import annotations

from typing import Any, Iterable

import attrs

__all__ = ["AddressAnswer", "MXAnswer", "MXHost", "TXTAnswer"]


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
