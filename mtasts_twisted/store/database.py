"""
Shelve on adbapi: L{Store} and L{Shelf}, a persistent async mapping over an
L{adbapi.ConnectionPool}.

A L{Store} is one database (SQLite file or PostgreSQL database) holding named
tables; each table is a L{Shelf}: an async mapping of string keys (unicode
domain names and the like) to JSON-serialisable dicts, stored as JSON text
(never pickle).  Every operation returns a L{Deferred}; the SQL runs in the
pool's threads, written once for every engine (the L{_Dialect} supplies what
differs).  Open one with L{open_store<mtasts_twisted.store.open_store>}.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional, Sequence

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtasts_twisted.interfaces import IShelf, IStore
from mtasts_twisted.store.codec import JSONDict, UpdateFunction, _check_key, _decode, _encode
from mtasts_twisted.store.dialects import StoreReactor, _Dialect
from mtasts_twisted.store.errors import StoreError
from mtasts_twisted.store.reader import ReactorReader, WouldWait
from mtasts_twisted.store.schema import Cursor

__all__ = ["Shelf", "Store"]

# The package is the log namespace, as before the split into modules.
log = Logger(namespace="mtasts_twisted.store")


@implementer(IStore)
class Store:
    """
    A database of named L{Shelf} tables; make one with
    L{open_store<mtasts_twisted.store.open_store>}.

    @ivar url: the database URL (without password).
    @ivar tables: the names of the shelves this store was opened with.
    """

    def __init__(
        self,
        dialect: _Dialect,
        pool: adbapi.ConnectionPool,
        tables: Sequence[str],
        reactor: StoreReactor,
    ) -> None:
        self._dialect = dialect
        self._pool = pool
        self._reactor = reactor
        self.url: str = dialect.url
        self.tables: tuple[str, ...] = tuple(tables)
        self._shelves = {name: Shelf(self, name) for name in self.tables}
        self._closed = False
        self._in_flight = 0
        self._idle: list[Deferred[None]] = []
        #: Key reads in the reactor thread (SQLite), or None: all in the pool.
        self._reader: ReactorReader | None = None

    def read_in_reactor(self, reader: ReactorReader) -> None:
        """
        Answer L{Shelf.get} with C{reader} from the calling (reactor)
        thread when it can (see L{mtasts_twisted.store.reader}).
        """
        self._reader = reader

    def __repr__(self) -> str:
        return f"<Store {self.url}>"

    def shelf(self, name: str) -> "Shelf":
        """
        Return the shelf for table C{name}.

        @param name: one of the C{tables} given to
            L{open_store<mtasts_twisted.store.open_store>}.
        @return: the L{Shelf} (the same object every time).
        @raise KeyError: the store was not opened with that table.
        """
        try:
            return self._shelves[name]
        except KeyError:
            raise KeyError(
                f"{self.url} has no table {name!r}: pass it in open_store(tables=...)"
            ) from None

    def close(self) -> "Deferred[None]":
        """
        Wait for running operations, then close every connection.

        Later operations fail with L{StoreError}; closing twice is harmless.

        @return: L{Deferred} firing with L{None} when closed.
        """
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if self._in_flight:
                waiting: Deferred[None] = Deferred()
                self._idle.append(waiting)
                await waiting
            self._pool.close()
            log.debug("closed store {url}", url=self.url)
        elif self._in_flight:
            waiting = Deferred()
            self._idle.append(waiting)
            await waiting

    def _run(self, interaction: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run C{interaction(txn, *args)} in a pool thread; translate driver errors."""
        if self._closed:
            return Deferred.fromCoroutine(self._fail_closed())
        self._in_flight += 1
        d = self._pool.runInteraction(interaction, *args)

        def translate(failure: Failure) -> Failure:
            value = failure.value
            if value is not None and failure.check(self._dialect.dbapi.Error, adbapi.ConnectionLost):
                error = self._dialect.translate(value)
                error.__cause__ = value
                return Failure(error)
            return failure

        def done(result: Any) -> Any:
            self._in_flight -= 1
            if not self._in_flight:
                idle, self._idle = self._idle, []
                for waiting in idle:
                    waiting.callback(None)
            return result

        d.addErrback(translate)
        d.addBoth(done)
        return d

    async def _fail_closed(self) -> None:
        raise StoreError(f"{self.url}: the store is closed", reason="store-closed")


@implementer(IShelf)
class Shelf:
    """
    One table of a L{Store}: an async mapping of str keys to JSON dicts.

    Get one from L{Store.shelf}.  Methods fail with L{StoreError} when the
    database fails, with L{TypeError}/L{ValueError} for bad keys or values.

    @ivar name: the table's name.
    """

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self._dialect = store._dialect
        self.name = name
        #: Keys with a write of this process in flight, and how many: their
        #: reads go through the pool, after those writes.
        self._writing: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<Shelf {self.name} of {self._store.url}>"

    def get(self, key: str) -> "Deferred[Optional[JSONDict]]":
        """
        Read one value.

        @param key: the key.
        @return: L{Deferred} firing with the stored dict, or L{None}.
        """
        reader = self._store._reader
        if reader is not None:
            try:
                _check_key(key)
                if key in self._writing:
                    raise WouldWait("a write of this key is in flight")
                return succeed(_decode(reader.value(self.name, key)))
            except WouldWait:
                pass  # the pool thread may wait; the reactor may not
            except self._dialect.dbapi.Error as e:
                error = self._dialect.translate(e)
                error.__cause__ = e
                return fail(error)
            except Exception:
                return fail()
        return Deferred.fromCoroutine(self._get(key))

    async def _get(self, key: str) -> Optional[JSONDict]:
        _check_key(key)
        return _decode(await self._store._run(self._select, key))

    def _select(self, txn: Cursor, key: str) -> Optional[str]:
        txn.execute(
            self._dialect.sql(f'SELECT value FROM "{self.name}" WHERE key = ?'), (key,)
        )
        row = txn.fetchone()
        return None if row is None else row[0]

    def put(self, key: str, value: JSONDict) -> "Deferred[None]":
        """
        Store C{value} under C{key}, replacing what was there.

        @param key: the key.
        @param value: a dict that survives a JSON round trip unchanged (str
            keys; str, int, float, bool, None, lists and dicts inside).
        @return: L{Deferred} firing with L{None} once committed.
        """
        return Deferred.fromCoroutine(self._put(key, value))

    async def _put(self, key: str, value: JSONDict) -> None:
        _check_key(key)
        await self._write(key, self._upsert, key, _encode(value))

    async def _write(self, key: str, interaction: Callable[..., Any], *args: Any) -> Any:
        """Run a write of C{key} in the pool; reads of C{key} wait for it."""
        writing = self._writing
        writing[key] = writing.get(key, 0) + 1
        try:
            return await self._store._run(interaction, *args)
        finally:
            if writing[key] == 1:
                del writing[key]
            else:
                writing[key] -= 1

    def _upsert(self, txn: Cursor, key: str, text: str) -> None:
        txn.execute(
            self._dialect.sql(
                f'INSERT INTO "{self.name}" (key, value) VALUES (?, ?)'
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ),
            (key, text),
        )

    def delete(self, key: str) -> "Deferred[bool]":
        """
        Remove C{key}.

        @param key: the key.
        @return: L{Deferred} firing with C{True} if it was there, else C{False}.
        """
        return Deferred.fromCoroutine(self._delete(key))

    async def _delete(self, key: str) -> bool:
        _check_key(key)
        return bool(await self._write(key, self._remove, key))

    def _remove(self, txn: Cursor, key: str) -> int:
        txn.execute(
            self._dialect.sql(f'DELETE FROM "{self.name}" WHERE key = ?'), (key,)
        )
        return txn.rowcount

    def items(
        self, after: Optional[str] = None, limit: Optional[int] = None
    ) -> "Deferred[list[tuple[str, JSONDict]]]":
        """
        Read the table, or one page of it.

        @param after: only keys after this one (to read page by page).
        @param limit: at most this many pairs.
        @return: L{Deferred} firing with the C{(key, value)} pairs, sorted by
            key in code point order (the same on every backend).
        """
        return Deferred.fromCoroutine(self._items(after, limit))

    async def _items(self, after: Optional[str], limit: Optional[int]) -> list[tuple[str, JSONDict]]:
        rows = await self._store._run(self._select_page, after, limit)
        return [(key, json.loads(text)) for key, text in sorted(rows)]

    def _select_page(self, txn: Cursor, after: Optional[str], limit: Optional[int]) -> list[tuple[str, str]]:
        # Placeholder rows (value NULL) are never committed; skip them anyway.
        collate = self._dialect.binary_collation
        statement = f'SELECT key, value FROM "{self.name}" WHERE value IS NOT NULL'
        args: list[Any] = []
        if after is not None:
            statement += f" AND key{collate} > ?"
            args.append(after)
        if limit is not None:
            statement += f" ORDER BY key{collate} LIMIT ?"
            args.append(int(limit))
        txn.execute(self._dialect.sql(statement), tuple(args))
        return [(key, text) for key, text in txn.fetchall()]

    def update(self, key: str, function: UpdateFunction) -> "Deferred[Optional[JSONDict]]":
        """
        Atomically replace the value under C{key} by C{function(old)}.

        The read, C{function} and the write run in one transaction that locks
        the key (SQLite: C{BEGIN IMMEDIATE}; PostgreSQL: C{SELECT ... FOR
        UPDATE}), so concurrent updates from this or other processes or
        nodes never lose each other's changes.

        @param key: the key.
        @param function: called in a database thread with the stored dict (a
            fresh copy) or L{None}; returns the new dict, or L{None} to delete
            the key.  It must not block on anything but the database.  If it
            raises, nothing changes and the L{Deferred} fails with that error.
        @return: L{Deferred} firing with the new value (as a fresh copy) or
            L{None}.
        """
        return Deferred.fromCoroutine(self._update(key, function))

    async def _update(self, key: str, function: UpdateFunction) -> Optional[JSONDict]:
        _check_key(key)
        return _decode(await self._write(key, self._read_modify_write, key, function))

    def _read_modify_write(
        self, txn: Cursor, key: str, function: UpdateFunction
    ) -> Optional[str]:
        self._dialect.begin_write(txn)
        old = _decode(self._dialect.lock_key(txn, self.name, key))
        new = function(old)
        if new is None:
            self._remove(txn, key)
            text = None
        else:
            text = _encode(new)
            self._upsert(txn, key, text)
        self._dialect.commit(txn)
        return text
