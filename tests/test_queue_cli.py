"""
The C{mtasts-twisted queue} commands as an operator meets them (issues
17.10 and 18): recipients in C{list}, a human C{show} with dates and a
C{--json} one, an empty data directory, and a clean one-line error with
exit status 73 when the queue cannot be written (a read-only file system,
a full disk) — on real read-only and full file systems where the machine
allows mounting them, else through patched system calls.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time

import attrs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mtasts_twisted import cli
from mtasts_twisted.relay import Queue, RecipientStatus
from mtasts_twisted.relay import queue as queue_module

BODY = b"Subject: x\r\n\r\nhi\r\n"
#: 2023-11-14T22:13:20Z
T0 = 1_700_000_000


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


class FixedClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def seconds(self) -> float:
        return self.now


class QueueCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = self.mktemp()
        self.queue = Queue(os.path.join(self.data, "queue"), clock=FixedClock(T0))  # type: ignore[arg-type]

    def two_recipients(self) -> str:
        m = self.queue.enqueue("alice@example.org", ["bob@example.com", "carol@example.net"], BODY)
        bob, carol = m.recipients
        # The command runs on the real clock: bob's retry is an hour from now.
        self.next_attempt = float(int(time.time()) + 3600)
        m = m.with_recipient(attrs.evolve(bob, attempts=2, next_attempt=self.next_attempt,
                                          reason="421 4.7.0 try later", status_code="4.7.0",
                                          remote_mta="mx.example.com"))
        m = m.with_recipient(attrs.evolve(carol, state=RecipientStatus.DELIVERED, reason="250 2.0.0 ok",
                                          status_code="2.0.0", remote_mta="mx.example.net"))
        self.queue.update(attrs.evolve(m, attempts=2, last_error="421 4.7.0 try later"))
        return m.id

    def test_list_shows_recipients(self) -> None:
        ident = self.two_recipients()
        code, out, err = run_cli("queue", "list", "--data-dir", self.data)
        self.assertEqual(code, 0, err)
        [line] = out.splitlines()
        self.assertIn(ident, line)
        self.assertIn("<alice@example.org>", line)
        self.assertIn("<bob@example.com>", line)  # pending
        self.assertIn("1 of 2 pending", line)
        self.assertIn("421 4.7.0 try later", line)

    def test_list_json_has_recipients(self) -> None:
        self.two_recipients()
        code, out, err = run_cli("queue", "list", "--data-dir", self.data, "--json")
        [item] = json.loads(out)
        self.assertEqual(item["recipients"], ["bob@example.com", "carol@example.net"])
        self.assertEqual(item["pending"], ["bob@example.com"])

    def test_show_human(self) -> None:
        """Dates, not epoch seconds; every recipient with its state."""
        ident = self.two_recipients()
        code, out, err = run_cli("queue", "show", ident, "--data-dir", self.data)
        self.assertEqual(code, 0, err)
        self.assertIn("2023-11-14T22:13:20Z", out)  # created
        self.assertIn(cli.common.iso(self.next_attempt), out)  # bob's next attempt
        self.assertIn("(in 59 min)", out)
        self.assertNotIn(str(T0), out)
        self.assertIn("<bob@example.com>", out)
        self.assertIn("<carol@example.net>", out)
        self.assertIn("delivered", out)
        self.assertIn("mx.example.net", out)
        self.assertRaises(ValueError, json.loads, out)

    def test_show_json(self) -> None:
        ident = self.two_recipients()
        code, out, err = run_cli("queue", "show", ident, "--data-dir", self.data, "--json")
        self.assertEqual(code, 0, err)
        shown = json.loads(out)
        self.assertEqual(shown["id"], ident)
        self.assertEqual(shown["created"], T0)
        self.assertEqual([r["state"] for r in shown["recipients_state"]], ["pending", "delivered"])

    def test_empty_data_dir(self) -> None:
        """C{show}, C{retry} and C{delete} on a data dir without a queue say the queue is empty."""
        empty = self.mktemp()
        self.assertEqual(run_cli("queue", "list", "--data-dir", empty), (0, "the queue is empty\n", ""))
        for action in ("show", "retry", "delete"):
            code, out, err = run_cli("queue", action, "0000000000000000-00000000", "--data-dir", empty)
            self.assertEqual(code, cli.EX_NOINPUT)
            self.assertIn("the queue is empty", err)
            self.assertEqual(len(err.splitlines()), 1)
        os.makedirs(os.path.join(empty, "queue"))
        code, out, err = run_cli("queue", "show", "0000000000000000-00000000", "--data-dir", empty)
        self.assertEqual((code, err.count("the queue is empty")), (cli.EX_NOINPUT, 1))

    def test_damaged_envelope(self) -> None:
        """A damaged envelope is one line, exit 65, not a traceback."""
        ident = self.two_recipients()
        with open(os.path.join(self.data, "queue", ident, "envelope.json"), "wb") as f:
            f.write(b'{"version": 1, "created": NaN}')
        for action in ("show", "retry"):
            code, out, err = run_cli("queue", action, ident, "--data-dir", self.data)
            self.assertEqual(code, cli.EX_DATAERR, err)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn(ident, err)

    def test_retry_disk_full(self) -> None:
        """A full disk: one line naming the problem, exit 73 (README), nothing half-written."""
        ident = self.two_recipients()

        def full(path: str, data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        self.patch(queue_module, "write_durably", full)
        code, out, err = run_cli("queue", "retry", ident, "--data-dir", self.data)
        self.assertEqual(code, cli.EX_CANTCREAT)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("No space left on device", err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(sorted(os.listdir(os.path.join(self.data, "queue", ident))), ["envelope.json", "message"])

    def test_retry_and_delete_read_only(self) -> None:
        """A read-only file system (as the system calls say it): one line, exit 73."""
        ident = self.two_recipients()

        def read_only(*args: object, **kw: object) -> None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        self.patch(queue_module, "write_durably", read_only)
        self.patch(queue_module.os, "rename", read_only)
        for action in ("retry", "delete"):
            code, out, err = run_cli("queue", action, ident, "--data-dir", self.data)
            self.assertEqual(code, cli.EX_CANTCREAT, (action, err))
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn("Read-only file system", err)


def _mount_tmpfs_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


class RealFileSystemTests(SynchronousTestCase):
    """
    C{queue retry} in a subprocess on a real read-only file system and a
    real full one (a private mount namespace: needs root and C{unshare};
    as another user, a read-only directory is enough).
    """

    def setUp(self) -> None:
        self.data = os.path.abspath(self.mktemp())
        queue = Queue(os.path.join(self.data, "queue"))
        self.ident = queue.enqueue("alice@example.org", ["bob@example.com"], BODY).id

    def cli(self, script: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, DATA=self.data, PY=sys.executable, ID=self.ident)
        if os.geteuid() == 0:
            if not _mount_tmpfs_available():
                raise SkipTest("cannot mount in a private namespace here")
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-ec", script]
        else:
            argv = ["sh", "-ec", script]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    def test_read_only(self) -> None:
        if os.geteuid() == 0:
            setup = 'mount --bind "$DATA" "$DATA"; mount -o remount,bind,ro "$DATA"\n'
        else:
            setup = 'chmod -R a-w "$DATA"\n'
            self.addCleanup(subprocess.run, ["chmod", "-R", "u+w", self.data])
        done = self.cli(setup + 'exec "$PY" -m mtasts_twisted queue retry "$ID" --data-dir "$DATA"')
        self.assertEqual(done.returncode, 73, done.stderr)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        self.assertIn(self.ident, done.stderr)

    def test_full_disk(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("a full file system needs a private tmpfs mount (root)")
        script = (
            'mount -t tmpfs -o size=256k tmpfs "$DATA/queue"\n'
            '"$PY" -c "from mtasts_twisted.relay import Queue; import sys; '
            "print(Queue(sys.argv[1]).enqueue('a@example.org', ['b@example.com'], b'hi\\r\\n').id)\" "
            '"$DATA/queue" > "$DATA/id"\n'
            'dd if=/dev/zero of="$DATA/queue/filler" bs=4k 2>/dev/null || true\n'
            'exec "$PY" -m mtasts_twisted queue retry "$(cat "$DATA/id")" --data-dir "$DATA"'
        )
        done = self.cli(script)
        self.assertEqual(done.returncode, 73, done.stderr)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        self.assertIn("No space left on device", done.stderr)
