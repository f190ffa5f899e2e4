"""
The resolver's answer cache: what one (name, type) resolved to after
following CNAMEs (L{_Records}) or a definite negative answer
(L{_Negative}), kept in a bounded LRU map (L{_AnswerCache}) until its TTL
runs out on the reactor's clock.  Negative answers live as long as RFC 2308
§5 allows (L{_negative_ttl}), and no longer than L{MAX_NEGATIVE_TTL}.
"""

from __future__ import annotations

import collections
from typing import Any, Protocol, Union

import attrs

from mtasts_twisted.dns.wire import _Reply

__all__ = ["DEFAULT_CACHE_SIZE", "MAX_CACHE_TTL", "MAX_NEGATIVE_TTL"]

#: Entries in the answer cache.
DEFAULT_CACHE_SIZE = 1024
#: Longest a negative answer is cached (RFC 2308 §5 lets us choose less).
MAX_NEGATIVE_TTL = 60
#: Longest a positive answer is cached, whatever its TTL says.
MAX_CACHE_TTL = 86400


class _Clock(Protocol):
    """What the cache uses of the reactor: C{IReactorTime.seconds}."""

    def seconds(self) -> float:
        """The current time, in seconds."""


@attrs.frozen
class _Records:
    """
    The records of one (name, type) after following CNAMEs.

    @ivar secure: every reply on the way had the AD bit.
    @ivar target: the owner of the records: the name asked for, or the
        last CNAME target (as L{_name_text} gives it).
    """

    rdatas: tuple[Any, ...]
    ttl: int
    secure: bool
    server: str
    target: str


@attrs.frozen
class _Negative:
    """A cached definite negative answer (C{secure}: every reply had AD)."""

    nxdomain: bool
    target: str
    server: str
    secure: bool


#: (the name as L{_name_text} gives it: lower case, escaped, no final dot; type)
_CacheKey = tuple[str, int]
_Cached = Union[_Records, _Negative]


class _AnswerCache:
    """A bounded LRU map whose entries expire on the reactor's clock."""

    def __init__(self, clock: _Clock, size: int) -> None:
        self._clock = clock
        self._size = size
        self._entries: collections.OrderedDict[_CacheKey, tuple[float, _Cached]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: _CacheKey) -> tuple[_Cached, int] | None:
        """Return the live entry and its remaining whole seconds, or L{None}."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        remaining = expires - self._clock.seconds()
        if remaining <= 0:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value, int(remaining)

    def put(self, key: _CacheKey, value: _Cached, ttl: float) -> None:
        """Store C{value} for C{ttl} seconds (nothing when C{ttl <= 0})."""
        if self._size <= 0 or ttl <= 0:
            return
        self._entries[key] = (self._clock.seconds() + min(ttl, MAX_CACHE_TTL), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()


def _negative_ttl(reply: _Reply) -> int:
    # RFC 2308 §5: a negative answer lives for min(SOA TTL, SOA MINIMUM);
    # without an SOA in the authority section it SHOULD NOT be cached.
    if reply.soa is None:
        return 0
    ttl, minimum = reply.soa
    return max(0, min(ttl, minimum, MAX_NEGATIVE_TTL))
