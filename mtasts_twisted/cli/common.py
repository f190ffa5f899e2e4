"""
What the commands of L{mtasts_twisted.cli} share: the exit codes
(sysexits), the argument parser class, running an async command on the
global reactor, and finding the service's database.

Nothing here imports Twisted or the service at import time: a command
pays for what it uses.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import TYPE_CHECKING, NoReturn, TextIO

if TYPE_CHECKING:
    # The reactor the commands run on: the global one (from task.react),
    # which provides every reactor interface the components ask for, as
    # the service's does.
    from mtasts_twisted.service import IServiceReactor as Reactor

__all__ = [
    "DEFAULT_DATA_DIR",
    "EX_CANTCREAT",
    "EX_DATAERR",
    "EX_NOINPUT",
    "EX_OK",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "Parser",
    "add_store_options",
    "database_url",
    "iso",
    "missing_database",
    "react",
    "sqlite_path",
]

#: A definite answer.
EX_OK = 0
#: Bad usage.
EX_USAGE = 64
#: Invalid input data.
EX_DATAERR = 65
#: An input (database, queue, message, snapshot) does not exist.
EX_NOINPUT = 66
#: The command cannot do this here (e.g. C{backup} of PostgreSQL).
EX_UNAVAILABLE = 69
#: An output (database, snapshot) cannot be created.
EX_CANTCREAT = 73
#: A temporary failure: try again later.
EX_TEMPFAIL = 75
#: The service's data directory unless C{--data-dir} says otherwise.
DEFAULT_DATA_DIR = "./mtasts-data"

class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with EX_USAGE (64)."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and C{message}; exit with EX_USAGE."""
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def iso(timestamp: float) -> str:
    """POSIX time C{timestamp} as an ISO 8601 UTC time, to the second."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def react(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run an async command (C{args.run_async}) on the global reactor and return its exit code."""
    from twisted.internet import defer, task

    codes: list[int] = []

    async def run(reactor: Reactor) -> None:
        codes.append(await args.run_async(reactor, args, out, err))

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if not codes:
            return e.code if isinstance(e.code, int) and e.code else 70  # EX_SOFTWARE
    return codes[0]


def database_url(args: argparse.Namespace) -> str:
    """The database of C{--database}, or the SQLite file in C{--data-dir}."""
    from mtasts_twisted.store import default_database_url

    return args.database or default_database_url(args.data_dir)


def sqlite_path(url: str) -> str | None:
    """The file of an C{sqlite:} URL, L{None} for other databases."""
    from mtasts_twisted.store import _dialect_for

    if not url.lower().startswith("sqlite:"):
        return None
    return _dialect_for(url).path  # type: ignore[attr-defined]


def missing_database(url: str, command: str, err: TextIO) -> bool:
    """Whether C{url} is an SQLite file that does not exist (then say so on C{err})."""
    path = sqlite_path(url)
    if path is not None and not os.path.exists(path):
        err.write(f"mtasts-twisted {command}: no database at {path} (check --data-dir or --database)\n")
        return True
    return False


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """C{--data-dir} and C{--database}, for the commands on the service's database."""
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                        help="the service's data directory (default %(default)s)")
    parser.add_argument("--database", metavar="URL", help="database URL (default: sqlite:DIR/mtasts.sqlite)")
