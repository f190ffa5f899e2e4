"""
Key reads of a SQLite store in the reactor thread (mtasts_twisted.store.reader):
answered at once, never before this process's own writes of the key, and
left to the pool when another connection holds the database.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtasts_twisted.store import Store, StoreError, default_database_url, open_store
from mtasts_twisted.store.reader import ReactorReader, WouldWait


class ReactorReadTests(TestCase):
    """L{Shelf.get} on a SQLite file, through the reactor-thread reader."""

    async def open(self) -> Store:
        directory = os.path.abspath(self.mktemp())
        self.path = os.path.join(directory, "mtasts.sqlite")
        store = await open_store(default_database_url(directory), reactor)
        self.addCleanup(store.close)
        assert isinstance(store, Store)
        self.assertIsNotNone(store._reader)
        return store

    async def test_read_at_once(self) -> None:
        """A stored key is read in the calling thread: the Deferred has fired."""
        store = await self.open()
        shelf = store.shelf("policies")
        await shelf.put("example.com", {"n": 1})
        d = shelf.get("example.com")
        self.assertEqual(self.successResultOf(d), {"n": 1})
        self.assertIsNone(self.successResultOf(shelf.get("absent.example")))

    async def test_reads_other_connections_writes(self) -> None:
        """A write committed by another process's connection is seen at once."""
        store = await self.open()
        other = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("""INSERT INTO policies (key, value) VALUES ('b.example', '{"n": 2}')""")
        self.assertEqual(self.successResultOf(store.shelf("policies").get("b.example")), {"n": 2})

    async def test_read_your_writes(self) -> None:
        """A read of a key whose write is in flight waits for that write."""
        store = await self.open()
        shelf = store.shelf("policies")
        await shelf.put("example.com", {"n": 1})
        put = shelf.put("example.com", {"n": 2})
        got = shelf.get("example.com")
        self.assertNoResult(got)  # behind the write, in the pool
        await put
        self.assertEqual(await got, {"n": 2})
        # The write is over: reads are immediate again.
        self.assertEqual(self.successResultOf(shelf.get("example.com")), {"n": 2})
        deleting = shelf.delete("example.com")
        after_delete = shelf.get("example.com")
        self.assertNoResult(after_delete)
        await deleting
        self.assertIsNone(await after_delete)

    async def test_would_wait_goes_to_the_pool(self) -> None:
        """A read that would wait for a lock is made by the pool thread instead."""
        store = await self.open()
        shelf = store.shelf("policies")
        await shelf.put("example.com", {"n": 1})
        assert store._reader is not None
        asked = []

        def busy(table: str, key: str) -> None:
            asked.append((table, key))
            raise WouldWait("database is locked")

        store._reader.value = busy  # type: ignore[method-assign]
        got = shelf.get("example.com")
        self.assertEqual(asked, [("policies", "example.com")])
        self.assertNoResult(got)
        self.assertEqual(await got, {"n": 1})

    async def test_database_errors_are_store_errors(self) -> None:
        """An error of the reader's connection fails the read as the pool's would."""
        store = await self.open()
        other = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("DROP TABLE policies")
        failure = self.failureResultOf(store.shelf("policies").get("example.com"), StoreError)
        self.assertIn("no such table", str(failure.value))
        self.assertIsInstance(failure.value.__cause__, sqlite3.OperationalError)

    async def test_bad_key(self) -> None:
        """Key checks are the same as on the pool path."""
        store = await self.open()
        shelf = store.shelf("policies")
        self.failureResultOf(shelf.get("a\x00b"), ValueError)
        self.failureResultOf(shelf.get("\udc80"), ValueError)
        self.failureResultOf(shelf.get(7), TypeError)  # type: ignore[arg-type]
        self.failureResultOf(shelf.get(["unhashable"]), TypeError)  # type: ignore[arg-type]

    async def test_closed(self) -> None:
        """After close the reader is gone and reads fail as before."""
        store = await self.open()
        reader = store._reader
        assert reader is not None
        await store.close()
        self.assertIsNone(store._reader)
        self.assertRaises(WouldWait, reader.value, "policies", "example.com")
        failure = self.failureResultOf(store.shelf("policies").get("example.com"), StoreError)
        self.assertEqual(failure.value.reason, "store-closed")


class ReactorReaderTests(SynchronousTestCase):
    """L{ReactorReader} on its own."""

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "a b%.sqlite")  # quoted in the URI
        writer = sqlite3.connect(self.path, isolation_level=None)
        writer.execute("PRAGMA journal_mode = WAL")
        writer.execute("CREATE TABLE t (key TEXT PRIMARY KEY, value TEXT)")
        writer.execute("INSERT INTO t VALUES ('k', 'v')")
        self.addCleanup(writer.close)
        self.writer = writer

    def test_value(self) -> None:
        reader = ReactorReader(self.path)
        self.addCleanup(reader.close)
        self.assertEqual(reader.value("t", "k"), "v")
        self.assertIsNone(reader.value("t", "absent"))

    def test_read_only(self) -> None:
        """The reader's connection cannot write."""
        reader = ReactorReader(self.path)
        self.addCleanup(reader.close)
        assert reader._connection is not None
        self.assertRaises(sqlite3.OperationalError, reader._connection.execute, "DELETE FROM t")
        self.assertEqual(reader.value("t", "k"), "v")

    def test_no_open_read_transaction(self) -> None:
        """After a read, a checkpoint can truncate the WAL (no snapshot held)."""
        reader = ReactorReader(self.path)
        self.addCleanup(reader.close)
        self.writer.execute("INSERT INTO t VALUES ('k2', 'v2')")
        self.assertEqual(reader.value("t", "k2"), "v2")
        busy, _, _ = self.writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        self.assertEqual(busy, 0)
        self.assertEqual(os.path.getsize(self.path + "-wal"), 0)

    def test_busy_is_would_wait(self) -> None:
        """SQLITE_BUSY and SQLITE_LOCKED become L{WouldWait}; other errors pass."""
        reader = ReactorReader(self.path)
        self.addCleanup(reader.close)
        for name, expected in (("SQLITE_BUSY", WouldWait), ("SQLITE_LOCKED_SHAREDCACHE", WouldWait),
                               ("SQLITE_IOERR", sqlite3.OperationalError)):
            error = sqlite3.OperationalError("database is locked")
            error.sqlite_errorname = name

            class Failing:
                def execute(self, *args: object) -> None:
                    raise error

                def close(self) -> None:
                    pass

            reader._connection = Failing()  # type: ignore[assignment]
            self.assertRaises(expected, reader.value, "t", "k")

    def test_missing_file(self) -> None:
        """A file that is not there is not created: the reader cannot open."""
        missing = os.path.join(os.path.dirname(self.path), "missing.sqlite")
        self.assertRaises(sqlite3.OperationalError, ReactorReader, missing)
        self.assertFalse(os.path.exists(missing))
