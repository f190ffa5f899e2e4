"""
A throwaway PostgreSQL server for tests.

L{PostgresServer} runs C{initdb} and C{pg_ctl start} in a temporary directory:
loopback TCP only (127.0.0.1, a free port), trust authentication, C{fsync}
off, superuser C{postgres}.  PostgreSQL refuses to run as root, so as root
the directory is given to the C{postgres} system user and the server runs as
that user (C{runuser}); otherwise it runs as the current user.  Binaries come
from the newest C{/usr/lib/postgresql/*/bin} (Debian's C{postgresql}
package) or from C{PATH}.

Starting a server takes a second or two, so tests share one per process
(L{shared_server}, stopped at exit) and make a fresh database per test::

    from mtasts_twisted.testing.postgres import require_server

    class MyTests(TestCase):
        def setUp(self):
            # Skips when PostgreSQL is not installed -- fails instead when
            # the environment has CI=true.
            self.url = require_server().create_database()

The helper is synchronous (subprocess, psycopg2) because it is test setup;
every step has a timeout.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import unittest
from typing import Mapping, Optional

__all__ = [
    "PostgresServer",
    "find_bin_dir",
    "postgres_available",
    "require_server",
    "shared_server",
]

_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_SERVICE_USER = "postgres"
_TIMEOUT = 60.0

# Runs beside the test process and stops the server if that process dies
# without stopping it: it waits for EOF on stdin (the parent's end of a pipe).
_WATCHDOG = """
import json, shutil, subprocess, sys
sys.stdin.buffer.read()
try:
    subprocess.run(json.loads(sys.argv[1]), timeout=30,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
finally:
    shutil.rmtree(sys.argv[2], ignore_errors=True)
"""


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def find_bin_dir() -> Optional[str]:
    """
    Find the directory of C{initdb}, C{pg_ctl} and C{postgres}.

    @return: the newest C{/usr/lib/postgresql/<version>/bin} that has them,
        else the directory of C{initdb} on C{PATH} if it has them, else
        L{None}.
    """
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))
    for directory in candidates:
        if all(os.access(os.path.join(directory, p), os.X_OK) for p in _PROGRAMS):
            return directory
    return None


def postgres_available() -> tuple[bool, str]:
    """
    Tell whether L{PostgresServer} can run here.

    @return: C{(True, "")}, or C{(False, reason)} saying what is missing.
    """
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return False, "psycopg2 is not installed (pip install mtasts-twisted[test])"
    if find_bin_dir() is None:
        return False, (
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in"
            " /usr/lib/postgresql/*/bin or on PATH (apt-get install postgresql)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_SERVICE_USER)
        except KeyError:
            return False, f"running as root and there is no {_SERVICE_USER!r} user"
        if shutil.which("runuser") is None:
            return False, "running as root and runuser is not installed"
    return True, ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """
    One throwaway PostgreSQL server on 127.0.0.1.

    @ivar url: after L{start}, the URL of the C{postgres} database as the
        superuser C{postgres} (no password: trust authentication).
    @ivar port: after L{start}, the TCP port.
    """

    def __init__(self, bin_dir: Optional[str] = None, timeout: float = _TIMEOUT) -> None:
        """
        @param bin_dir: where the binaries are; L{find_bin_dir} when L{None}.
        @param timeout: the most seconds any one step (initdb, start, stop)
            may take.
        """
        self._bin_dir = bin_dir
        self._timeout = timeout
        self._dir: Optional[str] = None
        self._watchdog: Optional[subprocess.Popen[bytes]] = None
        self._stop_argv: list[str] = []
        self._counter = itertools.count(1)
        self.url: Optional[str] = None
        self.port: Optional[int] = None

    def _as_server_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", _SERVICE_USER, "--", *argv]
        return argv

    def _run(self, argv: list[str], what: str) -> None:
        assert self._dir is not None
        out_path = os.path.join(self._dir, "commands.log")
        with open(out_path, "ab") as out:
            try:
                result = subprocess.run(
                    self._as_server_user(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=self._timeout,
                    env={**os.environ, "LC_ALL": "C", "LANG": "C"},
                )
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"{what} took more than {self._timeout} s") from e
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{self._logs()}")

    def _logs(self) -> str:
        texts = []
        for name in ("commands.log", "server.log"):
            path = os.path.join(self._dir or "", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    texts.append(f"--- {name}\n{f.read()[-3000:]}")
        return "\n".join(texts)

    def start(self) -> str:
        """
        Create the cluster and start the server (a second or two).

        @return: L{url}.
        @raise RuntimeError: a step failed or timed out; the message holds
            the server's log.
        """
        if self.url is not None:
            return self.url
        bin_dir = self._bin_dir or find_bin_dir()
        if bin_dir is None:
            raise RuntimeError(postgres_available()[1])
        self._dir = tempfile.mkdtemp(prefix="mtasts-pg-")
        data = os.path.join(self._dir, "data")
        pg_ctl = os.path.join(bin_dir, "pg_ctl")
        try:
            if os.geteuid() == 0:
                user = pwd.getpwnam(_SERVICE_USER)
                os.chown(self._dir, user.pw_uid, user.pw_gid)
            self._stop_argv = self._as_server_user(
                [pg_ctl, "-D", data, "-m", "immediate", "stop"]
            )
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, json.dumps(self._stop_argv), self._dir],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._run(
                [
                    os.path.join(bin_dir, "initdb"),
                    "-D", data,
                    "--username", "postgres",
                    "--auth", "trust",
                    "--encoding", "UTF8",
                    "--locale", "C",
                    "--no-sync",
                ],
                "initdb",
            )
            for attempt in range(3):
                port = _free_port()
                options = " ".join(
                    [
                        "-c listen_addresses=127.0.0.1",
                        f"-c port={port}",
                        f"-c unix_socket_directories={self._dir}",
                        "-c fsync=off",
                        "-c synchronous_commit=off",
                        "-c full_page_writes=off",
                        "-c shared_buffers=16MB",
                        "-c max_connections=60",
                    ]
                )
                try:
                    self._run(
                        [
                            pg_ctl,
                            "-D", data,
                            "-l", os.path.join(self._dir, "server.log"),
                            "-o", options,
                            "-w",
                            "-t", str(int(self._timeout)),
                            "start",
                        ],
                        "pg_ctl start",
                    )
                    break
                except RuntimeError:
                    # Someone may have taken the port meanwhile: try another.
                    if attempt == 2:
                        raise
        except BaseException:
            self.stop()
            raise
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        return self.url

    def create_database(self, name: Optional[str] = None) -> str:
        """
        Create an empty database.

        @param name: its name; C{test_<pid>_<n>} when L{None}.
        @return: its URL.
        """
        import psycopg2

        if self.url is None:
            raise RuntimeError("the server is not running")
        if name is None:
            name = f"test_{os.getpid()}_{next(self._counter)}"
        if not re.match(r"[a-z_][a-z0-9_]*\Z", name):
            raise ValueError(f"not a plain database name: {name!r}")
        conn = psycopg2.connect(self.url, connect_timeout=int(self._timeout))
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server at once (C{-m immediate}) and remove its directory."""
        if self._dir is None:
            return
        if self._stop_argv:
            try:
                subprocess.run(
                    self._stop_argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=self._timeout,
                )
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self._dir, ignore_errors=True)
        if self._watchdog is not None:
            assert self._watchdog.stdin is not None
            self._watchdog.stdin.close()
            try:
                self._watchdog.wait(self._timeout)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
            self._watchdog = None
        self._dir = None
        self.url = None
        self.port = None


_shared: Optional[PostgresServer] = None
_shared_error: Optional[BaseException] = None
_shared_lock = threading.Lock()


def shared_server() -> PostgresServer:
    """
    Return this process's shared server, starting it on first use.

    It is stopped when the process exits.  A failed start is remembered and
    raised again, not retried per test.

    @raise RuntimeError: the server would not start.
    """
    global _shared, _shared_error
    with _shared_lock:
        if _shared_error is not None:
            raise RuntimeError(f"PostgreSQL did not start: {_shared_error}")
        if _shared is None:
            server = PostgresServer()
            try:
                server.start()
            except BaseException as e:
                _shared_error = e
                raise
            atexit.register(server.stop)
            _shared = server
        return _shared


def require_server(environ: Optional[Mapping[str, str]] = None) -> PostgresServer:
    """
    Return L{shared_server} for a test that needs PostgreSQL.

    @param environ: the environment; L{os.environ} when L{None}.
    @raise unittest.SkipTest: PostgreSQL is not installed here (a test
        calling this from C{setUp} is skipped, with the reason).
    @raise RuntimeError: PostgreSQL is not installed but C{CI=true}: CI must
        run these tests, so a missing server is a failure, not a skip.
    """
    env = os.environ if environ is None else environ
    available, reason = postgres_available()
    if not available:
        if env.get("CI", "").lower() == "true":
            raise RuntimeError(f"CI=true but PostgreSQL tests cannot run: {reason}")
        raise unittest.SkipTest(reason)
    return shared_server()
