"""
What L{PolicyCache.get<mtasts_twisted.cache.PolicyCache.get>} answers: a
L{Lookup}, or L{PolicyLookupTemporaryError} when the policy cannot be
determined now.
"""

from __future__ import annotations

from typing import Any, Iterator

import attrs

from mtasts_twisted.cache.entry import CacheEntry
from mtasts_twisted.policy import MTASTSError, Policy
from mtasts_twisted.results import Result

__all__ = ["Lookup", "PolicyLookupTemporaryError"]


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
