"""
DANE (RFC 7672) in delivery: what the L{Deliverer
<mtasts_twisted.delivery.Deliverer>} does per MX host when its
C{DeliverySettings.dane} is on, kept apart from the delivery loop.

  - L{dane_target}: the TLSA search for one host of a secure MX RRset
    (L{discover_dane<mtasts_twisted.dane.discover_dane>}) and the host's
    decision made again with it (L{plan_host
    <mtasts_twisted.delivery.plan.plan_host>}); a search that fails in an
    unexpected way is a failed lookup (C{DEFER}), never "no DANE".
  - L{dane_check}: what a C{VerifyMode.DANE} handshake authenticates the
    server by (the usable records, the reference identifiers of RFC 7672
    §3.2.2).
  - L{tls_accepted}: whether a session's TLS is what the host's action asks
    for before any mail goes out (verified in the host's mode; for
    C{REQUIRE_TLS}, any TLS).
  - L{reuse_dane}: the DANE part of a parked session's key.
  - L{tlsa_descriptor}, L{report_descriptor}: the TLSRPT policy a host's
    results are counted under (RFC 8460 §4.1 C{tlsa} when DANE decided it).
"""

from __future__ import annotations

from twisted.logger import Logger

from mtasts_twisted.cache import Lookup
from mtasts_twisted.dane import DANEState, DANEStatus, discover_dane
from mtasts_twisted.delivery.plan import HostAction, PlannedHost, plan_host
from mtasts_twisted.dns import AddressAnswer, MXHost
from mtasts_twisted.interfaces import IDNSResolver
from mtasts_twisted.overrides import OverriddenLookup, OverrideKind
from mtasts_twisted.pkix import DANECheck
from mtasts_twisted.policy import Policy
from mtasts_twisted.results import PolicyDescriptor, PolicyType
from mtasts_twisted.tls import VerifyMode

__all__ = [
    "DANE_ACTIONS",
    "dane_check",
    "requires_dane",
    "dane_target",
    "report_descriptor",
    "reuse_dane",
    "tls_accepted",
    "tlsa_descriptor",
]

log = Logger()

#: The actions that DANE, not MTA-STS, decided: their sessions are counted
#: under a C{tlsa} policy (RFC 8460 §4.1).
DANE_ACTIONS = frozenset({HostAction.REQUIRE_DANE, HostAction.REQUIRE_TLS, HostAction.DEFER})


async def dane_target(
    resolver: IDNSResolver,
    policy: Policy | None,
    target: PlannedHost,
    *,
    mx_secure: bool,
    port: int,
    addresses: AddressAnswer,
) -> PlannedHost:
    """
    C{target} decided again with its DANE status (RFC 7672 §2.2; RFC 8461
    §2: DANE first).

    @param resolver: the resolver delivery uses (a validating one).
    @param policy: the recipient domain's MTA-STS policy, or L{None}.
    @param target: the host as planned without DANE.
    @param mx_secure: whether the MX RRset was DNSSEC-secure (RFC 7672
        §2.2.1: DANE only for hosts of a secure MX RRset).
    @param port: the port delivery connects to: the TLSA name is
        C{_PORT._tcp.HOST} (RFC 7672 §2.2.3, RFC 6698 §3).
    @param addresses: the host's address answer (looked up once).
    """
    host = target.host
    try:
        status = await discover_dane(resolver, host, mx_secure=mx_secure, port=port, addresses=addresses)
    except Exception as e:
        # RFC 7672 §2.1.2: a TLSA search that did not finish is a failed
        # lookup: the host is not used now, never "no DANE".
        log.failure("DANE lookup for {host} failed", host=host)
        status = DANEStatus(host, DANEState.BOGUS, port, detail=f"internal error: {e!r}")
    log.debug("DANE {host}: {state} ({detail})", host=host, state=status.state.value, detail=status.detail)
    return plan_host(policy, MXHost(target.preference, host), status)


def dane_check(target: PlannedHost, next_hop: str) -> DANECheck | None:
    """
    For a C{REQUIRE_DANE} host, what its handshake authenticates the server
    by: the usable TLSA records and the reference identifiers (the TLSA
    base domain, then the next-hop domain, RFC 7672 §3.2.2); else L{None}.

    @param next_hop: the recipient domain the MX lookup was for.
    """
    if target.verify is not VerifyMode.DANE or target.dane is None or not target.tlsa_records:
        return None
    return DANECheck(target.tlsa_records, target.dane.reference_identifiers(next_hop))


def tls_accepted(target: PlannedHost, mode: VerifyMode, negotiated: bool, verified: bool) -> bool:
    """
    Whether a session's TLS is what C{target} asks for before any mail is
    sent: for a host that does not require TLS, anything; for
    C{REQUIRE_TLS} (secure TLSA records, none usable: RFC 7672 §2.2), TLS,
    verified or not; otherwise TLS verified in the host's own mode (PKIX
    for MTA-STS C{enforce}, the TLSA records for DANE).

    @param mode: the L{VerifyMode} the session's handshake ran under.
    @param negotiated: whether TLS was negotiated.
    @param verified: whether the handshake's verification passed.
    """
    if not target.require_tls:
        return True
    if not negotiated:
        return False
    if target.action is HostAction.REQUIRE_TLS:
        return True
    return verified and mode is target.verify


def requires_dane(lookup: Lookup) -> bool:
    """
    Whether the operator's C{dane-only} override decides C{lookup}'s domain
    (L{mtasts_twisted.overrides}: the policy source marks the lookup), and
    C{--enforce-as-testing} does not lift it: then only hosts authenticated
    by DANE (L{HostAction.REQUIRE_DANE}) may take the message.
    """
    return (
        isinstance(lookup, OverriddenLookup)
        and lookup.override is not None
        and lookup.override.kind is OverrideKind.DANE_ONLY
        and not lookup.as_testing
    )


def reuse_dane(target: PlannedHost) -> DANEStatus | None:
    """
    The DANE status a parked session to C{target} is keyed with: its own
    when DANE decided the host (a changed TLSA RRset never inherits a
    session authenticated by the old one), else L{None} (the key is then
    the one without DANE).
    """
    return target.dane if target.decided_by_dane else None


def tlsa_descriptor(status: DANEStatus) -> PolicyDescriptor:
    """
    The RFC 8460 C{tlsa} policy of a host: C{policy-domain} the TLSA base
    domain (RFC 8460 §3 "Policy Domain": "For DANE, the Policy Domain is
    the 'TLSA base domain' of the receiving SMTP server"), or the host
    name when the search failed before finding one; C{policy-string} the
    TLSA RRset, one record per string (RFC 8460 §4.5).
    """
    return PolicyDescriptor(PolicyType.TLSA, status.base_domain or status.host, status.policy_strings)


def report_descriptor(descriptor: PolicyDescriptor, target: PlannedHost) -> PolicyDescriptor:
    """
    The policy C{target}'s results are counted under: C{tlsa} when DANE
    decided the host (C{REQUIRE_DANE}, C{REQUIRE_TLS}, C{DEFER}), else the
    delivery's MTA-STS (or no-policy-found) C{descriptor}.  Each session is
    counted once, under the policy that decided it (RFC 8460 §4.2).
    """
    if target.action in DANE_ACTIONS and target.dane is not None:
        return tlsa_descriptor(target.dane)
    return descriptor
