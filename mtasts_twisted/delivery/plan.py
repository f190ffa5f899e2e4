"""
The plan of one delivery, made before any connection: which MX hosts, in
which order, and what MTA-STS asks of each (RFC 8461 §4–§5).

Everything here is a pure function of the policy and the MX list (and an
injected shuffle), so it is tested without sockets, and it is the one
place the per-host MTA-STS decision is made: a sender (L{Deliverer
<mtasts_twisted.delivery.Deliverer>}, or another SMTP client) asks
L{plan_attempts} for the hosts in order and follows each
L{PlannedHost}::

    for target in plan_attempts(lookup.policy, mx.hosts, max_hosts=10):
        if target.action is HostAction.SKIP:
            results.append(skip_result(descriptor, target))   # accounting
            continue
        creator = tls_options.creator(target.host, target.verify)
        ...  # STARTTLS; no plaintext and no unverified TLS if target.require_tls

The decision per MX host (L{plan_host})::

  policy            host      action                   verify       require_tls
  ----------------  --------  -----------------------  -----------  -----------
  enforce           listed    REQUIRE_VERIFIED_TLS     VERIFY       yes
  enforce           unlisted  SKIP (with skip_reason)  VERIFY       yes
  testing           either    RECORD_ONLY              RECORD_ONLY  no
  none, no policy   either    OPPORTUNISTIC            RECORD_ONLY  no

"Listed" is L{Policy.matches<mtasts_twisted.policy.Policy.matches>}
(RFC 8461 §4.1), kept in L{PlannedHost.matches_policy} for the TLSRPT
accounting (a C{testing} session to an unlisted host is reported as
C{mtasts-policy-mx-mismatch}; L{mtasts_twisted.delivery.accounting}).

L{DeliveryPlan} holds what one delivery was planned under (domain,
policy, the TLSRPT policy descriptor, the TXT id): the key under which its
sessions may be reused.
"""

from __future__ import annotations

import collections
import enum
import random
from collections.abc import Callable, MutableSequence, Sequence
from typing import Any, Protocol

import attrs

from mtasts_twisted.dns import MXHost
from mtasts_twisted.policy import Mode, Policy
from mtasts_twisted.results import FailureDetails, PolicyDescriptor
from mtasts_twisted.delivery.details import mx_mismatch_details
from mtasts_twisted.tls import VerifyMode

__all__ = [
    "DeliveryPlan",
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


class HostAction(enum.Enum):
    """
    What MTA-STS asks of delivery to one MX host (RFC 8461 §5).

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
    """

    SKIP = "skip"
    REQUIRE_VERIFIED_TLS = "require-verified-tls"
    RECORD_ONLY = "record-only"
    OPPORTUNISTIC = "opportunistic"


@attrs.frozen
class PlannedHost:
    """
    One MX host in the order to try, and what MTA-STS asks of it.

    @ivar host: the MX host name (A-labels, lower case, as the resolver
        returns it).
    @ivar preference: its MX preference.
    @ivar action: the L{HostAction}.
    @ivar verify: the L{VerifyMode} of its TLS handshakes: C{VERIFY}
        (abort unless the certificate verifies) exactly when the policy is
        C{enforce}, else C{RECORD_ONLY}.
    @ivar require_tls: whether mail may reach it only over verified TLS:
        no plaintext after a missing or refused STARTTLS, no plaintext
        retry after a failed handshake, no session whose certificate did
        not verify (policy C{enforce}).
    @ivar matches_policy: whether the policy's C{mx} patterns list it
        (RFC 8461 §4.1); always C{True} without an C{sts} policy.
    @ivar skip_reason: for L{HostAction.SKIP}, the TLSRPT failure details
        to report for it (once, no C{receiving-ip}); else L{None}.
    """

    host: str
    preference: int
    action: HostAction
    verify: VerifyMode
    require_tls: bool
    matches_policy: bool
    skip_reason: FailureDetails | None = None


def plan_host(policy: Policy | None, mx: MXHost) -> PlannedHost:
    """
    Decide what MTA-STS asks of delivery to MX host C{mx} under C{policy}
    (see the table in the module docstring).

    @param policy: the recipient domain's policy, or L{None} for none.
    @param mx: the MX host.
    """
    mode = policy.mode if policy is not None else None
    if mode is Mode.ENFORCE:
        assert policy is not None
        if policy.matches(mx.host):
            # RFC 8461 §5: enforce: verified TLS or no delivery.
            return PlannedHost(mx.host, mx.preference, HostAction.REQUIRE_VERIFIED_TLS, VerifyMode.VERIFY, True, True)
        # RFC 8461 §4.1: never deliver to an MX host outside an enforced
        # policy.
        return PlannedHost(
            mx.host, mx.preference, HostAction.SKIP, VerifyMode.VERIFY, True, False, mx_mismatch_details(mx.host)
        )
    if mode is Mode.TESTING:
        assert policy is not None
        # RFC 8461 §5: testing: check and report, deliver anyway.
        return PlannedHost(
            mx.host, mx.preference, HostAction.RECORD_ONLY, VerifyMode.RECORD_ONLY, False, policy.matches(mx.host)
        )
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
) -> tuple[PlannedHost, ...]:
    """
    The MX hosts in the order to try them, each with L{plan_host}'s
    decision.

    @param policy: the recipient domain's policy, or L{None} for none.
    @param mx_hosts: the MX hosts (e.g. C{MXAnswer.hosts}).
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
    return tuple(plan_host(policy, mx) for mx in ordered)


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

    def reuse_key(self, host: str, port: int) -> tuple[Any, ...]:
        """
        What a parked session must have been made under to carry mail of
        this plan to C{host}: the same policy domain, MX host and port,
        and the same policy (mode, MX patterns, the policy text via the
        descriptor, and the TXT record id), so a changed policy never
        inherits a session checked against the old one.
        """
        return (self.domain, host, port, self.mode, self.policy, self.descriptor, self.record_id)
