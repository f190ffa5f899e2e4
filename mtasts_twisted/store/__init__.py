"""
Shelve on adbapi: a persistent async mapping over
L{twisted.enterprise.adbapi.ConnectionPool}.

A L{Store} is one database (SQLite file or PostgreSQL database) holding named
tables; each table is a L{Shelf}: an async mapping of string keys (unicode
domain names and the like) to JSON-serialisable dicts, stored as JSON text
(never pickle).  Every operation returns a
L{twisted.internet.defer.Deferred}; the SQL runs in the
pool's threads.  Open one with L{open_store}; C{memory:} opens a
L{MemoryStore}, which behaves the same but keeps nothing.

The rooms, bottom to top:

  - L{errors<mtasts_twisted.store.errors>}: L{StoreError}.
  - L{codec<mtasts_twisted.store.codec>}: the keys and JSON values every
    shelf accepts.
  - L{schema<mtasts_twisted.store.schema>}: L{SCHEMA_VERSION},
    L{MIGRATIONS} and the migration transaction.
  - L{dialects<mtasts_twisted.store.dialects>}: what differs between SQLite
    and PostgreSQL (placeholders, locks, pools, error messages).
  - L{database<mtasts_twisted.store.database>}: L{Store} and L{Shelf} on
    adbapi.
  - L{memory<mtasts_twisted.store.memory>}: L{MemoryStore} and
    L{MemoryShelf}.
  - L{url<mtasts_twisted.store.url>}: L{open_store} and
    L{default_database_url}.
"""

# The private names are imported from here by the CLI (_dialect_for) and the tests.
from mtasts_twisted.store.codec import JSONDict, UpdateFunction, _decode, _encode
from mtasts_twisted.store.database import Shelf, Store
from mtasts_twisted.store.dialects import BUSY_TIMEOUT_MS, StoreReactor
from mtasts_twisted.store.errors import StoreError
from mtasts_twisted.store.memory import MemoryShelf, MemoryStore
from mtasts_twisted.store.schema import MIGRATIONS, SCHEMA_VERSION, Migration
from mtasts_twisted.store.url import _dialect_for, _redact, default_database_url, open_store

__all__ = [
    "BUSY_TIMEOUT_MS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "JSONDict",
    "MemoryShelf",
    "MemoryStore",
    "Migration",
    "Shelf",
    "Store",
    "StoreError",
    "StoreReactor",
    "UpdateFunction",
    "default_database_url",
    "open_store",
]
