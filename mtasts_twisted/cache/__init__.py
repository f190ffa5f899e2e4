"""
The MTA-STS policy cache: RFC 8461 §3–§5 semantics over a persistent store.

L{PolicyCache.get} answers "which policy applies to mail for this domain now?"
following the policy cache table in docs/design.rst; L{PolicyRefresher}
keeps cached policies fresh and removes unused entries.

The rooms, bottom to top:

  - L{settings<mtasts_twisted.cache.settings>}: L{CacheSettings},
    L{RefresherSettings}.
  - L{entry<mtasts_twisted.cache.entry>}: L{CacheEntry}, a row of
    L{POLICY_TABLE}.
  - L{reporting<mtasts_twisted.cache.reporting>}: the TLSRPT result of a
    lookup (L{describe}, L{FALLBACK}, L{BACKOFF_REASON}).
  - L{lookup<mtasts_twisted.cache.lookup>}: L{Lookup}, the answer, and
    L{PolicyLookupTemporaryError}.
  - L{front<mtasts_twisted.cache.front>}: the in-memory LRU front.
  - L{policycache<mtasts_twisted.cache.policycache>}: L{PolicyCache}: the
    lookup semantics, coalescing, batched C{last_use} writes.
  - L{refresher<mtasts_twisted.cache.refresher>}: L{PolicyRefresher}.
"""

from mtasts_twisted.cache.entry import POLICY_TABLE, CacheEntry
from mtasts_twisted.cache.lookup import Lookup, PolicyLookupTemporaryError
from mtasts_twisted.cache.policycache import PolicyCache
from mtasts_twisted.cache.refresher import PolicyRefresher
from mtasts_twisted.cache.reporting import BACKOFF_REASON, FALLBACK, describe
from mtasts_twisted.cache.settings import CacheSettings, RefresherSettings

__all__ = [
    "BACKOFF_REASON",
    "FALLBACK",
    "POLICY_TABLE",
    "CacheEntry",
    "CacheSettings",
    "Lookup",
    "PolicyCache",
    "PolicyLookupTemporaryError",
    "PolicyRefresher",
    "RefresherSettings",
    "describe",
]
