"""
Discovering a policy afresh, with no cache: the C{_mta-sts} TXT record
(RFC 8461 §3.1, L{mtasts_twisted.dns.records}), then the policy it
announces (L{PolicyFetcher}).
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred

from mtasts_twisted.dns.records import lookup_sts_record
from mtasts_twisted.fetch.fetcher import PolicyFetcher
from mtasts_twisted.interfaces import IDNSResolver
from mtasts_twisted.policy import Policy, STSRecord, to_alabel

__all__ = ["Discovery", "discover"]


@attrs.frozen
class Discovery:
    """
    A policy discovered afresh: the STS record and the policy it announces.

    @ivar domain: the policy domain, in A-labels.
    @ivar record: the L{STSRecord} (its C{id} names the policy version).
    @ivar policy: the parsed L{Policy}.
    @ivar text: the policy text as served.
    """

    domain: str
    record: STSRecord
    policy: Policy
    text: str


async def _discover(resolver: IDNSResolver, fetcher: PolicyFetcher, domain: str) -> Discovery:
    alabel = to_alabel(domain)
    record = await lookup_sts_record(resolver, alabel)
    fetched = await fetcher.fetch(alabel)
    return Discovery(domain=alabel, record=record, policy=fetched.policy, text=fetched.text)


def discover(resolver: IDNSResolver, fetcher: PolicyFetcher, domain: str) -> Deferred[Discovery]:
    """
    Discover the policy of C{domain} with no cache: TXT lookup, then fetch.

    @return: a L{Deferred} firing with a L{Discovery}, or failing with the
        errors of L{lookup_sts_record} or L{PolicyFetcher.fetch} (each with
        its TLSRPT C{reason}).
    """
    return Deferred.fromCoroutine(_discover(resolver, fetcher, domain))
