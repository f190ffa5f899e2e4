"""
Key reads of a SQLite store in the reactor thread.

A cold policy lookup reads its key once (a miss) before it writes it; on
the pool's one thread each read is a round trip through the thread pool
and the reactor's waker, and under load the reactor and that thread take
the GIL from each other.  In WAL mode readers never wait for the writer,
and a primary-key read of a local file costs a few microseconds, so
L{ReactorReader} answers them on the spot, from its own read-only
connection.  (bench/RESULTS.md, issue 19, has the figures.)

Whatever it cannot answer at once it leaves to the pool, which orders it
after the writes before it: a database another process holds (C{BUSY},
C{LOCKED}: with a zero timeout, never a wait in the reactor), or a key
with a write of this process still in flight, which the caller checks
(read-your-writes, as the one pool thread gave before).
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from typing import Optional

from twisted.logger import Logger

__all__ = ["ReactorReader", "WouldWait"]

log = Logger(namespace="mtasts_twisted.store")


class WouldWait(Exception):
    """The read would have to wait for another connection: ask the pool."""


class ReactorReader:
    """A read-only connection to a SQLite file, used from the reactor thread."""

    def __init__(self, path: str) -> None:
        """
        @param path: the database file, already opened (and so in WAL mode)
            by the store's pool.
        @raise sqlite3.Error: it cannot be opened.
        """
        uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
        # timeout=0: a lock held elsewhere raises at once (WouldWait), and
        # the read goes to the pool thread, which may wait.
        self._connection: Optional[sqlite3.Connection] = sqlite3.connect(
            uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False
        )

    def value(self, table: str, key: str) -> Optional[str]:
        """
        The stored text of C{key} in C{table}, or L{None}.

        @raise WouldWait: another connection holds a lock this read needs.
        @raise sqlite3.Error: any other database error.
        """
        connection = self._connection
        if connection is None:
            raise WouldWait("closed")
        try:
            cursor = connection.execute(f'SELECT value FROM "{table}" WHERE key = ?', (key,))
            try:
                # fetchall runs the statement to its end, so no read
                # transaction stays open to hold back WAL checkpoints.
                rows = cursor.fetchall()
            finally:
                cursor.close()
        except sqlite3.OperationalError as e:
            name = getattr(e, "sqlite_errorname", "") or ""
            if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                raise WouldWait(str(e)) from e
            raise
        return rows[0][0] if rows else None

    def close(self) -> None:
        """Close the connection; later reads raise L{WouldWait}."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
