"""
What a L{Deliverer<mtasts_twisted.delivery.Deliverer>} is given: the
reactor it needs (L{DeliveryReactor}), where it gets policies
(L{PolicySource}, or L{NoPolicySource} for report mail), and the
recipient domain of a call (L{domain_of}).
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConnector
from twisted.internet.protocol import ClientFactory

from mtasts_twisted.cache import Lookup
from mtasts_twisted.delivery.protocol import Clock
from mtasts_twisted.policy import DomainError, to_alabel
from mtasts_twisted.results import PolicyDescriptor, PolicyType, Result

__all__ = ["DeliveryReactor", "NoPolicySource", "PolicySource", "domain_of"]


class DeliveryReactor(Clock, Protocol):
    """
    What delivery needs of a reactor: C{IReactorTime} (L{Clock}: every
    timeout and the sessions' ages run on it) and C{IReactorTCP} (through
    Twisted's TCP client endpoints).
    """

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = ...,
        bindAddress: tuple[str, int] | None = ...,
        /,
    ) -> IConnector:
        """Connect a TCP client."""


class PolicySource(Protocol):
    """
    Where delivery gets a domain's MTA-STS policy: a
    L{PolicyCache<mtasts_twisted.cache.PolicyCache>}, or a stand-in with
    its C{get} (the relay's report mailer answers "no policy").
    """

    def get(self, domain: str, /) -> Deferred[Lookup]:
        """
        The policy of C{domain} (A-labels); fails with
        L{PolicyLookupTemporaryError} when it cannot be known now.
        """


def domain_of(recipients: list[str]) -> str:
    """
    The one recipient domain (A-labels) of C{recipients}.

    @raise ValueError: no recipients, several domains, an address without
        a domain or with an address literal.
    """
    if not recipients:
        raise ValueError("no recipients")
    domains = set()
    for recipient in recipients:
        _, at, domain = recipient.rpartition("@")
        if not at:
            raise ValueError(f"recipient without a domain: {recipient!r}")
        try:
            domains.add(to_alabel(domain))
        except DomainError as e:
            # Address literals have no MTA-STS policy and no MX.
            raise ValueError(f"cannot deliver to {recipient!r}: {e}") from None
    if len(domains) != 1:
        raise ValueError(f"recipients of several domains: {sorted(domains)}")
    return domains.pop()


class NoPolicySource:
    """
    A L{PolicySource} that answers "no policy" for every domain.

    TLSRPT report mail goes through a sender built with this instead of
    the policy cache: RFC 8460 §5.3 says a report must be delivered even
    when MTA-STS (or DANE) would refuse the recipient's MX, so report
    delivery is opportunistic STARTTLS, never enforced.  Both the service's
    report mailer and the twisted.mail hook's use it.
    """

    def get(self, domain: str) -> Deferred[Lookup]:
        """The L{Lookup} of "no policy" for C{domain}."""
        return succeed(Lookup(None, Result(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, domain)), True))
