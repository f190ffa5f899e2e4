"""
DANE in the socketmap's answers (C{SocketmapSettings.dane}, C{twistd
mtasts --dane}): what DANE says of a next hop as a whole, and the Postfix
answer that keeps it.

A socketmap answer is one TLS security level for the whole next hop, while
DANE (RFC 7672) decides per MX host; Postfix does DANE itself (with
C{smtp_dns_support_level = dnssec}), so the answer only has to avoid
overriding it.  The rule, with the levels of Postfix 3.7 to 3.10
(postconf(5) C{smtp_tls_security_level}, TLS_README "Mandatory server
certificate verification" and "DANE"):

  ====================================  ========================  ==========================
  DANE of the MX hosts                  answer                    Postfix does
  ====================================  ========================  ==========================
  every host: secure usable TLSA        C{OK dane-only}           DANE for every host; a
                                                                  host without usable TLSA
                                                                  (should that change) is
                                                                  not used, never PKIX or
                                                                  plaintext
  some hosts: secure TLSA (usable or    C{OK dane}                DANE where TLSA records are
  not), others none                                               usable, mandatory TLS
                                                                  without authentication
                                                                  where none is usable,
                                                                  opportunistic TLS on the
                                                                  hosts without TLSA
  a lookup failed (SERVFAIL: bogus or   C{TEMP ...}               defers the mail, connects
  indeterminate, timeout), or the MX                              nowhere
  lookup failed
  no secure TLSA anywhere (insecure     the MTA-STS answer        as without C{--dane}
  MX, unsigned zone, secure denial)     (L{answers})
  ====================================  ========================  ==========================

Why C{dane} and not C{secure match=...} for a mixed next hop: C{secure}
makes Postfix verify every host by WebPKI names and never look at TLSA
records, so a DANE host with a self-signed DANE-EE certificate would fail
and, worse, the DANE host would be authenticated by any public CA instead
of by its TLSA records (the operator's DANE overridden:
postfix-mta-sts-resolver bug #67).  The price of C{dane}: the hosts
without TLSA lose MTA-STS's protection (Postfix uses opportunistic TLS
with them, so an active attacker can strip STARTTLS or present any
certificate there).  RFC 8461 §2 ranks DANE first; Postfix's per-host
DANE is the stronger half of the next hop.

A failed lookup is never answered with MTA-STS (RFC 7672 §2.1.2: the
hosts are unusable now, not "without DANE"), as postfix-tlspol does; one
failing host defers the whole next hop, because a socketmap answer cannot
exclude a host (the relay, which decides per host, uses the others).

No TLSRPT attributes (Postfix >= 3.10) go with a C{dane} or C{dane-only}
answer: C{policy_type} may only be C{sts} or C{no-policy-found}, and
Postfix reports DANE sessions under a C{tlsa} policy of its own making
(TLSRPT_README); attributes naming the MTA-STS policy would report DANE
sessions as C{sts} ones (RFC 8460 §4.1).

Only the answers that would set a level (C{OK secure ...}, and the testing
level with the attributes) are checked: C{NOTFOUND } leaves Postfix its own
C{smtp_tls_security_level} (C{dane}, for a DANE operator), so domains
without an MTA-STS policy cost no DANE lookups here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtasts_twisted.dane import DANEState, DANEStatus, discover_dane
from mtasts_twisted.dns import DNSNoRecordError, DNSTemporaryError, MXAnswer
from mtasts_twisted.interfaces import IDNSResolver

__all__ = ["DomainDANE", "NextHopDANE", "dane_reply", "judge", "next_hop_dane"]

log = Logger()

#: The SMTP port of the TLSA names: Postfix delivers to MX hosts on 25.
SMTP_PORT = 25

#: Seconds the status of a host without addresses is reused (a denial
#: carries no TTL here).
_NO_ADDRESS_TTL = 60


class NextHopDANE(enum.Enum):
    """What DANE says of a next hop as a whole; see the module docstring."""

    #: every MX host has secure usable TLSA records.
    ALL = "dane-only"
    #: some MX hosts have secure TLSA records (usable or not).
    SOME = "dane"
    #: no host has secure TLSA records: MTA-STS decides.
    NONE = "none"
    #: a lookup failed: nothing may be decided now.
    FAILED = "failed"


@attrs.frozen
class DomainDANE:
    """
    The DANE verdict of one next hop.

    @ivar verdict: the L{NextHopDANE}.
    @ivar hosts: the MX hosts in preference order (A-labels), for the
        MTA-STS answer when the verdict is C{NONE}; L{None} when unknown.
    @ivar ttl: seconds the verdict may be reused: the smallest TTL of the
        MX answer and the hosts' DANE statuses (0 for a failure).
    @ivar detail: why, for C{FAILED} (host and lookup).
    @ivar statuses: the per-host statuses it was judged from.
    """

    verdict: NextHopDANE
    hosts: tuple[str, ...] | None = None
    ttl: int = 0
    detail: str = ""
    statuses: tuple[DANEStatus, ...] = ()


def judge(statuses: Sequence[DANEStatus]) -> NextHopDANE:
    """
    The verdict of a next hop from its hosts' DANE statuses (pure).

    @param statuses: one per MX host (none for a next hop without hosts).
    """
    if any(s.temporary_failure for s in statuses):
        # RFC 7672 §2.1.2: a failed lookup is not "no DANE".
        return NextHopDANE.FAILED
    if statuses and all(s.authenticates for s in statuses):
        return NextHopDANE.ALL
    if any(s.applies for s in statuses):
        return NextHopDANE.SOME
    return NextHopDANE.NONE


def dane_reply(domain: str, found: DomainDANE) -> str | None:
    """
    The socketmap reply for a DANE verdict (pure), or L{None} when MTA-STS
    decides (C{NONE}): C{OK dane-only}, C{OK dane} or C{TEMP ...}.
    """
    if found.verdict is NextHopDANE.ALL:
        return "OK dane-only"
    if found.verdict is NextHopDANE.SOME:
        return "OK dane"
    if found.verdict is NextHopDANE.FAILED:
        return f"TEMP DANE lookup for {domain} failed ({found.detail[:200]})"
    return None


def next_hop_dane(resolver: IDNSResolver, domain: str, *, bracketed: bool = False) -> Deferred[DomainDANE]:
    """
    Look up what DANE says of next hop C{domain}: its MX RRset and, for a
    secure one, each host's TLSA records on port 25 (RFC 7672 §2.2), all
    hosts at once.

    @param resolver: an L{IDNSResolver} behind a validating resolver.
    @param domain: the next-hop domain (A-labels).
    @param bracketed: C{domain} is a C{[host]} next hop: Postfix connects
        to it without an MX lookup, and DANE applies to it as to a host of
        a secure MX RRset when its addresses are secure.
    @return: a L{Deferred} firing with a L{DomainDANE} (never failing).
    """
    if bracketed:
        return _judged(resolver, domain, (domain,), True, 86400)
    d = resolver.lookup_mx(domain)
    return d.addBoth(_mx_answered, resolver, domain)


def _mx_answered(result: object, resolver: IDNSResolver, domain: str) -> DomainDANE | Deferred[DomainDANE]:
    if isinstance(result, MXAnswer):
        hosts = tuple(mx.host for mx in result.hosts)
        return _judged(resolver, domain, hosts, result.secure, result.ttl)
    if isinstance(result, Failure) and result.check(DNSNoRecordError):
        # No MX and no address: nowhere to deliver, nothing for DANE.
        return DomainDANE(NextHopDANE.NONE, (), _NO_ADDRESS_TTL)
    error = result.value if isinstance(result, Failure) else result
    return DomainDANE(NextHopDANE.FAILED, None, detail=f"MX lookup failed: {error}")


def _judged(
    resolver: IDNSResolver, domain: str, hosts: tuple[str, ...], secure: bool, ttl: int
) -> Deferred[DomainDANE]:
    if not secure or not hosts:
        # RFC 7672 §2.2.1 (as Postfix): no DANE behind an insecure MX RRset.
        return succeed(DomainDANE(NextHopDANE.NONE, hosts, ttl))
    lookups = [discover_dane(resolver, host, mx_secure=True, port=SMTP_PORT).addErrback(_no_address, host)
               for host in hosts]
    return gatherResults(lookups, consumeErrors=True).addCallbacks(_verdict, _internal, callbackArgs=(hosts, ttl),
                                               errbackArgs=(domain,))


def _no_address(failure: Failure, host: str) -> DANEStatus:
    if failure.check(DNSNoRecordError):
        # discover_dane: the host has no addresses; unreachable, no DANE.
        return DANEStatus(host, DANEState.NONE, SMTP_PORT, ttl=_NO_ADDRESS_TTL, detail="no address records")
    if failure.check(DNSTemporaryError):
        return DANEStatus(host, DANEState.BOGUS, SMTP_PORT, detail=str(failure.value))
    return failure  # type: ignore[return-value]


def _verdict(statuses: list[DANEStatus], hosts: tuple[str, ...], ttl: int) -> DomainDANE:
    verdict = judge(statuses)
    detail = ""
    if verdict is NextHopDANE.FAILED:
        failed = next(s for s in statuses if s.temporary_failure)
        detail = f"{failed.host}: {failed.detail}"
        ttl = 0
    else:
        ttl = min([ttl, *(s.ttl for s in statuses)])
    return DomainDANE(verdict, hosts, ttl, detail, tuple(statuses))


def _internal(failure: Failure, domain: str) -> DomainDANE:
    # Fail closed: an unexpected error in the search is a failed lookup.
    log.failure("DANE lookup of next hop {domain} failed", failure, domain=domain)
    return DomainDANE(NextHopDANE.FAILED, None, detail="internal error")
