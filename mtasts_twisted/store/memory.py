"""
The store in memory: L{MemoryStore} and its L{MemoryShelf}s (database URL
C{memory:}).  Nothing survives the process; for C{lookup --no-cache},
C{--database memory:} and unit tests.

It behaves as a database L{Store<mtasts_twisted.store.Store>} does (the
store test mixin runs on both): the same keys and values are refused, every
value is JSON round-tripped so callers never share a dict with it, every
method returns a L{Deferred} (already fired) and fails rather than raises,
and after L{MemoryStore.close} every operation fails with L{StoreError}.
"""

from __future__ import annotations

import json
from typing import Iterable, Optional

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mtasts_twisted.interfaces import IShelf, IStore
from mtasts_twisted.store.codec import JSONDict, UpdateFunction, _check_key, _decode, _encode
from mtasts_twisted.store.errors import StoreError

__all__ = ["MemoryShelf", "MemoryStore"]


@implementer(IShelf)
class MemoryShelf:
    """
    An L{IShelf} in a dict of JSON texts.

    @ivar name: the table's name.
    @ivar rows: the stored JSON text of each key.
    """

    def __init__(self, name: str, store: Optional[MemoryStore] = None) -> None:
        """
        @param name: the table's name.
        @param store: the L{MemoryStore} whose closing ends this shelf, if any.
        """
        self.name = name
        self.rows: dict[str, str] = {}
        self._store = store

    def __repr__(self) -> str:
        return f"<MemoryShelf {self.name}>"

    def _check_open(self) -> None:
        if self._store is not None and self._store._closed:
            raise StoreError(f"{self._store.url}: the store is closed", reason="store-closed")

    def _check(self, key: str) -> None:
        self._check_open()
        _check_key(key)

    def get(self, key: str) -> Deferred[Optional[JSONDict]]:
        """See L{IShelf.get}."""
        try:
            self._check(key)
        except Exception:
            return fail()
        return succeed(_decode(self.rows.get(key)))

    def put(self, key: str, value: JSONDict) -> Deferred[None]:
        """See L{IShelf.put}."""
        try:
            self._check(key)
            self.rows[key] = _encode(value)
        except Exception:
            return fail()
        return succeed(None)

    def delete(self, key: str) -> Deferred[bool]:
        """See L{IShelf.delete}."""
        try:
            self._check(key)
        except Exception:
            return fail()
        return succeed(self.rows.pop(key, None) is not None)

    def items(
        self, after: Optional[str] = None, limit: Optional[int] = None
    ) -> Deferred[list[tuple[str, JSONDict]]]:
        """See L{IShelf.items}."""
        try:
            self._check_open()
        except Exception:
            return fail()
        keys = sorted(k for k in self.rows if after is None or k > after)
        if limit is not None:
            keys = keys[:int(limit)]
        return succeed([(k, json.loads(self.rows[k])) for k in keys])

    def update(self, key: str, function: UpdateFunction) -> Deferred[Optional[JSONDict]]:
        """
        See L{IShelf.update}: C{function} gets a fresh copy; if it raises or
        returns something that cannot be stored, nothing changes and the
        L{Deferred} fails.
        """
        try:
            self._check(key)
            new = function(_decode(self.rows.get(key)))
            if new is None:
                self.rows.pop(key, None)
                return succeed(None)
            text = _encode(new)
        except Exception:
            return fail()
        self.rows[key] = text
        return succeed(_decode(text))


@implementer(IStore)
class MemoryStore:
    """
    An L{IStore} whose shelves live in memory (URL C{memory:}): nothing
    survives the process.  For C{lookup --no-cache} and unit tests.

    @ivar url: C{"memory:"}.
    """

    url = "memory:"

    def __init__(self, tables: Optional[Iterable[str]] = None) -> None:
        """
        @param tables: the shelves it has, as
            L{open_store<mtasts_twisted.store.open_store>} gives them; any
            other name is a L{KeyError}, as with a database store.  L{None}
            (for unit tests): a shelf is made for any name on first use.
        """
        self._shelves: dict[str, MemoryShelf] = {}
        self._fixed = tables is not None
        for name in tables or ():
            self._shelves[name] = MemoryShelf(name, self)
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemoryStore {', '.join(self._shelves)}>"

    @property
    def tables(self) -> tuple[str, ...]:
        """The names of its shelves (so far, when made without C{tables})."""
        return tuple(self._shelves)

    def shelf(self, name: str) -> MemoryShelf:
        """
        See L{IStore.shelf}.

        @return: the L{MemoryShelf} (the same object every time).
        @raise KeyError: the store was made with C{tables} but not this one.
        """
        shelf = self._shelves.get(name)
        if shelf is None:
            if self._fixed:
                raise KeyError(
                    f"{self.url} has no table {name!r}: pass it in open_store(tables=...)"
                )
            shelf = self._shelves[name] = MemoryShelf(name, self)
        return shelf

    def close(self) -> Deferred[None]:
        """
        See L{IStore.close}: later operations fail with L{StoreError};
        closing twice is harmless.
        """
        self._closed = True
        return succeed(None)
