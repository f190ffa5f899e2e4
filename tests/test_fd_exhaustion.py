"""
File descriptor exhaustion against the real service (issue 17.1):
C{twistd -n mtasts} in a subprocess under a low C{RLIMIT_NOFILE}
(C{ulimit -n}, soft and hard, so the service cannot raise it), with a
deferred message in its queue, a loopback MX server and the test DNS.

  - The issue's reproduction: 1,030 idle socketmap connections held under
    C{ulimit -n 1024} for two queue polls, then closed; C{queue retry}.
    The connection caps, sized under the limit, keep the service's
    descriptors below it (counted in C{/proc/PID/fd}) and the poll goes on:
    the message is delivered.
  - A real exhaustion inside the service (descriptors taken until
    C{EMFILE}, as a leak or a burst would), held until a queue poll fails,
    then given back; C{queue retry}: the poll survived its error and the
    message is delivered.  How long after the descriptors came back that
    took is logged (C{fd exhaustion recovery}) for tests/RELIABILITY.md.

Bounds on counts only; the waits are bounded (no timing assertions).
"""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from mtasts_twisted.relay import Queue
from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer
from mtasts_twisted.testing.world import LoopbackWorld

from .test_e2e_relay import cli, make_message, policy_text, seed_policy, wait_until
from .test_faults import probe
from .test_twistd import Twistd

log = Logger()

SMTP_PORT = re.compile(rb"mtasts started: [^\n]*smtp on 127\.0\.0\.1:(\d+)")
SOCKETMAP_PORT = re.compile(rb"mtasts started: [^\n]*socketmap on 127\.0\.0\.1:(\d+)")
POLL_FAILED = re.compile(rb"periodic task relay queue poll failed")
HOGGED = re.compile(rb"hogged (\d+) file descriptors")
RELEASED = re.compile(rb"released (\d+) file descriptors")
#: The relay's poll interval (RelaySettings default).
POLL = 5.0

#: twistd, plus a control that takes every free descriptor while the file
#: DATA/hog exists and gives them back once DATA/release exists (checked
#: with stat, which needs no descriptor).
HOG_TWISTD = r"""
import os, sys
from twisted.internet import reactor, task
data = sys.argv[1]
hogged = []
state = {"done": False}
def control():
    if state["done"]:
        return
    if os.path.exists(os.path.join(data, "release")) and hogged:
        count = len(hogged)
        while hogged:
            os.close(hogged.pop())
        state["done"] = True
        print(f"released {count} file descriptors", flush=True)
    elif os.path.exists(os.path.join(data, "hog")) and not hogged:
        while True:
            try:
                hogged.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        print(f"hogged {len(hogged)} file descriptors", flush=True)
reactor.callWhenRunning(task.LoopingCall(control).start, 0.05)
from twisted.scripts.twistd import run
sys.argv = ["twistd"] + sys.argv[2:]
run()
"""

#: Opens N connections to a port (with its own raised limit), reports how
#: many the server left open when told, closes them all when told.
HOLDER = r"""
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, count = int(sys.argv[1]), int(sys.argv[2])
held, failed = [], 0
for _ in range(count):
    try:
        held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except OSError:
        failed += 1
        if failed >= 3:
            break
print("opened", len(held), flush=True)
sys.stdin.readline()
still_open = 0
for s in held:
    s.setblocking(False)
    try:
        still_open += s.recv(1) != b""
    except BlockingIOError:
        still_open += 1
    except OSError:
        pass
print("open", still_open, flush=True)
sys.stdin.readline()
for s in held:
    s.close()
print("closed", flush=True)
"""


class Lines(ProcessProtocol):
    """A helper subprocess: its output, and a line written to it on request."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()
        self._waiting: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for item in list(self._waiting):
            match = item[0].search(self.output)
            if match:
                self._waiting.remove(item)
                item[1].callback(match)

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        for _, d in self._waiting:
            d.errback(AssertionError(f"helper ended:\n{self.output.decode(errors='replace')}"))
        self._waiting = []
        self.ended.callback(None)

    def wait_for(self, pattern: re.Pattern[bytes], timeout: float = 60) -> Deferred[re.Match[bytes]]:
        d: Deferred[re.Match[bytes]] = Deferred()
        match = pattern.search(self.output)
        if match:
            d.callback(match)
        else:
            self._waiting.append((pattern, d))
        return d.addTimeout(timeout, reactor)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class FDExhaustionTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("needs /proc")
        self.world = LoopbackWorld.start(reactor)
        self.addCleanup(self.world.stop)
        pki = self.world.pki
        self.mx = SMTPTestServer(Behaviour(certificate=pki.valid("mx.good.test"), hostname="mx.good.test"))
        self.mx.start()
        self.addCleanup(self.mx.stop)
        self.world.add_mx("good.test", "mx.good.test")
        self.world.dns.add_txt("_mta-sts.good.test", "v=STSv1; id=1")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    async def deferred_message(self) -> str:
        """A message that failed once and is not due for a day (only a retry brings it back)."""
        await seed_policy(self.dir, "good.test", policy_text("mx.good.test"))
        queue = Queue(os.path.join(self.dir, "queue"))
        message = queue.enqueue("alice@sender.test", ["bob@good.test"],
                                make_message("alice@sender.test", "bob@good.test", "fd", "fd-1@sender.test"))
        bob = attrs.evolve(message.recipients[0], attempts=1, next_attempt=time.time() + 86400,
                           reason="421 4.7.0 try later")
        queue.update(attrs.evolve(message.with_recipient(bob), attempts=1))
        return message.id

    def twistd_argv(self) -> list[str]:
        return ["-n", "--pidfile=", "mtasts", "--data-dir", self.dir,
                "--nameserver", self.world.dns.nameserver, "--ca-file", self.world.ca_file,
                "--smtp", "tcp:0:interface=127.0.0.1", "--socketmap", "tcp:0:interface=127.0.0.1",
                "--metrics", "none", "--helo-name", "relay.test", "--no-reports",
                "--delivery-port", str(self.mx.port)]

    def spawn(self, limit: int, script: str, *args: str) -> tuple[Twistd, int]:
        """Run C{python -c script args} under C{ulimit -n limit}; its pid."""
        proto = Twistd()
        argv = ["sh", "-c", f'ulimit -n {limit} && exec "$0" "$@"', sys.executable, "-c", script, *args]
        process = reactor.spawnProcess(proto, "/bin/sh", argv, env=dict(os.environ), path=self.dir)

        def kill() -> Deferred[Any] | None:
            if proto.ended.called:
                return None
            process.signalProcess("KILL")
            return proto.ended

        self.addCleanup(kill)
        return proto, process.pid

    async def retried_and_delivered(self, ident: str, released_at: float) -> float:
        out, err, code = await cli("queue", "retry", ident, "--data-dir", self.dir)
        self.assertEqual(code, 0, err)
        await wait_until(lambda: self.mx.messages, 60, "the retried message at the MX")
        return time.monotonic() - released_at

    async def test_idle_socketmap_connections_under_1024(self) -> None:
        """The issue's reproduction: 1,030 idle socketmap connections under ulimit -n 1024."""
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard < 1100:
            raise SkipTest(f"the connection holder needs more than {hard} descriptors")
        ident = await self.deferred_message()
        twistd, pid = self.spawn(1024, "from twisted.scripts.twistd import run; run()", *self.twistd_argv())
        socketmap = int((await twistd.wait_for(SOCKETMAP_PORT).addTimeout(60, reactor)).group(1))
        self.assertIn(b"file descriptors: soft limit 1024", twistd.output)
        holder = Lines()
        reactor.spawnProcess(holder, sys.executable, [sys.executable, "-c", HOLDER, str(socketmap), "1030"],
                             env=dict(os.environ))
        self.addCleanup(lambda: holder.ended if not holder.ended.called else None)
        self.addCleanup(lambda: holder.transport.loseConnection() if not holder.ended.called else None)
        await holder.wait_for(re.compile(rb"opened (\d+)"), 120)
        # Held through two queue polls.
        peak = 0
        for _ in range(int(2 * POLL / 0.5) + 2):
            peak = max(peak, open_fds(pid))
            await deferLater(reactor, 0.5)
        holder.transport.write(b"count\n")
        still_open = int((await holder.wait_for(re.compile(rb"open (\d+)"))).group(1))
        holder.transport.write(b"close\n")
        await holder.wait_for(re.compile(rb"closed"))
        released_at = time.monotonic()
        log.info("idle socketmap connections: {open} of 1030 kept open, {peak} descriptors at most of 1024",
                 open=still_open, peak=peak)
        probe("fd_exhaustion_socketmap_kept", still_open)
        self.assertLessEqual(still_open, 387)  # the socketmap's cap at 1024 (test_fdlimits)
        self.assertLess(peak, 1024)
        self.assertNotIn(b"Too many open files", twistd.output)
        await self.retried_and_delivered(ident, released_at)
        self.assertEqual(list(self.mx.messages[0].recipients), ["bob@good.test"])

    async def test_exhaustion_inside_the_service(self) -> None:
        """Every descriptor taken until a poll fails, then given back: the poll goes on."""
        ident = await self.deferred_message()
        twistd, pid = self.spawn(256, HOG_TWISTD, self.dir, *self.twistd_argv())
        await twistd.wait_for(SMTP_PORT).addTimeout(60, reactor)
        open(os.path.join(self.dir, "hog"), "w").close()
        hogged = int((await twistd.wait_for(HOGGED).addTimeout(30, reactor)).group(1))
        self.assertGreater(hogged, 100)
        self.assertEqual(open_fds(pid), 256)  # every descriptor taken
        await twistd.wait_for(POLL_FAILED).addTimeout(3 * POLL, reactor)
        open(os.path.join(self.dir, "release"), "w").close()
        await twistd.wait_for(RELEASED).addTimeout(30, reactor)
        released_at = time.monotonic()
        recovery = await self.retried_and_delivered(ident, released_at)
        log.info("fd exhaustion recovery: the retried message reached the MX {seconds:.1f} s after the"
                 " descriptors came back (poll every {poll} s)", seconds=recovery, poll=POLL)
        probe("fd_exhaustion_recovery_seconds", round(recovery, 1))
        self.assertEqual(list(self.mx.messages[0].recipients), ["bob@good.test"])
        self.assertIn(b"Too many open files", twistd.output)  # what the failed poll said
