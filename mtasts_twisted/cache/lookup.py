"""
What L{PolicyCache.get<mtasts_twisted.cache.PolicyCache.get>} answers: a
L{Lookup}, or L{PolicyLookupTemporaryError} when the policy cannot be
determined now; and the two rules of answering from a cache entry alone
(L{usable_entry}, L{backoff_lookup}), shared by C{get} and C{peek}.
"""

from __future__ import annotations

from typing import Any, Iterator

import attrs

from mtasts_twisted.cache.entry import CacheEntry
from mtasts_twisted.cache.reporting import BACKOFF_REASON, _failure, lookup_problem
from mtasts_twisted.policy import MTASTSError, Policy
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType

__all__ = ["Lookup", "PolicyLookupTemporaryError", "backoff_lookup", "usable_entry"]


class PolicyLookupTemporaryError(MTASTSError):
    """
    The policy could not be determined now and nothing usable is cached:
    retry delivery later.

    @ivar result: the TLSRPT L{Result} of the failed lookup.
    """

    reason = "dns-lookup"

    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result


@attrs.frozen
class Lookup:
    """
    The answer of L{PolicyCache.get}.

    @ivar policy: the policy to apply, or L{None} for none.  A policy in mode
        C{none} is returned as such; it asks for no enforcement.
    @ivar result: the TLSRPT result of this lookup (no sessions counted).
    @ivar fresh: C{True} when confirmed by DNS (and HTTPS) now, C{False} when
        served from the cache despite a failure, or backing off.
    @ivar record_id: the TXT id of the policy, when known.
    @ivar entry: the cache entry behind the answer, if any.
    @ivar error: the lookup's problem in words (for logs and the CLI; a
        TLSRPT report names it by C{result}'s reason code only), or
        L{None}.
    """

    policy: Policy | None
    result: Result
    fresh: bool
    record_id: str | None = None
    entry: CacheEntry | None = None
    error: str | None = None

    def __iter__(self) -> Iterator[Any]:
        """Unpack as C{(policy, result, fresh)}."""
        return iter((self.policy, self.result, self.fresh))


def usable_entry(entry: CacheEntry | None, now: float) -> CacheEntry | None:
    """
    The entry a lookup at C{now} answers from: a policy still valid (RFC
    8461 §5.1: it may be used until C{max_age} ends), or, without a policy,
    a backoff in force after a failed fetch; L{None} when the lookup
    starts afresh (nothing cached, a policy that ended, a backoff that
    ended).
    """
    if entry is None:
        return None
    if entry.policy is not None:
        return entry if entry.valid(now) else None
    return entry if entry.in_backoff(now) else None


def _backoff_text(failure: FailureDetails | None) -> str:
    """The words of a lookup that backs off after a failed fetch."""
    why = f" ({failure.failure_reason_code})" if failure is not None else ""
    return f"backing off after a failed policy fetch{why}"


def backoff_lookup(entry: CacheEntry) -> Lookup:
    """
    The answer while C{entry} (no policy) backs off after a failed fetch:
    no policy, and the backoff as a failure detail that counts no session.
    """
    failure = _failure(ResultType.STS_POLICY_FETCH_ERROR, BACKOFF_REASON)
    return Lookup(None, lookup_problem(PolicyDescriptor(PolicyType.STS, entry.alabel), failure), False,
                  entry.backoff_id, entry, error=_backoff_text(entry.backoff_failure))
