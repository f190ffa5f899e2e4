"""
The in-memory front of the policy cache: a bounded LRU dict of
L{CacheEntry}s, so that a cached policy costs no SQL.
"""

from __future__ import annotations

from collections import OrderedDict

from mtasts_twisted.cache.entry import CacheEntry


class _Front:
    """A bounded LRU dict: the in-memory front of the store."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()

    def get(self, key: str) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CacheEntry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
