"""
C{mtasts-twisted backup DIR} and C{verify DIR}: consistent snapshots of
the service's SQLite databases, and checking one before it is restored.
"""

from __future__ import annotations

import argparse
import os
from typing import TextIO

from mtasts_twisted.cli.common import (
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NOINPUT,
    EX_OK,
    EX_UNAVAILABLE,
    database_url,
    sqlite_path,
)

__all__ = ["run_backup", "run_verify"]


def _sqlite_databases(args: argparse.Namespace) -> list[str]:
    """The SQLite files of the service: the --database one and DATA-DIR/*.sqlite."""
    found = []
    path = sqlite_path(database_url(args))
    if path is not None and os.path.isfile(path):
        found.append(os.path.abspath(path))
    if os.path.isdir(args.data_dir):
        for name in sorted(os.listdir(args.data_dir)):
            candidate = os.path.abspath(os.path.join(args.data_dir, name))
            if name.endswith(".sqlite") and os.path.isfile(candidate) and candidate not in found:
                found.append(candidate)
    return found


def run_backup(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    C{mtasts-twisted backup DIR}: a consistent snapshot of every SQLite
    database of the service (safe while it runs: the SQLite backup API
    copies a consistent state), then checked like C{verify}.
    """
    import sqlite3

    from mtasts_twisted.store import BUSY_TIMEOUT_MS

    url = database_url(args)
    if sqlite_path(url) is None:
        err.write(f"mtasts-twisted backup: {url.split('@')[-1]} is not SQLite: back PostgreSQL up with"
                  " pg_dump (e.g. pg_dump -Fc -f mtasts.dump DATABASE)\n")
        return EX_UNAVAILABLE
    databases = _sqlite_databases(args)
    if not databases:
        err.write(f"mtasts-twisted backup: no SQLite database in {args.data_dir}\n")
        return EX_NOINPUT
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    names = [os.path.basename(path) for path in databases]
    clashes = [name for name in names if os.path.exists(os.path.join(args.dir, name))]
    if clashes:
        err.write(f"mtasts-twisted backup: {args.dir} already holds {', '.join(clashes)}: choose an empty"
                  " directory\n")
        return EX_CANTCREAT
    for path, name in zip(databases, names):
        target = os.path.join(args.dir, name)
        partial = target + ".partial"
        try:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                copy = sqlite3.connect(partial)
                try:
                    source.backup(copy)
                    copy.execute("PRAGMA journal_mode = DELETE")
                finally:
                    copy.close()
            finally:
                source.close()
            os.replace(partial, target)
        except (sqlite3.Error, OSError) as e:
            err.write(f"mtasts-twisted backup: {path}: {e}\n")
            if os.path.exists(partial):
                os.unlink(partial)
            return EX_CANTCREAT
        out.write(f"{path} -> {target}\n")
    return _verify_files([os.path.join(args.dir, name) for name in names], out, err)


def _check_snapshot(path: str) -> str:
    """One line about the snapshot at C{path}; raise L{ValueError} if unusable."""
    import sqlite3

    from mtasts_twisted.store import SCHEMA_VERSION

    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise ValueError("not an SQLite database")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except (OSError, sqlite3.Error) as e:
        raise ValueError(str(e)) from None
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise ValueError("integrity check failed: " + "; ".join(problems)[:300])
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" not in tables:
            raise ValueError("not an mtasts-twisted database (no schema_version)")
        (version,) = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        if not version or version > SCHEMA_VERSION:
            raise ValueError(f"schema version {version} is not known to this version"
                             f" (it knows 1 to {SCHEMA_VERSION})")
        shelves = [row[0] for row in conn.execute("SELECT name FROM shelves ORDER BY name")]
        missing = [name for name in shelves if name not in tables]
        if missing:
            raise ValueError(f"tables missing: {', '.join(missing)}")
        rows = {name: conn.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0] for name in shelves}
        counts = ", ".join(f"{name} {n}" for name, n in rows.items())
        return f"schema version {version}, rows: {counts or 'no tables'}"
    except sqlite3.Error as e:
        raise ValueError(str(e)) from None
    finally:
        conn.close()


def _verify_files(paths: list[str], out: TextIO, err: TextIO) -> int:
    bad = 0
    for path in paths:
        try:
            out.write(f"OK {path}: {_check_snapshot(path)}\n")
        except ValueError as e:
            err.write(f"BAD {path}: {e}\n")
            bad += 1
    return EX_DATAERR if bad else EX_OK


def run_verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    C{mtasts-twisted verify DIR}: check a snapshot before restoring it:
    every C{*.sqlite} file opens read-only, passes C{PRAGMA
    integrity_check}, and has a schema version this version knows.
    """
    if not os.path.isdir(args.dir):
        err.write(f"mtasts-twisted verify: {args.dir}: no such directory\n")
        return EX_NOINPUT
    paths = sorted(os.path.join(args.dir, n) for n in os.listdir(args.dir) if n.endswith(".sqlite"))
    if not paths:
        err.write(f"mtasts-twisted verify: no *.sqlite file in {args.dir}\n")
        return EX_NOINPUT
    return _verify_files(paths, out, err)
