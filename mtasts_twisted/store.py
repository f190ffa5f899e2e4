"""
Shelve on adbapi: a persistent async mapping over L{adbapi.ConnectionPool}.

A L{Store} is one database (SQLite file or PostgreSQL database) holding named
tables; each table is a L{Shelf}: an async mapping of string keys (unicode
domain names and the like) to JSON-serialisable dicts, stored as JSON text
(never pickle).  Every operation returns a L{Deferred}; the SQL runs in the
pool's threads.

Backends, chosen by the database URL (L{open_store}):

  - C{sqlite:PATH} or C{sqlite:///abs/path}: one connection (one writer), WAL
    journal, a busy timeout, C{BEGIN IMMEDIATE} around every read-modify-write
    so several processes may share one file without losing updates.  A file
    that is not an SQLite database, is corrupt, is not writable, or was
    written by a newer version is refused with a L{StoreError} naming the file
    and what to do; it is never recreated, migrated or wiped.
  - C{postgresql://user:pass@host:port/db} (psycopg2): a few connections,
    C{SELECT ... FOR UPDATE} around every read-modify-write so several relay
    nodes may share one database.

Schema: every shelf table has the same layout (C{key TEXT PRIMARY KEY, value
TEXT}).  C{schema_version} records the applied L{MIGRATIONS}; C{shelves}
lists the shelf tables so a later migration can change all of them.  To
change the layout, append a L{Migration} that alters every registered shelf
and change L{_create_shelf} to create the new layout directly.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import re
import sqlite3
import urllib.parse
from types import ModuleType
from typing import Any, Callable, Iterable, Optional, Sequence

import attrs
from twisted.enterprise import adbapi
from twisted.internet import threads
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtasts_twisted import __version__
from mtasts_twisted.interfaces import IShelf, IStore
from mtasts_twisted.policy import MTASTSError

__all__ = [
    "BUSY_TIMEOUT_MS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "MemoryShelf",
    "MemoryStore",
    "Migration",
    "Shelf",
    "Store",
    "StoreError",
    "default_database_url",
    "open_store",
]

log = Logger()

#: How long an SQLite connection waits for another process's write lock.
BUSY_TIMEOUT_MS = 5000

_SQLITE_MAGIC = b"SQLite format 3\x00"
_TABLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}\Z")
_INTERNAL_TABLES = frozenset({"schema_version", "shelves"})
# pg_advisory_xact_lock key serialising migrations across nodes ("mtasts").
_MIGRATION_LOCK = 0x6D7461737473
# Retries of the insert-placeholder / lock loop when a row vanishes meanwhile.
_LOCK_ATTEMPTS = 20

JSONDict = dict[str, Any]
UpdateFunction = Callable[[Optional[JSONDict]], Optional[JSONDict]]


class StoreError(MTASTSError):
    """
    The store cannot be opened or used.

    The message names the file or database and says what to do.  C{reason}
    is one of C{not-a-database}, C{database-corrupt}, C{database-read-only},
    C{schema-too-new}, C{not-an-mtasts-database}, C{database-locked},
    C{database-unavailable}, C{bad-database-url}, C{store-closed} or
    C{store-error}.
    """

    reason = "store-error"


# ---------------------------------------------------------------- migrations


@attrs.frozen
class Migration:
    """
    One forward step of the schema.

    @ivar version: the schema version after this step (1, 2, ...).
    @ivar description: what it does, for the log.
    @ivar apply: C{apply(txn, dialect, shelves)} runs the step's SQL inside the
        migration transaction; C{shelves} are the shelf tables registered so
        far (so a step can alter each of them).
    """

    version: int
    description: str
    apply: Callable[[Any, "_Dialect", Sequence[str]], None]


def _migration_1(txn: Any, dialect: "_Dialect", shelves: Sequence[str]) -> None:
    txn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version"
        " (version INTEGER PRIMARY KEY, applied TEXT NOT NULL)"
    )
    txn.execute("CREATE TABLE IF NOT EXISTS shelves (name TEXT PRIMARY KEY)")


#: Every schema step, in order.  Only ever append.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "schema_version and shelves registry", _migration_1),
)

#: The newest schema version this code knows.
SCHEMA_VERSION: int = MIGRATIONS[-1].version


def _create_shelf(txn: Any, dialect: "_Dialect", name: str) -> None:
    """Create shelf table C{name} with the current (L{SCHEMA_VERSION}) layout."""
    txn.execute(
        f'CREATE TABLE IF NOT EXISTS "{name}" (key TEXT PRIMARY KEY, value TEXT)'
    )


# ------------------------------------------------------------------ dialects


class _Dialect:
    """What differs between database engines."""

    dbapi: ModuleType
    url: str
    #: Appended to a key comparison so that SQL orders keys by code point,
    #: as Python does (SQLite's default BINARY collation already does).
    binary_collation = ""

    def where(self) -> str:
        """Name the database for messages: a file path or a URL."""
        raise NotImplementedError()

    def sql(self, statement: str) -> str:
        """Turn C{?} placeholders into this driver's."""
        return statement

    def make_pool(self, reactor: Any, pool_size: int) -> adbapi.ConnectionPool:
        """Make the (not yet used) connection pool."""
        raise NotImplementedError()

    def prepare(self) -> None:
        """Check the location before the first connection (in a pool thread)."""

    def begin_write(self, txn: Any) -> None:
        """Start a transaction that will write (in a pool thread)."""

    def commit(self, txn: Any) -> None:
        """Commit what L{begin_write} started (in a pool thread)."""

    def lock_migrations(self, txn: Any) -> None:
        """Serialise migrations with other processes (in a pool thread)."""
        self.begin_write(txn)

    def table_names(self, txn: Any) -> set[str]:
        """Names of the existing tables (in a pool thread)."""
        raise NotImplementedError()

    def lock_key(self, txn: Any, table: str, key: str) -> Optional[str]:
        """
        Lock C{key} of C{table} until commit, even if absent, and return its
        JSON text or L{None} (in a pool thread, after L{begin_write}).
        """
        raise NotImplementedError()

    def translate(self, error: BaseException) -> StoreError:
        """Turn a driver error into a L{StoreError} that says what to do."""
        raise NotImplementedError()


class _SQLite(_Dialect):
    dbapi = sqlite3

    def __init__(self, url: str, path: str) -> None:
        self.url = url
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)

    def where(self) -> str:
        return self.path

    def make_pool(self, reactor: Any, pool_size: int) -> adbapi.ConnectionPool:
        # One connection: SQLite has one writer anyway, and one connection
        # per process keeps in-process updates strictly ordered.
        return adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
            # Autocommit; transactions are explicit (BEGIN IMMEDIATE).
            isolation_level=None,
            cp_min=1,
            cp_max=1,
            cp_openfun=self._on_connect,
            cp_reactor=reactor,
            cp_noisy=False,
        )

    def _error(self, what: str, reason: str) -> StoreError:
        return StoreError(f"{self.path}: {what}", reason=reason)

    def _unwritable(self, what: str) -> StoreError:
        return self._error(
            f"{what} (running as uid {os.geteuid()}). It was left untouched:"
            " make the file and its directory writable by this user, or"
            " choose another --data-dir or --database.",
            "database-read-only",
        )

    def prepare(self) -> None:
        if not os.path.isdir(self.directory):
            if os.path.lexists(self.directory):
                raise self._error(
                    f"{self.directory} is not a directory: choose another"
                    " --data-dir or --database.",
                    "database-read-only",
                )
            try:
                os.makedirs(self.directory, mode=0o700)
            except OSError as e:
                raise self._unwritable(
                    f"cannot create the directory {self.directory}: {e.strerror}"
                ) from e
            log.info("created directory {directory}", directory=self.directory)
        if os.path.lexists(self.path):
            if not os.path.isfile(self.path):
                raise self._error(
                    "is not a regular file, so not an SQLite database: move it"
                    " away or choose another --database.",
                    "not-a-database",
                )
            try:
                with open(self.path, "rb") as f:
                    head = f.read(len(_SQLITE_MAGIC))
            except OSError as e:
                raise self._unwritable(f"cannot read it: {e.strerror}") from e
            if head and head != _SQLITE_MAGIC:
                raise self._not_a_database(f"it starts with {head!r}")
            if not os.access(self.path, os.R_OK | os.W_OK):
                raise self._unwritable("the file is not writable")
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise self._unwritable(
                f"the directory {self.directory} is not writable, and SQLite"
                " must create its -wal and -shm files there"
            )

    def _not_a_database(self, detail: str) -> StoreError:
        return self._error(
            f"not an SQLite database ({detail}). It was left untouched: move it"
            " away or choose another --data-dir or --database.",
            "not-a-database",
        )

    def _corrupt(self, detail: str) -> StoreError:
        return self._error(
            f"the SQLite database is corrupt ({detail}). It was left untouched:"
            " restore it from a backup, or move it away (with any -wal and -shm"
            " files) to start an empty store.",
            "database-corrupt",
        )

    def _on_connect(self, conn: sqlite3.Connection) -> None:
        # Runs in the pool thread right after connect().  Everything that
        # only reads comes first, so a file we refuse is never written.
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise self._corrupt("; ".join(problems)[:500])
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
            if tables and "schema_version" not in tables:
                raise self._error(
                    "an SQLite database of some other program (it has tables"
                    f" {', '.join(sorted(tables)[:5])} but no schema_version)."
                    " It was left untouched: choose another --data-dir or"
                    " --database.",
                    "not-an-mtasts-database",
                )
            if tables:
                (version,) = conn.execute(
                    "SELECT MAX(version) FROM schema_version"
                ).fetchone()
                _check_version(self, version or 0)
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                log.warn(
                    "{path}: SQLite refused WAL mode (journal_mode={mode})",
                    path=self.path,
                    mode=mode,
                )
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise

    def begin_write(self, txn: Any) -> None:
        # IMMEDIATE takes the write lock now (waiting up to the busy
        # timeout), so a read-modify-write never races another process.
        txn.execute("BEGIN IMMEDIATE")

    def commit(self, txn: Any) -> None:
        txn.execute("COMMIT")

    def table_names(self, txn: Any) -> set[str]:
        txn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in txn.fetchall()}

    def lock_key(self, txn: Any, table: str, key: str) -> Optional[str]:
        # BEGIN IMMEDIATE already locks the whole database.
        txn.execute(f'SELECT value FROM "{table}" WHERE key = ?', (key,))
        row = txn.fetchone()
        return None if row is None else row[0]

    def translate(self, error: BaseException) -> StoreError:
        name = getattr(error, "sqlite_errorname", "") or ""
        if name == "SQLITE_NOTADB":
            return self._not_a_database(str(error))
        if name.startswith("SQLITE_CORRUPT"):
            return self._corrupt(str(error))
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
            return self._unwritable(str(error))
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return self._error(
                f"{error}: another process holds the database (waited up to"
                f" {BUSY_TIMEOUT_MS} ms); try again.",
                "database-locked",
            )
        return self._error(f"SQLite error: {error}", "store-error")


class _PostgreSQL(_Dialect):
    # The "C" collation compares UTF-8 bytes: code point order.
    binary_collation = ' COLLATE "C"'

    def __init__(self, url: str, dsn: str) -> None:
        try:
            import psycopg2
        except ImportError as e:
            raise StoreError(
                f"{url}: PostgreSQL needs psycopg2: install mtasts-twisted[postgresql].",
                reason="bad-database-url",
            ) from e
        self.dbapi = psycopg2
        self.url = url
        self.dsn = dsn

    def where(self) -> str:
        return f"PostgreSQL database {self.url}"

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def make_pool(self, reactor: Any, pool_size: int) -> adbapi.ConnectionPool:
        return adbapi.ConnectionPool(
            "psycopg2",
            self.dsn,
            connect_timeout=10,
            application_name="mtasts-twisted",
            cp_min=1,
            cp_max=pool_size,
            cp_reconnect=True,
            cp_reactor=reactor,
            cp_noisy=False,
        )

    def lock_migrations(self, txn: Any) -> None:
        # Several nodes may start at once: one migrates, the others wait.
        txn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))

    def table_names(self, txn: Any) -> set[str]:
        txn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema()"
        )
        return {row[0] for row in txn.fetchall()}

    def lock_key(self, txn: Any, table: str, key: str) -> Optional[str]:
        # An absent key has no row to lock: insert an uncommitted placeholder
        # (value NULL) first.  A concurrent inserter of the same key waits
        # for our commit; ON CONFLICT DO NOTHING then leaves the committed
        # row, which FOR UPDATE locks (READ COMMITTED: each statement sees
        # the latest commits).  If the row is deleted between the two
        # statements, go round again.
        for _ in range(_LOCK_ATTEMPTS):
            txn.execute(
                f'INSERT INTO "{table}" (key, value) VALUES (%s, NULL)'
                " ON CONFLICT (key) DO NOTHING",
                (key,),
            )
            txn.execute(f'SELECT value FROM "{table}" WHERE key = %s FOR UPDATE', (key,))
            row = txn.fetchone()
            if row is not None:
                return row[0]
        raise StoreError(
            f"{self.where()}: could not lock key {key!r} of {table}: it kept"
            " being deleted; try again.",
            reason="database-locked",
        )

    def translate(self, error: BaseException) -> StoreError:
        if isinstance(error, (self.dbapi.OperationalError, adbapi.ConnectionLost)):
            return StoreError(
                f"{self.where()}: {str(error).strip() or 'connection lost'}."
                " Check that the server is running and reachable and that the"
                " URL, user and password are right.",
                reason="database-unavailable",
            )
        return StoreError(f"{self.where()}: PostgreSQL error: {str(error).strip()}")


def _check_version(dialect: _Dialect, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{dialect.where()}: written by a newer mtasts-twisted (store schema"
            f" version {version}; mtasts-twisted {__version__} knows versions up"
            f" to {SCHEMA_VERSION}). It was left untouched: upgrade"
            " mtasts-twisted (pip install --upgrade mtasts-twisted) to use it,"
            " or choose another --database.",
            reason="schema-too-new",
        )


def _redact(url: str) -> str:
    """Return C{url} without its password (in the netloc or the query)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = userinfo.split(":", 1)[0] + "@" + host
    query = urllib.parse.urlencode(
        [
            (k, v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if k != "password"
        ]
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def _dialect_for(url: str) -> _Dialect:
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        if rest.startswith("//"):
            # sqlite:///abs/path: an empty authority, then the path.
            host, slash, path = rest[2:].partition("/")
            if host or not slash:
                raise StoreError(
                    f"{url}: a sqlite URL is sqlite:PATH or sqlite:///ABSOLUTE/PATH.",
                    reason="bad-database-url",
                )
            path = "/" + path
        else:
            path = rest
        if not path.strip() or path == ":memory:":
            raise StoreError(
                f"{url!r}: no database file: use sqlite:PATH.",
                reason="bad-database-url",
            )
        return _SQLite(url, path)
    if sep and scheme in ("postgresql", "postgres"):
        return _PostgreSQL(_redact(url), url)
    raise StoreError(
        f"{_redact(url)!r} is not a database URL: use sqlite:PATH or"
        " postgresql://USER:PASSWORD@HOST:PORT/DATABASE.",
        reason="bad-database-url",
    )


def default_database_url(data_dir: str) -> str:
    """
    Return the default database URL for a data directory.

    @param data_dir: the directory holding the relay's state.
    @return: C{"sqlite:<data_dir>/mtasts.sqlite"}.
    """
    return "sqlite:" + os.path.join(data_dir, "mtasts.sqlite")


# -------------------------------------------------------------- the store


def _encode(value: Any) -> str:
    if not isinstance(value, dict):
        raise TypeError(f"a stored value must be a dict, not {type(value).__name__}")
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    # Refuse what JSON would silently change (tuples, non-str keys): what
    # get() returns must equal what put() was given.
    if json.loads(text) != value:
        raise TypeError(
            "the value does not survive a JSON round trip (use str keys and"
            f" lists, not tuples): {text[:200]}"
        )
    return text


def _decode(text: Optional[str]) -> Optional[JSONDict]:
    return None if text is None else json.loads(text)


def _check_key(key: Any) -> None:
    if not isinstance(key, str):
        raise TypeError(f"a key must be a str, not {type(key).__name__}")
    if "\x00" in key:
        raise ValueError(f"a key must not contain NUL: {key!r}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"a key must be encodable as UTF-8: {key!r}") from e


async def _open(
    url: str, reactor: Any, tables: Iterable[str], pool_size: int
) -> "Store":
    if url == "memory:":
        return MemoryStore()  # type: ignore[return-value]
    dialect = _dialect_for(url)
    names = tuple(dict.fromkeys(tables))
    for name in names:
        if not isinstance(name, str) or not _TABLE_NAME.match(name):
            raise ValueError(f"a table name must match [a-z][a-z0-9_]*: {name!r}")
        if name in _INTERNAL_TABLES:
            raise ValueError(f"the table name {name!r} is reserved")
    pool = dialect.make_pool(reactor, pool_size)
    store = Store(dialect, pool, names, reactor)
    try:
        await threads.deferToThreadPool(reactor, pool.threadpool, dialect.prepare)
        now = datetime.datetime.fromtimestamp(
            reactor.seconds(), datetime.timezone.utc
        ).isoformat()
        _, applied = await store._run(_migrate, dialect, names, now)
    except BaseException:
        pool.close()
        raise
    for migration in applied:
        log.info(
            "{where}: migrated the store to schema version {version}: {description}",
            where=dialect.where(),
            version=migration.version,
            description=migration.description,
        )
    log.info(
        "opened store {url} (schema version {version}, tables {tables})",
        url=dialect.url,
        version=SCHEMA_VERSION,
        tables=", ".join(names),
    )
    return store


def _migrate(
    txn: Any, dialect: _Dialect, names: Sequence[str], now: str
) -> tuple[int, list[Migration]]:
    dialect.lock_migrations(txn)
    existing = dialect.table_names(txn)
    current = 0
    if "schema_version" in existing:
        txn.execute("SELECT MAX(version) FROM schema_version")
        current = txn.fetchone()[0] or 0
    _check_version(dialect, current)
    shelves: list[str] = []
    if "shelves" in existing:
        txn.execute("SELECT name FROM shelves")
        shelves = sorted(row[0] for row in txn.fetchall())
    applied = []
    for migration in MIGRATIONS:
        if migration.version > current:
            migration.apply(txn, dialect, shelves)
            txn.execute(
                dialect.sql("INSERT INTO schema_version (version, applied) VALUES (?, ?)"),
                (migration.version, now),
            )
            applied.append(migration)
    for name in names:
        if name not in shelves:
            _create_shelf(txn, dialect, name)
            txn.execute(
                dialect.sql("INSERT INTO shelves (name) VALUES (?) ON CONFLICT (name) DO NOTHING"),
                (name,),
            )
    dialect.commit(txn)
    return current, applied


def open_store(
    url: str, reactor: Any, tables: Iterable[str] = ("policies",), pool_size: int = 4
) -> "Deferred[Store]":
    """
    Open (creating or migrating as needed) the store at C{url}.

    @param url: C{sqlite:PATH}, C{sqlite:///ABSOLUTE/PATH},
        C{postgresql://USER:PASSWORD@HOST:PORT/DATABASE} (also C{postgres://})
        or C{memory:} (nothing persists).
    @param reactor: the reactor the connection pool reports to.
    @param tables: the shelf tables to have; missing ones are created.
        Names match C{[a-z][a-z0-9_]*}; C{schema_version} and C{shelves}
        are reserved.
    @param pool_size: the most PostgreSQL connections (SQLite always has one).
    @return: L{Deferred} firing with the open L{Store}, or failing with
        L{StoreError} (bad URL, unusable file or database, newer schema) or
        L{ValueError} (bad table name).
    """
    return Deferred.fromCoroutine(_open(url, reactor, tables, pool_size))


@implementer(IStore)
class Store:
    """
    A database of named L{Shelf} tables; make one with L{open_store}.

    @ivar url: the database URL (without password).
    @ivar tables: the names of the shelves this store was opened with.
    """

    def __init__(
        self,
        dialect: _Dialect,
        pool: adbapi.ConnectionPool,
        tables: Sequence[str],
        reactor: Any,
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

    def __repr__(self) -> str:
        return f"<Store {self.url}>"

    def shelf(self, name: str) -> "Shelf":
        """
        Return the shelf for table C{name}.

        @param name: one of the C{tables} given to L{open_store}.
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
            if failure.check(self._dialect.dbapi.Error, adbapi.ConnectionLost):
                error = self._dialect.translate(failure.value)
                error.__cause__ = failure.value
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

    def __repr__(self) -> str:
        return f"<Shelf {self.name} of {self._store.url}>"

    def get(self, key: str) -> "Deferred[Optional[JSONDict]]":
        """
        Read one value.

        @param key: the key.
        @return: L{Deferred} firing with the stored dict, or L{None}.
        """
        return Deferred.fromCoroutine(self._get(key))

    async def _get(self, key: str) -> Optional[JSONDict]:
        _check_key(key)
        return _decode(await self._store._run(self._select, key))

    def _select(self, txn: Any, key: str) -> Optional[str]:
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
        await self._store._run(self._upsert, key, _encode(value))

    def _upsert(self, txn: Any, key: str, text: str) -> None:
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
        return bool(await self._store._run(self._remove, key))

    def _remove(self, txn: Any, key: str) -> int:
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

    def _select_page(self, txn: Any, after: Optional[str], limit: Optional[int]) -> list[tuple[str, str]]:
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
        return _decode(await self._store._run(self._read_modify_write, key, function))

    def _read_modify_write(
        self, txn: Any, key: str, function: UpdateFunction
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


# --- in memory ----------------------------------------------------------------


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
