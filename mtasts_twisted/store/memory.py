"""
The store in memory: L{MemoryStore} and its L{MemoryShelf}s (database URL
C{memory:}).  Nothing survives the process; for C{lookup --no-cache} and
unit tests.
"""

from __future__ import annotations

import copy
import json
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mtasts_twisted.interfaces import IShelf, IStore

__all__ = ["MemoryShelf", "MemoryStore"]


@implementer(IShelf)
class MemoryShelf:
    """An L{IShelf} in a dict; values are JSON round-tripped like a real store."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rows: dict[str, str] = {}

    def get(self, key: str) -> Deferred:
        """See L{IShelf.get}."""
        row = self.rows.get(key)
        return succeed(None if row is None else json.loads(row))

    def put(self, key: str, value: dict) -> Deferred:
        """See L{IShelf.put}."""
        self.rows[key] = json.dumps(value)
        return succeed(None)

    def delete(self, key: str) -> Deferred:
        """See L{IShelf.delete}."""
        return succeed(self.rows.pop(key, None) is not None)

    def items(self, after: str | None = None, limit: int | None = None) -> Deferred:
        """See L{IShelf.items}."""
        keys = sorted(k for k in self.rows if after is None or k > after)
        if limit is not None:
            keys = keys[:limit]
        return succeed([(k, json.loads(self.rows[k])) for k in keys])

    def update(self, key: str, function: Callable[[dict | None], dict | None]) -> Deferred:
        """See L{IShelf.update}."""
        row = self.rows.get(key)
        new = function(None if row is None else json.loads(row))
        if new is None:
            self.rows.pop(key, None)
        else:
            self.rows[key] = json.dumps(new)
        return succeed(copy.deepcopy(new))


@implementer(IStore)
class MemoryStore:
    """
    An L{IStore} whose shelves live in memory (URL C{memory:}): nothing
    survives the process.  For C{lookup --no-cache} and unit tests.
    """

    url = "memory:"

    def __init__(self) -> None:
        self._shelves: dict[str, MemoryShelf] = {}

    def shelf(self, name: str) -> MemoryShelf:
        """See L{IStore.shelf}."""
        if name not in self._shelves:
            self._shelves[name] = MemoryShelf(name)
        return self._shelves[name]

    def close(self) -> Deferred:
        """See L{IStore.close}."""
        return succeed(None)
