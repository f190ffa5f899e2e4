"""
Tests for L{mtasts_twisted.store}: one behaviour mixin run against SQLite (a
real file), PostgreSQL (a real throwaway server) and the shipped MemoryStore
(persistence and schema tests only on the databases), plus each backend's own
cases: bad SQLite files, two processes sharing one file, two PostgreSQL
"nodes", and the PostgreSQL test fixture.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import unittest as pyunit
from typing import Any, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor, utils
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

import mtasts_twisted
from mtasts_twisted.interfaces import IShelf, IStore
from mtasts_twisted.policy import MTASTSError
from mtasts_twisted.store import (
    SCHEMA_VERSION,
    MemoryShelf,
    MemoryStore,
    Store,
    StoreError,
    _decode,
    _encode,
    _redact,
    default_database_url,
    open_store,
)
from mtasts_twisted.testing import postgres

TABLES = ("policies", "results")

# A value exercising every JSON type, unicode, float edge cases and key order.
RICH = {
    "zeta": "bücher ✉ 📬 \u0000 \"quoted\" \\ /",
    "alpha": [1, -2, 2**70, 0.1, 1e300, -0.0, 5e-324, True, False, None],
    "nested": {"mx": ["*.example.net", "mx.bücher.example"], "empty": {}, "list": []},
    "": "empty key",
    "\ud7ff": 1.5,
}


def increment(old: Optional[dict]) -> dict:
    """Update function: count up (runs in a database thread)."""
    return {"n": (old or {"n": 0})["n"] + 1}


def toggle(old: Optional[dict]) -> Optional[dict]:
    """Update function: create when absent, delete when present."""
    return {"here": True} if old is None else None


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(mtasts_twisted.__file__)))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO, env.get("PYTHONPATH")]))
    return env


class _StoreTestsMixin:
    """
    The behaviour of every store L{open_store} opens (database or memory);
    subclasses set C{self.url} in C{setUp}.
    """

    url: str

    async def open(self, tables=TABLES, url: Optional[str] = None) -> Store:
        store = await open_store(url or self.url, reactor, tables=tables)
        self.addCleanup(store.close)
        return store

    async def test_interfaces(self) -> None:
        """The store and its shelves provide IStore and IShelf."""
        store = await self.open()
        self.assertTrue(verifyObject(IStore, store))
        shelf = store.shelf("policies")
        self.assertTrue(verifyObject(IShelf, shelf))
        self.assertEqual(shelf.name, "policies")
        self.assertIs(store.shelf("policies"), shelf)
        self.assertEqual(store.tables, TABLES)

    async def test_get_missing(self) -> None:
        """get of an absent key fires with None."""
        shelf = (await self.open()).shelf("policies")
        self.assertIsNone(await shelf.get("nowhere.example"))

    async def test_round_trip(self) -> None:
        """Unicode keys and every JSON type come back exactly, key order too."""
        shelf = (await self.open()).shelf("policies")
        self.assertIsNone(await shelf.put("bücher.example", RICH))
        got = await shelf.get("bücher.example")
        self.assertEqual(got, RICH)
        self.assertEqual(list(got), list(RICH))
        self.assertEqual(math.copysign(1, got["alpha"][5]), -1.0)
        self.assertIsNone(await shelf.get("xn--bcher-kva.example"))

    async def test_put_replaces(self) -> None:
        """put replaces the whole value."""
        shelf = (await self.open()).shelf("policies")
        await shelf.put("a.example", {"mode": "testing", "old": 1})
        await shelf.put("a.example", {"mode": "enforce"})
        self.assertEqual(await shelf.get("a.example"), {"mode": "enforce"})
        self.assertEqual(len(await shelf.items()), 1)

    async def test_delete(self) -> None:
        """delete says whether the key was there, and removes it."""
        shelf = (await self.open()).shelf("policies")
        await shelf.put("a.example", {"x": 1})
        await shelf.put("b.example", {"x": 2})
        self.assertIs(await shelf.delete("a.example"), True)
        self.assertIs(await shelf.delete("a.example"), False)
        self.assertIsNone(await shelf.get("a.example"))
        self.assertEqual(await shelf.get("b.example"), {"x": 2})

    async def test_items(self) -> None:
        """items lists every pair in code point order of the keys."""
        shelf = (await self.open()).shelf("policies")
        self.assertEqual(await shelf.items(), [])
        keys = ["ä.example", "b.example", "Z.example", "a.example", "日本.example", "ab"]
        for i, key in enumerate(keys):
            await shelf.put(key, {"i": i})
        items = await shelf.items()
        self.assertEqual([k for k, _ in items], sorted(keys))
        self.assertEqual(dict(items), {k: {"i": i} for i, k in enumerate(keys)})

    async def test_items_paged(self) -> None:
        """items(after, limit) pages through the table in the same code point order."""
        shelf = (await self.open()).shelf("policies")
        keys = ["ä.example", "b.example", "Z.example", "a.example", "日本.example", "ab", "bücher.example"]
        for i, key in enumerate(keys):
            await shelf.put(key, {"i": i})
        seen: list[str] = []
        after = None
        while True:
            page = await shelf.items(after=after, limit=3)
            self.assertLessEqual(len(page), 3)
            seen += [k for k, _ in page]
            if len(page) < 3:
                break
            after = page[-1][0]
        self.assertEqual(seen, sorted(keys))
        self.assertEqual(await shelf.items(after="b.example"), [(k, {"i": keys.index(k)})
                                                                for k in sorted(keys) if k > "b.example"])
        self.assertEqual(await shelf.items(limit=0), [])

    async def test_update_creates(self) -> None:
        """update of an absent key passes None and stores the result."""
        shelf = (await self.open()).shelf("policies")
        seen = []

        def function(old):
            seen.append(old)
            return {"created": True}

        self.assertEqual(await shelf.update("new.example", function), {"created": True})
        self.assertEqual(seen, [None])
        self.assertEqual(await shelf.get("new.example"), {"created": True})

    async def test_update_modifies(self) -> None:
        """update passes the stored value (a copy it may change)."""
        shelf = (await self.open()).shelf("policies")
        await shelf.put("a.example", {"n": 41, "keep": "me"})

        def function(old):
            old["n"] += 1
            return old

        self.assertEqual(await shelf.update("a.example", function), {"n": 42, "keep": "me"})
        self.assertEqual(await shelf.get("a.example"), {"n": 42, "keep": "me"})

    async def test_update_deletes(self) -> None:
        """update returning None deletes the key, or leaves it absent."""
        shelf = (await self.open()).shelf("policies")
        await shelf.put("a.example", {"n": 1})
        self.assertIsNone(await shelf.update("a.example", lambda old: None))
        self.assertIsNone(await shelf.get("a.example"))
        self.assertIsNone(await shelf.update("b.example", lambda old: None))
        self.assertEqual(await shelf.items(), [])

    async def test_update_function_fails(self) -> None:
        """If the function raises, nothing changes and update fails with it."""
        shelf = (await self.open()).shelf("policies")
        await shelf.put("a.example", {"n": 1})

        def function(old):
            raise ZeroDivisionError("boom")

        with self.assertRaises(ZeroDivisionError):
            await shelf.update("a.example", function)
        with self.assertRaises(ZeroDivisionError):
            await shelf.update("b.example", function)
        with self.assertRaises(TypeError):
            await shelf.update("a.example", lambda old: ["not", "a", "dict"])
        self.assertEqual(await shelf.items(), [("a.example", {"n": 1})])
        # The connection is still usable after the rollbacks.
        self.assertEqual(await shelf.update("a.example", increment), {"n": 2})

    async def test_concurrent_updates(self) -> None:
        """50 concurrent increments count to exactly 50."""
        shelf = (await self.open()).shelf("policies")
        results = await defer.gatherResults(
            [shelf.update("counter", increment) for _ in range(50)]
        )
        self.assertEqual(sorted(r["n"] for r in results), list(range(1, 51)))
        self.assertEqual(await shelf.get("counter"), {"n": 50})

    async def test_concurrent_toggles(self) -> None:
        """Concurrent create/delete updates of one key strictly alternate."""
        shelf = (await self.open()).shelf("policies")
        results = await defer.gatherResults(
            [shelf.update("flip", toggle) for _ in range(30)]
        )
        self.assertEqual(results.count(None), 15)
        self.assertIsNone(await shelf.get("flip"))

    async def test_tables_independent(self) -> None:
        """Each shelf is its own table."""
        store = await self.open()
        policies, results = store.shelf("policies"), store.shelf("results")
        await policies.put("k", {"table": "policies"})
        await results.put("k", {"table": "results"})
        await results.put("only-results", {})
        self.assertEqual(await policies.items(), [("k", {"table": "policies"})])
        self.assertEqual(await results.get("k"), {"table": "results"})
        self.assertIs(await policies.delete("only-results"), False)
        self.assertEqual(len(await results.items()), 2)

    async def test_unknown_shelf(self) -> None:
        """shelf() of a table not opened is a KeyError naming it."""
        store = await self.open()
        error = self.assertRaises(KeyError, store.shelf, "nope")
        self.assertIn("nope", str(error))

    async def test_bad_keys_and_values(self) -> None:
        """Values that JSON would change, and non-str keys, are refused."""
        shelf = (await self.open()).shelf("policies")
        for value in (
            ["not a dict"],
            {"t": (1, 2)},
            {1: "int key"},
            {"nan": float("nan")},
            {"inf": float("inf")},
            {"obj": object()},
        ):
            with self.assertRaises((TypeError, ValueError), msg=repr(value)):
                await shelf.put("k", value)
        for key in (b"bytes", 1, None):
            with self.assertRaises(TypeError):
                await shelf.get(key)
        for key in ("nul\x00", "\ud800"):
            with self.assertRaises(ValueError):
                await shelf.put(key, {})
        self.assertEqual(await shelf.items(), [])

    async def test_bad_table_names(self) -> None:
        """Table names are plain lower-case identifiers, not reserved ones."""
        for tables in (("Policies",), ("a-b",), ("schema_version",), ("x; DROP",)):
            with self.assertRaises(ValueError):
                await self.open(tables=tables)

    async def test_closed(self) -> None:
        """After close, operations fail with StoreError; close twice is fine."""
        store = await self.open()
        shelf = store.shelf("policies")
        await store.close()
        with self.assertRaises(StoreError) as caught:
            await shelf.get("a")
        self.assertEqual(caught.exception.reason, "store-closed")
        self.assertIsNone(await store.close())


class _DatabaseStoreTestsMixin(_StoreTestsMixin):
    """
    The behaviour of a database store on top: persistence and the schema.
    Subclasses also implement C{where()} (how messages name the database)
    and C{snapshot()} (the database's bytes or contents, to show a refused
    database was left untouched).
    """

    async def snapshot(self) -> Any:
        raise NotImplementedError()

    async def test_reopen_persists(self) -> None:
        """Data survives closing; reopening with another table adds it."""
        store = await self.open(tables=("policies",))
        await store.shelf("policies").put("bücher.example", RICH)
        await store.close()
        again = await self.open(tables=("policies", "tlsrpt_results"))
        self.assertEqual(await again.shelf("policies").get("bücher.example"), RICH)
        await again.shelf("tlsrpt_results").put("r", {"ok": True})
        await again.close()
        third = await self.open(tables=("tlsrpt_results",))
        self.assertEqual(await third.shelf("tlsrpt_results").items(), [("r", {"ok": True})])

    async def test_schema_version_recorded(self) -> None:
        """A new store records SCHEMA_VERSION and registers its shelves."""
        store = await self.open()
        rows = await store._pool.runQuery("SELECT MAX(version) FROM schema_version")
        self.assertEqual(rows[0][0], SCHEMA_VERSION)
        rows = await store._pool.runQuery("SELECT name FROM shelves")
        self.assertEqual(sorted(r[0] for r in rows), sorted(TABLES))

    async def test_newer_schema_refused(self) -> None:
        """A database of a newer schema is refused and left untouched."""
        store = await self.open()
        await store.shelf("policies").put("a.example", {"n": 1})
        await store._pool.runOperation(
            "INSERT INTO schema_version (version, applied) VALUES (99, 'future')"
        )
        await store.close()
        before = await self.snapshot()
        with self.assertRaises(StoreError) as caught:
            await self.open()
        error = caught.exception
        self.assertIsInstance(error, MTASTSError)
        self.assertEqual(error.reason, "schema-too-new")
        self.assertIn("99", str(error))
        self.assertIn("upgrade mtasts-twisted", str(error))
        self.assertIn(self.where(), str(error))
        self.assertEqual(await self.snapshot(), before)

    async def test_close_waits(self) -> None:
        """close waits for running operations, which complete."""
        store = await self.open()
        shelf = store.shelf("policies")
        puts = [shelf.put(f"k{i}", {"i": i}) for i in range(20)]
        closing = store.close()
        await defer.gatherResults(puts)
        await closing
        again = await self.open()
        self.assertEqual(len(await again.shelf("policies").items()), 20)


class MemoryStoreTests(_StoreTestsMixin, TestCase):
    """The store behaviour of the shipped MemoryStore (URL C{memory:})."""

    def setUp(self) -> None:
        self.url = "memory:"


class MemoryStoreFixtureTests(SynchronousTestCase):
    """MemoryStore made directly, as unit tests of higher layers make it."""

    def test_one_implementation(self) -> None:
        """mtasts_twisted.testing.memory ships the store's MemoryStore itself."""
        from mtasts_twisted.testing import memory

        self.assertIs(memory.MemoryStore, MemoryStore)
        self.assertIs(memory.MemoryShelf, MemoryShelf)

    def test_shelves_on_demand(self) -> None:
        """Without tables, any shelf is made on first use, once."""
        store = MemoryStore()
        self.assertTrue(verifyObject(IStore, store))
        shelf = store.shelf("anything")
        self.assertTrue(verifyObject(IShelf, shelf))
        self.assertIs(store.shelf("anything"), shelf)
        self.assertEqual(store.tables, ("anything",))

    def test_fixed_tables(self) -> None:
        """With tables, other shelves are a KeyError, as in a database store."""
        store = MemoryStore(("policies",))
        self.assertEqual(store.tables, ("policies",))
        self.assertRaises(KeyError, store.shelf, "results")

    def test_fires_at_once(self) -> None:
        """Every operation has fired when it returns; failures fail, not raise."""
        shelf = MemoryStore().shelf("policies")
        self.assertIsNone(self.successResultOf(shelf.put("a", {"n": 1})))
        self.assertEqual(self.successResultOf(shelf.update("a", increment)), {"n": 2})
        self.failureResultOf(shelf.put("b", {"t": (1, 2)}), TypeError)
        self.failureResultOf(shelf.update("a", lambda old: 1 / 0), ZeroDivisionError)
        self.assertEqual(self.successResultOf(shelf.items()), [("a", {"n": 2})])


class SQLiteStoreTests(_DatabaseStoreTestsMixin, TestCase):
    """The store behaviour on an SQLite file."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.path = os.path.join(self.directory, "mtasts.sqlite")
        self.url = default_database_url(self.directory)

    def where(self) -> str:
        return self.path

    async def snapshot(self) -> Any:
        with open(self.path, "rb") as f:
            return f.read(), sorted(os.listdir(self.directory))


class PostgreSQLStoreTests(_DatabaseStoreTestsMixin, TestCase):
    """The store behaviour on a real PostgreSQL server."""

    def setUp(self) -> None:
        self.url = postgres.require_server().create_database()

    def where(self) -> str:
        return self.url

    async def snapshot(self) -> Any:
        import psycopg2

        conn = psycopg2.connect(self.url)
        try:
            with conn.cursor() as cursor:
                cursor.execute(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema() ORDER BY 1"
                )
                tables = cursor.fetchall()
                cursor.execute("SELECT version, applied FROM schema_version ORDER BY 1")
                versions = cursor.fetchall()
                cursor.execute("SELECT key, value FROM policies ORDER BY 1")
                return tables, versions, cursor.fetchall()
        finally:
            conn.close()


def _make_store_file(path: str, rows: int = 300) -> None:
    """Write a store with C{rows} rows synchronously (for bad-file tests)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied TEXT)")
    conn.execute("INSERT INTO schema_version VALUES (1, 'test')")
    conn.execute("CREATE TABLE shelves (name TEXT PRIMARY KEY)")
    conn.execute("INSERT INTO shelves VALUES ('policies')")
    conn.execute("CREATE TABLE policies (key TEXT PRIMARY KEY, value TEXT)")
    for i in range(rows):
        value = json.dumps({"p": "x" * 200})
        conn.execute("INSERT INTO policies VALUES (?, ?)", (f"d{i}.example", value))
    conn.close()


# Opens each URL given on the command line and prints one JSON line per URL.
_OPEN_CHILD = """
import json, sys
from twisted.internet import defer, task
from mtasts_twisted.store import StoreError, open_store

async def main(reactor):
    for url in sys.argv[1:]:
        try:
            store = await open_store(url, reactor, tables=("policies",))
        except StoreError as e:
            print(json.dumps({"reason": e.reason, "message": str(e)}), flush=True)
        else:
            await store.close()
            print(json.dumps({"reason": None}), flush=True)

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
"""

# Increments counter "hits" N times, after printing "ready".
_COUNTER_CHILD = """
import sys
from twisted.internet import defer, task
from mtasts_twisted.store import open_store

def increment(old):
    return {"n": (old or {"n": 0})["n"] + 1}

async def main(reactor, url, n):
    store = await open_store(url, reactor, tables=("counters",))
    try:
        shelf = store.shelf("counters")
        print("ready", flush=True)
        for _ in range(int(n)):
            await shelf.update("hits", increment)
    finally:
        await store.close()
    print("done", flush=True)

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, *sys.argv[1:])))
"""


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[int] = Deferred()
        self.output = b""
        self.errors = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready\n" in self.output and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def processEnded(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.errors.decode(errors="replace")))
        self.ended.callback(reason.value.exitCode)


_DROP_CAPS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def _unprivileged_prefix() -> list[str]:
    """
    The command prefix making file permissions apply in a child: none for a
    normal user; for root, drop the capabilities that override them.
    """
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        raise pyunit.SkipTest("running as root without setpriv: permissions do not apply")
    probe = subprocess.run(_DROP_CAPS + ["true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        raise pyunit.SkipTest(f"cannot drop root's capabilities: {probe.stderr!r}")
    return _DROP_CAPS


class SQLiteFileTests(TestCase):
    """SQLite specifics: URLs, pragmas, bad files, several processes."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.path = os.path.join(self.directory, "mtasts.sqlite")
        self.url = "sqlite:" + self.path

    async def open(self, url: Optional[str] = None, tables=("policies",)) -> Store:
        store = await open_store(url or self.url, reactor, tables=tables)
        self.addCleanup(store.close)
        return store

    def test_default_database_url(self) -> None:
        """The default database is mtasts.sqlite in the data directory."""
        self.assertEqual(
            default_database_url("/var/lib/mtasts"), "sqlite:/var/lib/mtasts/mtasts.sqlite"
        )

    async def test_url_forms(self) -> None:
        """sqlite:///abs/path is an absolute path; other forms are refused clearly."""
        store = await self.open("sqlite://" + self.path)
        self.assertEqual(store.url, "sqlite://" + self.path)
        await store.shelf("policies").put("a", {})
        self.assertTrue(os.path.isfile(self.path))
        bad = ("sqlite:", "sqlite://host/x.db", "sqlite::memory:", "mysql://u@h/db", "nonsense")
        for url in bad:
            with self.assertRaises(StoreError, msg=url) as caught:
                await self.open(url)
            self.assertEqual(caught.exception.reason, "bad-database-url")

    async def test_creates_directory(self) -> None:
        """A missing data directory is created, private to the user."""
        path = os.path.join(self.directory, "a", "b", "mtasts.sqlite")
        await self.open("sqlite:" + path)
        self.assertEqual(os.stat(os.path.dirname(path)).st_mode & 0o777, 0o700)

    async def test_pragmas(self) -> None:
        """The connection uses WAL, NORMAL sync and a busy timeout."""
        store = await self.open()
        (mode,), = await store._pool.runQuery("PRAGMA journal_mode")
        (timeout,), = await store._pool.runQuery("PRAGMA busy_timeout")
        (sync,), = await store._pool.runQuery("PRAGMA synchronous")
        self.assertEqual((mode, timeout, sync), ("wal", 5000, 1))
        self.assertEqual((store._pool.min, store._pool.max), (1, 1))

    async def assertRefused(self, reason: str, *expected_in_message: str) -> StoreError:
        """Opening fails with C{reason}, and the file and directory are unchanged."""
        with open(self.path, "rb") as f:
            before = f.read()
        listing = sorted(os.listdir(self.directory))
        with self.assertRaises(StoreError) as caught:
            await self.open()
        error = caught.exception
        self.assertEqual(error.reason, reason, str(error))
        for text in (self.path,) + expected_in_message:
            self.assertIn(text, str(error))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(sorted(os.listdir(self.directory)), listing)
        return error

    async def test_text_file(self) -> None:
        """A text file is refused as not a database, untouched."""
        os.makedirs(self.directory)
        with open(self.path, "w") as f:
            f.write("this is my shopping list\n" * 40)
        await self.assertRefused("not-a-database", "move it away")

    async def test_random_bytes(self) -> None:
        """A file of random-looking bytes is refused, untouched."""
        os.makedirs(self.directory)
        with open(self.path, "wb") as f:
            f.write(bytes(range(256)) * 64)
        await self.assertRefused("not-a-database")

    async def test_short_file(self) -> None:
        """A file shorter than the SQLite header is refused, untouched."""
        os.makedirs(self.directory)
        with open(self.path, "wb") as f:
            f.write(b"SQLite")
        await self.assertRefused("not-a-database")

    async def test_corrupt_database(self) -> None:
        """An SQLite file with damaged pages is refused (quick_check), untouched."""
        _make_store_file(self.path)
        with open(self.path, "r+b") as f:
            f.seek(4096 * 3)
            f.write(b"\xa5" * 4096 * 2)
        error = await self.assertRefused("database-corrupt", "backup")
        self.assertIn("corrupt", str(error))

    async def test_damaged_first_page(self) -> None:
        """An SQLite file whose schema page is damaged is refused, untouched."""
        _make_store_file(self.path)
        with open(self.path, "r+b") as f:
            f.seek(100)
            f.write(b"\x5a" * 3000)
        await self.assertRefused("database-corrupt")

    async def test_foreign_database(self) -> None:
        """Another program's SQLite database is refused, untouched."""
        os.makedirs(self.directory)
        conn = sqlite3.connect(self.path)
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()
        conn.close()
        await self.assertRefused("not-an-mtasts-database", "users")

    async def test_valid_file_accepted(self) -> None:
        """A store file written elsewhere opens with its data."""
        _make_store_file(self.path, rows=3)
        store = await self.open()
        self.assertEqual(len(await store.shelf("policies").items()), 3)

    async def test_unwritable_locations(self) -> None:
        """
        A read-only file, a read-only directory (with or without a file) and
        an uncreatable directory are refused clearly, and nothing is changed.
        """
        prefix = _unprivileged_prefix()
        ro_file = os.path.join(self.directory, "ro-file", "mtasts.sqlite")
        ro_dir = os.path.join(self.directory, "ro-dir", "mtasts.sqlite")
        ro_dir_new = os.path.join(self.directory, "ro-dir-new", "mtasts.sqlite")
        uncreatable = os.path.join(self.directory, "ro-parent", "data", "mtasts.sqlite")
        _make_store_file(ro_file, rows=3)
        _make_store_file(ro_dir, rows=3)
        os.makedirs(os.path.dirname(ro_dir_new))
        os.makedirs(os.path.dirname(os.path.dirname(uncreatable)))
        locked = [
            (ro_file, 0o400),
            (os.path.dirname(ro_dir), 0o500),
            (os.path.dirname(ro_dir_new), 0o500),
            (os.path.dirname(os.path.dirname(uncreatable)), 0o500),
        ]
        for path, mode in locked:
            os.chmod(path, mode)
            self.addCleanup(os.chmod, path, 0o700)

        def state():
            out = {}
            for root, dirs, files in os.walk(self.directory):
                for name in files:
                    with open(os.path.join(root, name), "rb") as f:
                        out[os.path.join(root, name)] = f.read()
                for name in dirs:
                    out[os.path.join(root, name)] = None
            return out

        before = state()
        paths = [ro_file, ro_dir, ro_dir_new, uncreatable]
        executable, *args = prefix + [sys.executable, "-c", _OPEN_CHILD] + [
            "sqlite:" + p for p in paths
        ]
        out, err, code = await utils.getProcessOutputAndValue(
            shutil.which(executable) or executable, args, env=_child_env(), reactor=reactor
        )
        self.assertEqual(code, 0, err)
        results = [json.loads(line) for line in out.decode().splitlines()]
        self.assertEqual(len(results), 4, err)
        for path, result in zip(paths, results):
            self.assertEqual(result["reason"], "database-read-only", (path, result))
            self.assertIn(path, result["message"])
            self.assertIn("writable", result["message"])
        self.assertIn("uid", results[0]["message"])
        self.assertIn(os.path.dirname(ro_dir), results[1]["message"])
        self.assertEqual(state(), before)

    async def test_two_processes(self) -> None:
        """
        Two processes incrementing one counter in one SQLite file at the same
        time lose no update.
        """
        store = await self.open(tables=("counters",))
        shelf = store.shelf("counters")
        child = _ChildProtocol()
        child_count = 150
        def reap() -> Deferred[int]:
            if not child.ended.called:
                transport.signalProcess("KILL")
            return child.ended

        transport = reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-c", _COUNTER_CHILD, self.url, str(child_count)],
            env=_child_env(),
        )
        self.addCleanup(reap)
        await child.ready.addTimeout(60, reactor)
        mine = 0
        # Keep incrementing while the child does, so the two contend.
        while not child.ended.called or mine < 20:
            await shelf.update("hits", increment)
            mine += 1
        code = await child.ended.addTimeout(60, reactor)
        self.assertEqual(code, 0, child.errors.decode(errors="replace"))
        self.assertIn(b"done", child.output)
        self.assertEqual(await shelf.get("hits"), {"n": child_count + mine})


class PostgreSQLNodeTests(TestCase):
    """PostgreSQL specifics: several nodes sharing one database."""

    def setUp(self) -> None:
        self.server = postgres.require_server()
        self.url = self.server.create_database()

    async def open(self, url: Optional[str] = None) -> Store:
        store = await open_store(url or self.url, reactor, tables=("policies",), pool_size=3)
        self.addCleanup(store.close)
        return store

    async def test_two_nodes(self) -> None:
        """Two pools updating one fresh key concurrently lose nothing."""
        nodes = [await self.open(), await self.open()]
        shelves = [node.shelf("policies") for node in nodes]
        self.assertEqual(nodes[0]._pool.max, 3)
        results = await defer.gatherResults(
            [shelves[i % 2].update("counter", increment) for i in range(60)]
        )
        self.assertEqual(sorted(r["n"] for r in results), list(range(1, 61)))
        self.assertEqual(await shelves[1].get("counter"), {"n": 60})

    async def test_two_nodes_toggle(self) -> None:
        """Create/delete races on an absent key between nodes strictly alternate."""
        nodes = [await self.open(), await self.open()]
        shelves = [node.shelf("policies") for node in nodes]
        results = await defer.gatherResults(
            [shelves[i % 2].update("flip", toggle) for i in range(40)]
        )
        self.assertEqual(results.count(None), 20)
        self.assertEqual(await shelves[0].items(), [])

    async def test_nodes_open_at_once(self) -> None:
        """Several nodes creating the schema at the same time all succeed."""
        stores = await defer.gatherResults(
            [Deferred.fromCoroutine(self.open()) for _ in range(4)]
        )
        await stores[0].shelf("policies").put("a", {"x": 1})
        self.assertEqual(await stores[3].shelf("policies").get("a"), {"x": 1})

    async def test_password_not_shown(self) -> None:
        """The store's URL and errors do not contain the password."""
        url = self.url.replace("postgres@", "postgres:s3cret@") + "?password=s3cret"
        store = await self.open(url)
        self.assertNotIn("s3cret", store.url)
        self.assertIn("127.0.0.1", store.url)

    async def test_unreachable(self) -> None:
        """A server that is not there fails with a clear StoreError."""
        url = f"postgresql://postgres:s3cret@127.0.0.1:{postgres._free_port()}/nothing"
        with self.assertRaises(StoreError) as caught:
            await self.open(url)
        self.assertEqual(caught.exception.reason, "database-unavailable")
        self.assertIn("127.0.0.1", str(caught.exception))
        self.assertNotIn("s3cret", str(caught.exception))


class RedactTests(SynchronousTestCase):
    """Passwords never appear in a store's URL."""

    def test_redact(self) -> None:
        self.assertEqual(
            _redact("postgresql://u:p%40ss@h:5432/db?sslmode=require&password=x"),
            "postgresql://u@h:5432/db?sslmode=require",
        )
        self.assertEqual(_redact("postgresql://h/db"), "postgresql://h/db")


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


class EncodingTests(SynchronousTestCase):
    """The JSON text stored is an exact image of the value."""

    @settings(max_examples=100, deadline=None)
    @given(st.dictionaries(st.text(), _json, max_size=5))
    def test_round_trip(self, value) -> None:
        text = _encode(value)
        self.assertTrue(text.isascii())
        self.assertEqual(_decode(text), value)
        self.assertEqual(list(_decode(text)), list(value))


class PostgresFixtureTests(SynchronousTestCase):
    """The shipped PostgreSQL test helper skips, or fails under CI."""

    def test_available_shape(self) -> None:
        available, reason = postgres.postgres_available()
        self.assertIsInstance(available, bool)
        self.assertEqual(available, not reason)

    def test_missing_skips(self) -> None:
        self.patch(postgres, "postgres_available", lambda: (False, "no initdb here"))
        error = self.assertRaises(pyunit.SkipTest, postgres.require_server, {})
        self.assertIn("no initdb here", str(error))

    def test_missing_fails_under_ci(self) -> None:
        self.patch(postgres, "postgres_available", lambda: (False, "no initdb here"))
        error = self.assertRaises(RuntimeError, postgres.require_server, {"CI": "true"})
        self.assertIn("no initdb here", str(error))
        self.assertIn("CI=true", str(error))

    def test_no_binaries(self) -> None:
        self.patch(postgres.glob, "glob", lambda pattern: [])
        self.patch(postgres.shutil, "which", lambda name: None)
        self.assertIsNone(postgres.find_bin_dir())
        available, reason = postgres.postgres_available()
        self.assertFalse(available)
        self.assertIn("apt-get install postgresql", reason)
