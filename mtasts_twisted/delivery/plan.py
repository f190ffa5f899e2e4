"""
The plan of one delivery, made before any connection: which MX hosts, in
which order, and what DANE (RFC 7672) or MTA-STS (RFC 8461 §4–§5) asks of
each.

Everything here is a pure function of the policy, the MX list and the
hosts' DANE statuses (and an injected shuffle), so it is tested without
sockets, and it is the one place the per-host decision is made: a sender
(L{Deliverer <mtasts_twisted.delivery.Deliverer>}, or another SMTP client)
asks L{plan_attempts} for the hosts in order and follows each
L{PlannedHost}::

    for target in plan_attempts(lookup.policy, mx.hosts, max_hosts=10, dane=statuses):
        if target.skipped:
            results.append(skip_result(descriptor, target))   # accounting
            continue
        creator = tls_options.creator(target.host, target.verify)
        ...  # STARTTLS; no plaintext and no unverified TLS if target.require_tls

The decision per MX host (L{plan_host}).  DANE first (RFC 8461 §2:
MTA-STS never overrides DANE; RFC 7672 §2.2): a host with a secure TLSA
RRset is decided by it, whatever the MTA-STS policy says::

  DANE status    policy           host      action                verify       require_tls
  -------------  ---------------  --------  --------------------  -----------  -----------
  usable         any              any       REQUIRE_DANE          DANE         yes
  bogus          any              any       DEFER (skip_reason)   DANE         yes
  unusable       enforce          listed    REQUIRE_VERIFIED_TLS  VERIFY       yes
  unusable       enforce          unlisted  SKIP (skip_reason)    VERIFY       yes
  unusable       testing, none,   either    REQUIRE_TLS           RECORD_ONLY  yes
                 no policy
  none,          enforce          listed    REQUIRE_VERIFIED_TLS  VERIFY       yes
  insecure,      enforce          unlisted  SKIP (skip_reason)    VERIFY       yes
  or not         testing          either    RECORD_ONLY           RECORD_ONLY  no
  looked up      none, no policy  either    OPPORTUNISTIC         RECORD_ONLY  no

Where a secure TLSA RRset has no usable record, DANE asks for TLS without
authentication (RFC 7672 §2.2) and MTA-STS is applied on top: the stricter
of the two (an C{enforce} policy still verifies and still skips unlisted
hosts; otherwise the host gets TLS, unauthenticated, and never plaintext).

"Listed" is L{Policy.matches<mtasts_twisted.policy.Policy.matches>}
(RFC 8461 §4.1), kept in L{PlannedHost.matches_policy} for the TLSRPT
accounting (a C{testing} session to an unlisted host is reported as
C{mtasts-policy-mx-mismatch}; L{mtasts_twisted.delivery.accounting}).
DANE never reorders hosts: MX preference comes first (RFC 7672 §2.2.1).

L{DeliveryPlan} holds what one delivery was planned under (domain,
policy, the TLSRPT policy descriptor, the TXT id): the key under which its
sessions may be reused.
"""

from __future__ import annotations

import collections
import enum
import random
from collections.abc import Callable, Mapping, MutableSequence, Sequence
from typing import Any, Protocol

import attrs

from mtasts_twisted.dane import DANEState, DANEStatus
from mtasts_twisted.dns import MXHost, TLSARecord
from mtasts_twisted.policy import Mode, Policy
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, ResultType
from mtasts_twisted.delivery.details import mx_mismatch_details
from mtasts_twisted.tls import VerifyMode

__all__ = [
    "DeliveryPlan",
    "DANE_LOOKUP_FAILED_REASON",
    "HostAction",
    "PlannedHost",
    "Shuffler",
    "order_mx_hosts",
    "plan_attempts",
    "plan_host",
]


class Shuffler(Protocol):
    """Shuffles a list in place: the C{random} module, a L{random.Random}."""

    def shuffle(self, x: MutableSequence[Any], /) -> None:
        """Shuffle C{x} in place."""


#: failure-reason-code of a host whose DANE lookups failed (RFC 7672 §2.1.2).
DANE_LOOKUP_FAILED_REASON = "dane-dnssec-lookup-failed"


class HostAction(enum.Enum):
    """
    What DANE or MTA-STS asks of delivery to one MX host (RFC 7672 §2.2,
    RFC 8461 §5).

    @cvar SKIP: policy C{enforce}, a host the policy does not list: never
        connect to it (§4.1); report it once (L{PlannedHost.skip_reason}).
    @cvar REQUIRE_VERIFIED_TLS: policy C{enforce}, a listed host: STARTTLS
        is required and the certificate must verify (the handshake is
        aborted otherwise), so nothing of the message is ever sent in
        plaintext or over unverified TLS.
    @cvar RECORD_ONLY: policy C{testing}: the same checks, but failures are
        only reported; delivery goes on (opportunistic fallback included).
    @cvar OPPORTUNISTIC: no policy, or mode C{none}: STARTTLS when
        offered, certificate not required to verify, plaintext fallback.
    @cvar REQUIRE_DANE: a secure TLSA RRset with a usable record (RFC 7672
        §2.2, §3.2): STARTTLS is required and the server must be
        authenticated by the records (L{PlannedHost.tlsa_records}; the
        handshake is aborted otherwise), with SNI the TLSA base domain
        (§8.1).  The MTA-STS policy, whatever it says, is not asked (RFC
        8461 §2).
    @cvar REQUIRE_TLS: a secure TLSA RRset with no usable record, and no
        C{enforce} policy: STARTTLS is required, the certificate is not
        (RFC 7672 §2.2); never plaintext.
    @cvar DEFER: a DANE lookup of the host failed (bogus, indeterminate,
        SERVFAIL, timeout): the host must not be used now (RFC 7672
        §2.1.2); report it once (L{PlannedHost.skip_reason},
        C{dnssec-invalid}).  Delivery through the other hosts may go on;
        without them it is a temporary failure, never a bounce.
    """

    SKIP = "skip"
    REQUIRE_VERIFIED_TLS = "require-verified-tls"
    RECORD_ONLY = "record-only"
    OPPORTUNISTIC = "opportunistic"
    REQUIRE_DANE = "require-dane"
    REQUIRE_TLS = "require-tls"
    DEFER = "defer"


@attrs.frozen
class PlannedHost:
    """
    One MX host in the order to try, and what DANE or MTA-STS asks of it.

    @ivar host: the MX host name (A-labels, lower case, as the resolver
        returns it).
    @ivar preference: its MX preference.
    @ivar action: the L{HostAction}.
    @ivar verify: the L{VerifyMode} of its TLS handshakes: C{DANE} for
        L{HostAction.REQUIRE_DANE} (and C{DEFER}); C{VERIFY} (abort unless
        the certificate verifies) when the policy is C{enforce}; else
        C{RECORD_ONLY}.
    @ivar require_tls: whether mail may reach it only over TLS that the
        action accepts: no plaintext after a missing or refused STARTTLS,
        no plaintext retry after a failed handshake; and, but for
        L{HostAction.REQUIRE_TLS}, no session whose certificate did not
        verify.
    @ivar matches_policy: whether the policy's C{mx} patterns list it
        (RFC 8461 §4.1); always C{True} without an C{sts} policy.
    @ivar skip_reason: for L{HostAction.SKIP} and L{HostAction.DEFER}, the
        TLSRPT failure details to report for it (once, no C{receiving-ip});
        else L{None}.
    @ivar dane: the host's L{DANEStatus} when DANE was looked up, else
        L{None}.
    """

    host: str
    preference: int
    action: HostAction
    verify: VerifyMode
    require_tls: bool
    matches_policy: bool
    skip_reason: FailureDetails | None = None
    dane: DANEStatus | None = None

    @property
    def skipped(self) -> bool:
        """Whether no connection may be made to it (L{HostAction.SKIP}, L{HostAction.DEFER})."""
        return self.action in (HostAction.SKIP, HostAction.DEFER)

    @property
    def decided_by_dane(self) -> bool:
        """
        Whether its secure TLSA RRset (usable or not) or a failed DANE
        lookup decided it, so that its sessions are reported under a
        C{tlsa} policy (RFC 8460 §4.2).
        """
        return self.dane is not None and (self.dane.applies or self.dane.temporary_failure)

    @property
    def server_name(self) -> str:
        """
        The name to send as SNI: the TLSA base domain when DANE decides
        the TLS of the host (RFC 7672 §8.1), else the host name (RFC 8461
        §4.1).
        """
        if self.action in (HostAction.REQUIRE_DANE, HostAction.REQUIRE_TLS) and self.dane is not None:
            return self.dane.base_domain or self.host
        return self.host

    @property
    def tlsa_records(self) -> tuple[TLSARecord, ...]:
        """For L{HostAction.REQUIRE_DANE}, the records to authenticate the server by; else C{()}."""
        if self.action is HostAction.REQUIRE_DANE and self.dane is not None:
            return self.dane.usable
        return ()


def dane_lookup_failed_details(status: DANEStatus) -> FailureDetails:
    """
    Failure-details for a host whose DANE lookups failed: C{dnssec-invalid}
    (RFC 8460 §4.3.2: no valid records from the recursive resolver).  What
    failed (C{status.detail}) is for the log: RFC 8460 §4.4
    C{additional-information} is a URI.
    """
    return FailureDetails(
        result_type=ResultType.DNSSEC_INVALID,
        receiving_mx_hostname=status.host,
        failure_reason_code=DANE_LOOKUP_FAILED_REASON,
    )


def plan_host(policy: Policy | None, mx: MXHost, dane: DANEStatus | None = None) -> PlannedHost:
    """
    Decide what DANE or MTA-STS asks of delivery to MX host C{mx} (see the
    table in the module docstring).

    @param policy: the recipient domain's MTA-STS policy, or L{None}.
    @param mx: the MX host.
    @param dane: the host's L{DANEStatus}, or L{None} when DANE was not
        looked up (the decision is then MTA-STS's alone, as without DANE).
    """
    matches = policy.matches(mx.host) if policy is not None and policy.mode is not Mode.NONE else True
    if dane is not None:
        if dane.state is DANEState.USABLE:
            # RFC 8461 §2 and RFC 7672 §3.2: DANE authenticates the host,
            # whatever the MTA-STS policy would make of it.
            return PlannedHost(mx.host, mx.preference, HostAction.REQUIRE_DANE, VerifyMode.DANE, True, matches,
                               dane=dane)
        if dane.state is DANEState.BOGUS:
            # RFC 7672 §2.1.2: a failed DANE lookup makes the host
            # unreachable; MTA-STS must not stand in for it (RFC 8461 §2).
            return PlannedHost(mx.host, mx.preference, HostAction.DEFER, VerifyMode.DANE, True, matches,
                               dane_lookup_failed_details(dane), dane)
    target = _plan_sts(policy, mx, matches)
    if dane is None:
        return target
    if dane.state is DANEState.UNUSABLE and not target.require_tls:
        # RFC 7672 §2.2: secure but unusable TLSA records still commit the
        # host to TLS: encrypted, unauthenticated, never plaintext (MTA-STS
        # testing still records its checks).
        return attrs.evolve(target, action=HostAction.REQUIRE_TLS, require_tls=True, dane=dane)
    return attrs.evolve(target, dane=dane)


def _plan_sts(policy: Policy | None, mx: MXHost, matches: bool) -> PlannedHost:
    """The MTA-STS decision alone (RFC 8461 §4–§5)."""
    mode = policy.mode if policy is not None else None
    if mode is Mode.ENFORCE:
        if matches:
            # RFC 8461 §5: enforce: verified TLS or no delivery.
            return PlannedHost(mx.host, mx.preference, HostAction.REQUIRE_VERIFIED_TLS, VerifyMode.VERIFY, True, True)
        # RFC 8461 §4.1: never deliver to an MX host outside an enforced
        # policy.
        return PlannedHost(
            mx.host, mx.preference, HostAction.SKIP, VerifyMode.VERIFY, True, False, mx_mismatch_details(mx.host)
        )
    if mode is Mode.TESTING:
        # RFC 8461 §5: testing: check and report, deliver anyway.
        return PlannedHost(mx.host, mx.preference, HostAction.RECORD_ONLY, VerifyMode.RECORD_ONLY, False, matches)
    # No policy, or mode none: opportunistic STARTTLS.
    return PlannedHost(mx.host, mx.preference, HostAction.OPPORTUNISTIC, VerifyMode.RECORD_ONLY, False, True)


def order_mx_hosts(hosts: Sequence[MXHost], rng: Shuffler = random) -> list[MXHost]:
    """
    Order MX hosts by preference, shuffling hosts of equal preference
    (RFC 5321 §5.1).

    @param rng: has C{shuffle}; the C{random} module by default.
    """
    groups: dict[int, list[MXHost]] = collections.defaultdict(list)
    for host in hosts:
        groups[host.preference].append(host)
    ordered: list[MXHost] = []
    for preference in sorted(groups):
        group = sorted(groups[preference])
        rng.shuffle(group)
        ordered.extend(group)
    return ordered


def plan_attempts(
    policy: Policy | None,
    mx_hosts: Sequence[MXHost],
    *,
    rng: Shuffler = random,
    max_hosts: int | None = None,
    first: Callable[[str], bool] | None = None,
    dane: Mapping[str, DANEStatus] | None = None,
) -> tuple[PlannedHost, ...]:
    """
    The MX hosts in the order to try them, each with L{plan_host}'s
    decision.  DANE does not change the order: a less preferred host with
    TLSA records never goes before a more preferred one without (RFC 7672
    §2.2.1).

    @param policy: the recipient domain's policy, or L{None} for none.
    @param mx_hosts: the MX hosts (e.g. C{MXAnswer.hosts}).
    @param dane: the L{DANEStatus} of each host looked up, by host name;
        L{None} (or a host missing) for MTA-STS alone.
    @param rng: shuffles hosts of equal preference (L{order_mx_hosts}).
    @param max_hosts: how many hosts to keep at most (skipped ones count),
        or L{None} for all.
    @param first: among hosts of equal preference, those for which it
        returns C{True} (given the host name) come first, e.g. hosts with
        a session parked for reuse.  Never a less preferred host before a
        more preferred one.
    """
    ordered = order_mx_hosts(mx_hosts, rng)
    if first is not None:
        # RFC 5321 §5.1 orders by preference and leaves equal ones to us.
        # (The sort is stable: the shuffle stands within each group.)
        ordered.sort(key=lambda h: (h.preference, not first(h.host)))
    if max_hosts is not None:
        ordered = ordered[:max_hosts]
    statuses = dane or {}
    return tuple(plan_host(policy, mx, statuses.get(mx.host)) for mx in ordered)


@attrs.frozen
class DeliveryPlan:
    """
    What one delivery is planned under.

    @ivar domain: the recipient domain (A-labels).
    @ivar policy: its policy, or L{None} for none.
    @ivar descriptor: the TLSRPT policy descriptor of every result of this
        delivery (RFC 8460 §4.1), from the policy lookup.
    @ivar record_id: the policy's TXT id, when known.
    """

    domain: str
    policy: Policy | None
    descriptor: PolicyDescriptor
    record_id: str | None = None

    @property
    def mode(self) -> Mode | None:
        """The policy's L{Mode}, or L{None} without a policy."""
        return self.policy.mode if self.policy is not None else None

    @property
    def enforce(self) -> bool:
        """Is the policy in mode C{enforce}?"""
        return self.mode is Mode.ENFORCE

    def reuse_key(self, host: str, port: int, dane: DANEStatus | None = None) -> tuple[Any, ...]:
        """
        What a parked session must have been made under to carry mail of
        this plan to C{host}: the same policy domain, MX host and port,
        and the same policy (mode, MX patterns, the policy text via the
        descriptor, and the TXT record id), so a changed policy never
        inherits a session checked against the old one; with DANE, the
        same TLSA state, base domain and records (not the TTL or detail).
        """
        tlsa = None if dane is None else (dane.state, dane.base_domain, dane.usable)
        return (self.domain, host, port, self.mode, self.policy, self.descriptor, self.record_id, tlsa)
