"""
Issue 17.7: errors of the queue's files while the intake spools a message
(injected C{OSError}s of each errno: at the directory, at the body file's
open, at a write of a message over C{BUFFERED_SIZE}, at the commit's
fsync) are answered C{452 4.3.1} (disk full) or C{451 4.3.0}, leave
nothing behind, and the session goes on: the next transaction is queued.
And an unwritable queue directory stops C{twistd mtasts} at start with one
line.
"""

from __future__ import annotations

import builtins
import errno
import os
from typing import Any

from twisted.python import usage
from twisted.python.monkey import MonkeyPatcher
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.relay import BUFFERED_SIZE
from mtasts_twisted.service import Options
from tests.test_intake_commands import IntakeCase

BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (BUFFERED_SIZE // 1000 + 10)
SMALL = b"Subject: small\r\n\r\nHi.\r\n"


class SpoolErrorTests(IntakeCase):
    def inject(self, errno_: int, at: str) -> tuple[list[str], MonkeyPatcher]:
        """
        Make the queue's files fail with C{errno_} C{at} C{"mkdir"}, C{"open"}
        (the body file), C{"write"} (the body file) or C{"fsync"}: the
        failures are noted in the list; the patcher undoes it.
        """
        failures: list[str] = []
        directory = os.path.abspath(self.dir)
        real_open, real_mkdir, real_fsync = builtins.open, os.mkdir, os.fsync

        def fail(what: str) -> OSError:
            failures.append(what)
            return OSError(errno_, os.strerror(errno_))

        def mkdir(path: Any, *a: Any, **kw: Any) -> None:
            if at == "mkdir" and os.path.abspath(path).startswith(directory):
                raise fail("mkdir")
            real_mkdir(path, *a, **kw)

        def open_(path: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
            mine = isinstance(path, str) and "x" in mode and os.path.abspath(path).startswith(directory)
            if mine and at == "open" and path.endswith("message"):
                raise fail("open")
            f = real_open(path, mode, *a, **kw)
            if not (mine and at == "write" and path.endswith("message")):
                return f

            class Failing:
                def write(self, data: bytes) -> int:
                    raise fail("write")

                def __getattr__(self, name: str) -> Any:
                    return getattr(f, name)

            return Failing()

        def fsync(fd: int) -> None:
            if at == "fsync":
                raise fail("fsync")
            real_fsync(fd)

        patcher = MonkeyPatcher((os, "mkdir", mkdir), (builtins, "open", open_), (os, "fsync", fsync))
        patcher.patch()
        self.addCleanup(patcher.restore)
        return failures, patcher

    def leftovers(self) -> list[str]:
        return [name for name in os.listdir(self.dir) if name != "quarantine"]

    async def check(self, errno_: int, at: str, body: bytes, expected: tuple[int, bytes]) -> None:
        queue = self.listen()
        client = await self.greeted()
        failures, patcher = self.inject(errno_, at)
        try:
            answers = await self.submit(client, b"a@example.org", [b"b@example.com"], body)
        finally:
            patcher.restore()
        self.assertTrue(failures, f"no {at} failed")
        self.assertEqual([c for c, _ in answers[:3]], [250, 250, 354], answers)
        self.assertEqual((answers[3][0], answers[3][1][:5]), expected, answers)
        self.assertEqual(queue.list(), [])
        self.assertEqual(self.leftovers(), [])
        self.assertFalse(client.closed.called)
        self.assertEqual(self.flushLoggedErrors(), [])
        # The session goes on: the next transaction is queued.
        answers = await self.submit(client, b"a@example.org", [b"c@example.com"], body)
        self.assertEqual(answers[-1][0], 250, answers)
        [message] = queue.list()
        self.assertEqual(message.recipients[0].address, "c@example.com")

    async def test_write_eio(self) -> None:
        await self.check(errno.EIO, "write", BIG, (451, b"4.3.0"))

    async def test_write_erofs(self) -> None:
        await self.check(errno.EROFS, "write", BIG, (451, b"4.3.0"))

    async def test_write_emfile(self) -> None:
        await self.check(errno.EMFILE, "write", BIG, (451, b"4.3.0"))

    async def test_mkdir_erofs(self) -> None:
        await self.check(errno.EROFS, "mkdir", BIG, (451, b"4.3.0"))

    async def test_mkdir_eacces(self) -> None:
        await self.check(errno.EACCES, "mkdir", BIG, (451, b"4.3.0"))

    async def test_open_emfile(self) -> None:
        await self.check(errno.EMFILE, "open", BIG, (451, b"4.3.0"))

    async def test_write_enospc(self) -> None:
        """A full disk is still C{452 4.3.1} (RFC 3463 "mail system full")."""
        await self.check(errno.ENOSPC, "write", BIG, (452, b"4.3.1"))

    async def test_commit_eio(self) -> None:
        """A small message meets the error at its commit: the same reply."""
        await self.check(errno.EIO, "fsync", SMALL, (451, b"4.3.0"))

    async def test_commit_emfile(self) -> None:
        await self.check(errno.EMFILE, "open", SMALL, (451, b"4.3.0"))


class StartupTests(SynchronousTestCase):
    """An unwritable queue directory is found at start (one line, like the data directory)."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(os.path.join(self.dir, "queue"))

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--data-dir", self.dir, "--no-reports", *argv])
        return options

    def test_queue_dir_read_only(self) -> None:
        queue = os.path.join(self.dir, "queue")
        os.chmod(queue, 0o500)
        self.addCleanup(os.chmod, queue, 0o700)
        if os.geteuid() == 0:
            # Root may write anywhere, so os.access answers as for root;
            # answer as the kernel would for an unprivileged user (or as it
            # does for anyone on a read-only mount: EROFS).
            real_access = os.access
            self.patch(os, "access", lambda path, mode: False if os.path.abspath(path) == os.path.abspath(queue)
                       else real_access(path, mode))
        error = self.assertRaises(usage.UsageError, self.parse)
        self.assertIn(f"--data-dir {self.dir}: queue directory {queue} is not writable", str(error))
        self.assertNotIn("\n", str(error))
        # Without the relay (--smtp none) the queue is not used.
        self.parse("--smtp", "none")

    def test_queue_dir_not_a_directory(self) -> None:
        queue = os.path.join(self.dir, "queue")
        os.rmdir(queue)
        with open(queue, "w"):
            pass
        error = self.assertRaises(usage.UsageError, self.parse)
        self.assertIn(f"queue directory {queue} is not a directory", str(error))

    def test_queue_dir_fine(self) -> None:
        self.parse()
        os.rmdir(os.path.join(self.dir, "queue"))
        self.parse()  # made at start
