"""
The store's schema: its versions, the migrations between them, and the
migration transaction run when a store is opened.

Every shelf table has the same layout (C{key TEXT PRIMARY KEY, value
TEXT}).  C{schema_version} records the applied L{MIGRATIONS}; C{shelves}
lists the shelf tables so a later migration can change all of them.  To
change the layout, append a L{Migration} that alters every registered shelf
and change L{_create_shelf} to create the new layout directly.

The engines differ (L{mtasts_twisted.store.dialects}); this module sees
them only through L{SchemaDialect}, so it needs none of them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Protocol, Sequence

import attrs

from mtasts_twisted import __version__
from mtasts_twisted.store.errors import StoreError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Cursor", "Migration", "SchemaDialect"]

_TABLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}\Z")
_INTERNAL_TABLES = frozenset({"schema_version", "shelves"})


class Cursor(Protocol):
    """
    A DB-API cursor, as L{twisted.enterprise.adbapi.ConnectionPool.runInteraction}
    hands it (an C{adbapi.Transaction}) to the functions run in a pool thread.
    """

    @property
    def rowcount(self) -> int:
        """Rows changed by the last statement."""

    def execute(self, statement: str, parameters: Sequence[Any] = ..., /) -> Any:
        """Run one statement with C{parameters} for its placeholders."""

    def fetchone(self) -> Any:
        """The next row of the last query, or L{None}."""

    def fetchall(self) -> list[Any]:
        """The remaining rows of the last query."""


class SchemaDialect(Protocol):
    """What the migrations need of a database engine (a C{_Dialect})."""

    def where(self) -> str:
        """Name the database for messages: a file path or a URL."""

    def sql(self, statement: str) -> str:
        """Turn C{?} placeholders into this driver's."""

    def lock_migrations(self, txn: Cursor) -> None:
        """Serialise migrations with other processes (in a pool thread)."""

    def table_names(self, txn: Cursor) -> set[str]:
        """Names of the existing tables (in a pool thread)."""

    def commit(self, txn: Cursor) -> None:
        """Commit the migration transaction (in a pool thread)."""


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
    apply: Callable[[Cursor, SchemaDialect, Sequence[str]], None]


def _migration_1(txn: Cursor, dialect: SchemaDialect, shelves: Sequence[str]) -> None:
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


def _create_shelf(txn: Cursor, dialect: SchemaDialect, name: str) -> None:
    """Create shelf table C{name} with the current (L{SCHEMA_VERSION}) layout."""
    txn.execute(
        f'CREATE TABLE IF NOT EXISTS "{name}" (key TEXT PRIMARY KEY, value TEXT)'
    )


def _check_tables(tables: Iterable[str]) -> tuple[str, ...]:
    """
    Return the shelf table names, each once, in order.

    @raise ValueError: a name is not a plain lower-case identifier, or is
        reserved for the schema's own tables.
    """
    names = tuple(dict.fromkeys(tables))
    for name in names:
        if not isinstance(name, str) or not _TABLE_NAME.match(name):
            raise ValueError(f"a table name must match [a-z][a-z0-9_]*: {name!r}")
        if name in _INTERNAL_TABLES:
            raise ValueError(f"the table name {name!r} is reserved")
    return names


def _check_version(dialect: SchemaDialect, version: int) -> None:
    """
    Refuse a database written by a newer version of this code.

    @raise StoreError: C{version} is newer than L{SCHEMA_VERSION}.
    """
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{dialect.where()}: written by a newer mtasts-twisted (store schema"
            f" version {version}; mtasts-twisted {__version__} knows versions up"
            f" to {SCHEMA_VERSION}). It was left untouched: upgrade"
            " mtasts-twisted (pip install --upgrade mtasts-twisted) to use it,"
            " or choose another --database.",
            reason="schema-too-new",
        )


def _migrate(
    txn: Cursor, dialect: SchemaDialect, names: Sequence[str], now: str
) -> tuple[int, list[Migration]]:
    """
    Bring the database to L{SCHEMA_VERSION} and create the missing shelves,
    in one transaction (in a pool thread).

    @param names: the shelf tables to have.
    @param now: the ISO time recorded with each applied migration.
    @return: the version found, and the migrations applied.
    """
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

