"""
Discovering a policy afresh, with no cache: the C{_mta-sts} TXT record
(RFC 8461 §3.1), then the policy it announces (L{PolicyFetcher}).
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from mtasts_twisted.dns import DNSNoRecordError
from mtasts_twisted.fetch.fetcher import PolicyFetcher
from mtasts_twisted.policy import NoRecordError, Policy, STSRecord, select_sts_record, to_alabel

__all__ = ["Discovery", "discover", "lookup_sts_answer", "lookup_sts_record"]


async def lookup_sts_record(resolver: Any, alabel: str) -> STSRecord:
    """
    Look up and select the STS record of C{alabel} (RFC 8461 §3.1).

    @param resolver: an L{mtasts_twisted.interfaces.IDNSResolver}.
    @raise NoRecordError: no TXT record, or none that is an STS record.
    @raise MultipleRecordsError: several STS records.
    @raise RecordSyntaxError: the STS record is malformed.
    @raise DNSTemporaryError: the lookup failed and may succeed later.
    """
    record, _ = await lookup_sts_answer(resolver, alabel)
    return record


async def lookup_sts_answer(resolver: Any, alabel: str) -> tuple[STSRecord, int]:
    """
    L{lookup_sts_record}, also giving the TXT answer's TTL (seconds left).
    """
    try:
        answer = await resolver.lookup_txt("_mta-sts." + alabel)
    except DNSNoRecordError as e:
        raise NoRecordError(f"no TXT record at _mta-sts.{alabel}") from e
    return _select_sts_record(tuple(answer.strings)), answer.ttl


@functools.lru_cache(maxsize=4096)
def _select_sts_record(strings: tuple[str, ...]) -> STSRecord:
    """L{select_sts_record}, memoised: a cached TXT answer is not parsed again."""
    return select_sts_record(strings)


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


async def _discover(resolver: Any, fetcher: PolicyFetcher, domain: str) -> Discovery:
    alabel = to_alabel(domain)
    record = await lookup_sts_record(resolver, alabel)
    fetched = await fetcher.fetch(alabel)
    return Discovery(domain=alabel, record=record, policy=fetched.policy, text=fetched.text)


def discover(resolver: Any, fetcher: PolicyFetcher, domain: str) -> Deferred[Discovery]:
    """
    Discover the policy of C{domain} with no cache: TXT lookup, then fetch.

    @return: a L{Deferred} firing with a L{Discovery}, or failing with the
        errors of L{lookup_sts_record} or L{PolicyFetcher.fetch} (each with
        its TLSRPT C{reason}).
    """
    return Deferred.fromCoroutine(_discover(resolver, fetcher, domain))
