"""
What DANE says of one MX host (RFC 7672 §2.2): a frozen L{DANEStatus}
whose L{DANEState} is one of the four outcomes of a TLSA search, plus the
lookup failure that stands for "bogus" (RFC 7672 §2.1.1):

  ===============  =====================================  ===========================
  state            found                                  delivery to the host
  ===============  =====================================  ===========================
  USABLE           a secure TLSA RRset, a usable record   TLS, authenticated by the
                                                          TLSA records (§3), or not
                                                          at all
  UNUSABLE         a secure TLSA RRset, no usable record  TLS required, no
                                                          authentication (§2.2)
  NONE             a secure denial of TLSA records        DANE does not apply
  INSECURE         an insecure MX, address or TLSA        DANE does not apply
                   answer (or an address literal)
  BOGUS            a lookup failed: bogus, indeterminate, none now: the host is
                   SERVFAIL, timeout, malformed reply      unreachable (temporary
                                                          failure, §2.1.2)
  ===============  =====================================  ===========================

Where DANE does not apply, the host is left to MTA-STS (RFC 8461 §2).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

from mtasts_twisted.dns import TLSARecord

__all__ = ["DANEState", "DANEStatus", "tlsa_name"]


class DANEState(enum.Enum):
    """The outcome of the TLSA search for one host; see the module docstring."""

    USABLE = "secure-usable"
    UNUSABLE = "secure-unusable"
    NONE = "none"
    INSECURE = "insecure"
    BOGUS = "bogus"


def tlsa_name(base_domain: str, port: int = 25) -> str:
    """
    The TLSA query name of a TLSA base domain (RFC 7672 §2.2.3, RFC 6698
    §3): C{_25._tcp.mx.example.com}; the port is the one delivery uses.

    @param base_domain: the candidate TLSA base domain (A-labels, no
        trailing dot).
    @param port: the SMTP server's TCP port.
    """
    return f"_{int(port)}._tcp.{base_domain}"


def _records(value: Iterable[TLSARecord]) -> tuple[TLSARecord, ...]:
    return tuple(value)


@attrs.frozen
class DANEStatus:
    """
    What DANE says of one MX host.

    @ivar host: the MX host name (A-labels, lower case), as the MX RRset
        names it.
    @ivar state: the L{DANEState}.
    @ivar port: the TCP port delivery uses (that of the TLSA name).
    @ivar base_domain: for C{USABLE} and C{UNUSABLE}, the TLSA base domain:
        the first candidate (the CNAME-expanded host name, then the host
        name) with a secure TLSA RRset (RFC 7672 §2.2.3).  It is the name
        sent as SNI (§8.1) and the primary reference identifier of
        DANE-TA(2) name checks (§3.2.2).  L{None} otherwise.
    @ivar tlsa_name: the TLSA query name of C{base_domain}, or L{None}.
    @ivar records: the secure TLSA RRset as published (C{USABLE},
        C{UNUSABLE}); C{()} otherwise.
    @ivar usable: the records to authenticate the server with
        (L{select_records<mtasts_twisted.dane.select_records>}); empty
        unless C{USABLE}.
    @ivar ttl: seconds this status may be reused: the smallest TTL of the
        answers it was made of (0 when it must not be).
    @ivar detail: why, for logs and reports (e.g. the lookup failure).
    """

    host: str
    state: DANEState
    port: int = 25
    base_domain: str | None = None
    tlsa_name: str | None = None
    records: tuple[TLSARecord, ...] = attrs.field(default=(), converter=_records)
    usable: tuple[TLSARecord, ...] = attrs.field(default=(), converter=_records)
    ttl: int = 0
    detail: str = ""

    @property
    def applies(self) -> bool:
        """
        Whether DANE decides delivery to this host: a secure TLSA RRset was
        found, usable or not (RFC 7672 §2.2; RFC 8461 §2: DANE before
        MTA-STS).
        """
        return self.state in (DANEState.USABLE, DANEState.UNUSABLE)

    @property
    def authenticates(self) -> bool:
        """Whether the server must be authenticated by the TLSA records (§3.2)."""
        return self.state is DANEState.USABLE

    @property
    def temporary_failure(self) -> bool:
        """Whether a lookup failed, so that the host must not be used now (§2.1.2)."""
        return self.state is DANEState.BOGUS

    @property
    def policy_strings(self) -> tuple[str, ...]:
        """
        The TLSA records in presentation form, one string each: the
        C{policy-string} of a C{tlsa} policy in a TLSRPT report (RFC 8460
        §4.2).
        """
        return tuple(r.to_text() for r in self.records)

    def reference_identifiers(self, next_hop: str, expanded_next_hop: str | None = None) -> tuple[str, ...]:
        """
        The names a DANE-TA(2) server certificate may match (RFC 7672
        §3.2.2, for TLSA records of MX hosts found through a secure MX
        lookup): the TLSA base domain first, then the next-hop domain (the
        recipient domain the MX lookup was for), then its CNAME-expanded
        form if different.

        @param next_hop: the domain the MX lookup was for (A-labels).
        @param expanded_next_hop: that domain after CNAMEs, if known.
        @return: the names, A-labels, lower case, without duplicates.
        """
        names = [self.base_domain or self.host, next_hop]
        if expanded_next_hop:
            names.append(expanded_next_hop)
        return tuple(dict.fromkeys(n.lower().rstrip(".") for n in names))
