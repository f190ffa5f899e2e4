"""
What differs between database engines: one L{_Dialect} each for SQLite
(L{_SQLite}) and PostgreSQL (L{_PostgreSQL}).

A dialect knows its driver's placeholders and its SQL for write locks,
table listings and code point ordering; it makes the connection pool,
checks the location before the first connection, and turns driver errors
into L{StoreError}s that say what to do.

  - SQLite: one connection (one writer), WAL journal, a busy timeout,
    C{BEGIN IMMEDIATE} around every read-modify-write so several processes
    may share one file without losing updates.  A file that is not an SQLite
    database, is corrupt, is not writable, or was written by a newer version
    is refused; it is never recreated, migrated or wiped.
  - PostgreSQL (psycopg2): a few connections, C{SELECT ... FOR UPDATE}
    around every read-modify-write so several relay nodes may share one
    database.
"""

from __future__ import annotations

import os
import sqlite3
from types import ModuleType
from typing import Any, Callable, Optional, Protocol

from twisted.enterprise import adbapi
from twisted.logger import Logger

from mtasts_twisted.store.errors import StoreError
from mtasts_twisted.store.reader import ReactorReader
from mtasts_twisted.store.schema import Cursor, _check_version

__all__ = ["BUSY_TIMEOUT_MS", "StoreReactor"]

# The package is the log namespace, as before the split into modules.
log = Logger(namespace="mtasts_twisted.store")

#: How long an SQLite connection waits for another process's write lock.
BUSY_TIMEOUT_MS = 5000

_SQLITE_MAGIC = b"SQLite format 3\x00"
# pg_advisory_xact_lock key serialising migrations across nodes ("mtasts").
_MIGRATION_LOCK = 0x6D7461737473
# Retries of the insert-placeholder / lock loop when a row vanishes meanwhile.
_LOCK_ATTEMPTS = 20


class StoreReactor(Protocol):
    """
    What a store needs of its reactor: C{IReactorTime} (the time recorded
    with migrations), C{IReactorFromThreads} (results of the pool's threads)
    and the C{IReactorCore} triggers that start and stop the pool.
    """

    def seconds(self) -> float:
        """See C{IReactorTime.seconds}."""

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        """See C{IReactorFromThreads.callFromThread}."""

    def callWhenRunning(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> Any:
        """See C{IReactorCore.callWhenRunning}."""

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> Any:
        """See C{IReactorCore.addSystemEventTrigger}."""

    def removeSystemEventTrigger(self, triggerID: Any) -> None:
        """See C{IReactorCore.removeSystemEventTrigger}."""


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

    def make_pool(self, reactor: StoreReactor, pool_size: int) -> adbapi.ConnectionPool:
        """Make the (not yet used) connection pool."""
        raise NotImplementedError()

    def reactor_reader(self) -> Optional[ReactorReader]:
        """
        A connection for key reads in the reactor thread, once the pool has
        opened the database; L{None} where reads stay in the pool.

        @raise sqlite3.Error: it cannot be opened.
        """
        return None

    def prepare(self) -> None:
        """Check the location before the first connection (in a pool thread)."""

    def begin_write(self, txn: Cursor) -> None:
        """Start a transaction that will write (in a pool thread)."""

    def commit(self, txn: Cursor) -> None:
        """Commit what L{begin_write} started (in a pool thread)."""

    def lock_migrations(self, txn: Cursor) -> None:
        """Serialise migrations with other processes (in a pool thread)."""
        self.begin_write(txn)

    def table_names(self, txn: Cursor) -> set[str]:
        """Names of the existing tables (in a pool thread)."""
        raise NotImplementedError()

    def lock_key(self, txn: Cursor, table: str, key: str) -> Optional[str]:
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

    def reactor_reader(self) -> Optional[ReactorReader]:
        # WAL: a reader never waits for the writer (store/reader).
        return ReactorReader(self.path)

    def make_pool(self, reactor: StoreReactor, pool_size: int) -> adbapi.ConnectionPool:
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

    def begin_write(self, txn: Cursor) -> None:
        # IMMEDIATE takes the write lock now (waiting up to the busy
        # timeout), so a read-modify-write never races another process.
        txn.execute("BEGIN IMMEDIATE")

    def commit(self, txn: Cursor) -> None:
        txn.execute("COMMIT")

    def table_names(self, txn: Cursor) -> set[str]:
        txn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in txn.fetchall()}

    def lock_key(self, txn: Cursor, table: str, key: str) -> Optional[str]:
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

    def make_pool(self, reactor: StoreReactor, pool_size: int) -> adbapi.ConnectionPool:
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

    def lock_migrations(self, txn: Cursor) -> None:
        # Several nodes may start at once: one migrates, the others wait.
        txn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))

    def table_names(self, txn: Cursor) -> set[str]:
        txn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema()"
        )
        return {row[0] for row in txn.fetchall()}

    def lock_key(self, txn: Cursor, table: str, key: str) -> Optional[str]:
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
