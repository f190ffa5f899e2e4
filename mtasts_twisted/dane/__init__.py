"""
DANE for SMTP (RFC 7672): which TLSA records apply to an MX host and what
they ask of delivery to it.

The rooms, bottom to top:

  - L{records <mtasts_twisted.dane.records>}: which TLSA records are usable
    (RFC 7672 §3.1, RFC 6698 §4.1) and which to match (digest agility, RFC
    7671 §9);
  - L{status <mtasts_twisted.dane.status>}: L{DANEStatus}, what DANE says
    of one host (usable, unusable, none, insecure, bogus);
  - L{discovery <mtasts_twisted.dane.discovery>}: the TLSA search of RFC
    7672 §2.2 over an L{IDNSResolver<mtasts_twisted.interfaces.IDNSResolver>}.

Matching a server's certificate chain against the records is
L{mtasts_twisted.pkix.dane_verify} (the one TLS verification module);
deciding between DANE and MTA-STS per host is
L{mtasts_twisted.delivery.plan}'s (RFC 8461 §2).
"""

from mtasts_twisted.dane.discovery import discover_dane, search_tlsa
from mtasts_twisted.dane.records import MatchingType, Selector, Usage, select_records, unusable_reason
from mtasts_twisted.dane.status import DANEState, DANEStatus, tlsa_name

__all__ = [
    "DANEState",
    "DANEStatus",
    "MatchingType",
    "Selector",
    "Usage",
    "discover_dane",
    "search_tlsa",
    "select_records",
    "tlsa_name",
    "unusable_reason",
]
