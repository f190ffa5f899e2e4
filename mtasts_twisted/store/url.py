"""
From a database URL to an open store: L{open_store}, the default URL
(L{default_database_url}) and the URL parsing behind both (L{_dialect_for},
which the CLI also uses to find an SQLite file).

  - C{sqlite:PATH} or C{sqlite:///abs/path}: an SQLite file
    (L{_SQLite<mtasts_twisted.store.dialects._SQLite>}).
  - C{postgresql://user:pass@host:port/db} (also C{postgres://}): a
    PostgreSQL database through psycopg2
    (L{_PostgreSQL<mtasts_twisted.store.dialects._PostgreSQL>}).
  - C{memory:}: a L{MemoryStore}; nothing persists.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
import urllib.parse
from typing import Iterable, cast

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from mtasts_twisted.interfaces import IStore
from mtasts_twisted.store.database import Store
from mtasts_twisted.store.dialects import StoreReactor, _Dialect, _PostgreSQL, _SQLite
from mtasts_twisted.store.errors import StoreError
from mtasts_twisted.store.memory import MemoryStore
from mtasts_twisted.store.schema import SCHEMA_VERSION, _check_tables, _migrate

__all__ = ["default_database_url", "open_store"]

# The package is the log namespace, as before the split into modules.
log = Logger(namespace="mtasts_twisted.store")


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


def open_store(
    url: str, reactor: StoreReactor, tables: Iterable[str] = ("policies",), pool_size: int = 4
) -> Deferred[IStore]:
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
    @return: L{Deferred} firing with the open L{Store} (a L{MemoryStore}
        for C{memory:}), or failing with L{StoreError} (bad URL, unusable
        file or database, newer schema) or L{ValueError} (bad table name).
    """
    return Deferred.fromCoroutine(_open(url, reactor, tables, pool_size))


async def _open(
    url: str, reactor: StoreReactor, tables: Iterable[str], pool_size: int
) -> IStore:
    if url == "memory:":
        return MemoryStore(_check_tables(tables))
    dialect = _dialect_for(url)
    names = _check_tables(tables)
    pool = dialect.make_pool(reactor, pool_size)
    store = Store(dialect, pool, names, reactor)
    try:
        # A StoreReactor has IReactorFromThreads's one method.
        await threads.deferToThreadPool(
            cast(IReactorFromThreads, reactor), pool.threadpool, dialect.prepare
        )
        now = datetime.datetime.fromtimestamp(
            reactor.seconds(), datetime.timezone.utc
        ).isoformat()
        _, applied = await store._run(_migrate, dialect, names, now)
    except BaseException:
        pool.close()
        raise
    try:
        reader = dialect.reactor_reader()
    except sqlite3.Error as e:
        # Every read goes through the pool, as it always could.
        log.info("{where}: key reads stay in the pool thread: {error}", where=dialect.where(), error=e)
    else:
        if reader is not None:
            store.read_in_reactor(reader)
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
