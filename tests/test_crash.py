"""
Crash safety (issue 9): C{kill -9} of the relay at random points, SQLite
writes interrupted by C{kill -9}, a corrupt queue entry, a full disk.

The kill loop needs hundreds of process starts; a fresh interpreter costs
over a second of imports, so the relay runs in processes forked from a
I{zygote}: a child Python process that imported everything once (with
the poll reactor, which holds no kernel object a fork would share) and
forks one relay per iteration on request.  Each relay is the real
service (L{Options} and L{makeService}, as C{twistd mtasts} builds it)
with real sockets, files and fsyncs; the test C{SIGKILL}s it.  A few
iterations use C{twistd} itself (L{RelayProcess}).

Figures go to C{<trial temp dir>/crash-figures.json} (C{_trial_temp/}, or
C{_trial_temp/<worker>/} under C{trial -jN}; C{MTASTS_CRASH_FIGURES=PATH}
overrides it; the report script reads it when present), and are printed.
C{MTASTS_CRASH_ITERATIONS} raises the number of forked iterations
(default 200).

The duplicate window: a relay killed after the MX answered 250 to the
final dot and before the outcome reached the envelope on disk delivers
that message again after restart (RFC 1047; nothing on our side can
close it).  A duplicate is counted as I{in the window} only when its
earlier copy arrived less than C{WINDOW} seconds before the kill of the
relay that delivered it and its later copy came from a later relay
process; any other duplicate fails the test.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
from itertools import pairwise
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mtasts_twisted.cache import POLICY_TABLE
from mtasts_twisted.relay import Queue
from mtasts_twisted.testing.smtp import Behaviour, Reply, SMTPTestServer
from mtasts_twisted.testing.world import LoopbackWorld
from mtasts_twisted.tlsrpt.schedule import RESULTS_TABLE

from .test_e2e_relay import RelayProcess, make_message, wait_until

#: Seconds between the MX's receipt of a copy and the kill of the relay
#: that sent it, within which a later second copy is the inherent window.
WINDOW = 1.0
SENDER = "sender@snd.test"
BOUNCE = "bounce@rcpt.test"
ID_RE = re.compile(rb"crash-\d+-\d+@snd\.test")

ZYGOTE = r'''
import json, os, signal, sys
from twisted.internet import pollreactor
pollreactor.install()
from twisted.internet import reactor
import mtasts_twisted.service, mtasts_twisted.relay, mtasts_twisted.delivery, mtasts_twisted.cache
import mtasts_twisted.store, mtasts_twisted.socketmap, mtasts_twisted.tlsrpt, mtasts_twisted.metrics
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel

def relay_child(argv, ready):
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from mtasts_twisted.service import Options, makeService
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    options = Options()
    options.parseOptions(argv)
    service = makeService(options, reactor, fatal=lambda code: os._exit(code))
    def started(ok):
        port = service.listeners["smtp"].port.getHost().port
        os.write(ready, f"ready {os.getpid()} {port} {ok}\n".encode())
    def start():
        service.startService()
        service.ready.addCallback(started)
    reactor.callWhenRunning(start)
    reactor.run()

def store_child(argv, ready):
    # Writes cache and TLSRPT result rows through the real Store, one at a
    # time, and acknowledges each once its write has completed.
    from twisted.internet.defer import ensureDeferred
    from mtasts_twisted.store import open_store
    url, tables = argv[0], argv[1:]
    async def run():
        store = await open_store(url, reactor, tables=tuple(tables))
        shelves = [store.shelf(t) for t in tables]
        os.write(ready, f"ready {os.getpid()} 0 True\n".encode())
        n = 0
        while True:
            key = f"{os.getpid()}-{n}"
            await shelves[n % len(shelves)].put(key, {"n": n, "pad": "x" * (n % 700)})
            os.write(ready, f"ack {key}\n".encode())
            n += 1
    reactor.callWhenRunning(lambda: ensureDeferred(run()).addErrback(lambda f: (f.printTraceback(), os._exit(3))))
    reactor.run()

for line in sys.stdin:
    kind, log, argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            ready = os.dup(1)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            (relay_child if kind == "relay" else store_child)(argv, ready)
        finally:
            os._exit(0)
    sys.stdout.write(f"forked {pid}\n")
    sys.stdout.flush()
'''


class Zygote(ProcessProtocol):
    """The forking parent; its stdout carries C{forked}/C{ready}/C{ack} lines."""

    def __init__(self) -> None:
        self.buffer = b""
        self.lines: list[str] = []
        self.ended: Deferred[None] = Deferred()
        self._waiters: list[tuple[re.Pattern[str], Deferred[re.Match[str]]]] = []
        self.err = b""

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for raw in lines:
            line = raw.decode()
            for item in list(self._waiters):
                match = item[0].fullmatch(line)
                if match:
                    self._waiters.remove(item)
                    item[1].callback(match)
                    break
            else:
                self.lines.append(line)  # for a later wait_line (each line is used once)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        for _, d in self._waiters:
            d.errback(AssertionError(f"zygote ended: {self.err.decode(errors='replace')}"))
        self._waiters = []
        self.ended.callback(None)

    def wait_line(self, pattern: str, timeout: float = 15) -> Deferred[re.Match[str]]:
        compiled = re.compile(pattern)
        d: Deferred[re.Match[str]] = Deferred()
        for line in self.lines:
            if compiled.fullmatch(line):
                self.lines.remove(line)
                d.callback(compiled.fullmatch(line))
                return d
        self._waiters.append((compiled, d))
        return d.addTimeout(timeout, reactor)

    async def fork(self, kind: str, log: str, argv: list[str]) -> tuple[int, int]:
        """Fork a child; return C{(pid, smtp port)} once it is ready."""
        self.transport.write(json.dumps([kind, log, argv]).encode() + b"\n")
        pid = int((await self.wait_line(r"forked (\d+)")).group(1))
        try:
            match = await self.wait_line(rf"ready {pid} (\d+) (\w+)")
        except (TimeoutError, AssertionError, CancelledError):
            kill_and_wait(pid)
            raise AssertionError("child not ready: " + tail(log)) from None
        if match.group(2) != "True":
            raise AssertionError("child failed to start: " + tail(log))
        return pid, int(match.group(1))


def tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")
    except OSError:
        return ""


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fill(path: str) -> None:
    """Write zeros to C{path} until the file system is full (at most 4 MiB)."""
    with open(path, "wb", buffering=0) as f:
        try:
            f.writelines(b"\0" * 4096 for _ in range(1024))
        except OSError:
            pass


def write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_and_wait(pid: int) -> None:
    """SIGKILL a zygote child and wait (bounded) until the kernel reaped it."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.002)


def send_one(port: int, recipients: list[str], message: bytes) -> bool:
    """Submit; C{True} only if the final dot got a 250 (the QUIT may fail)."""
    try:
        client = smtplib.SMTP("127.0.0.1", port, timeout=5)
    except OSError:
        return False
    try:
        client.ehlo("client.test")
        client.mail(SENDER)
        for r in recipients:
            code, _ = client.rcpt(r)
            if code != 250:
                return False
        code, _ = client.data(message)
        return code == 250
    except (smtplib.SMTPException, OSError):
        return False
    finally:
        try:
            client.close()
        except OSError:
            pass


HELO_GEN = re.compile(rb"(?i)^EHLO relay-g(\d+)\.test$")


class Arrivals:
    """
    Timestamps the MX's messages as they arrive (polled every 5 ms), with
    the generation of the relay process that sent each (from its EHLO
    name, C{relay-g<N>.test}).
    """

    def __init__(self, server: SMTPTestServer) -> None:
        self.server = server
        self.seen: list[tuple[float, int, Any]] = []
        self._counts: dict[int, int] = {}
        self.loop = LoopingCall(self.poll)
        self.loop.start(0.005)

    def poll(self) -> None:
        now = time.monotonic()
        for session in self.server.sessions:
            done = self._counts.get(id(session), 0)
            if len(session.messages) == done:
                continue
            self._counts[id(session)] = len(session.messages)
            gens = [HELO_GEN.match(c.line) for c in session.commands]
            gen = next((int(m.group(1)) for m in gens if m), -1)
            for m in session.messages[done:]:
                self.seen.append((now, gen, m))

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()


class CrashTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.world = LoopbackWorld.start(reactor)
        self.addCleanup(self.world.stop)
        pki = self.world.pki
        names = ("mx.rcpt.test", "mx.snd.test")
        self.mx = SMTPTestServer(Behaviour(
            certificates_by_name={n: pki.valid(n) for n in names}, hostname="mx.test",
            recipient_replies={BOUNCE: Reply(550, "5.1.1 no such user")}))
        self.mx.start()
        self.addCleanup(self.mx.stop)
        self.world.add_mx("rcpt.test", "mx.rcpt.test")
        self.world.add_mx("snd.test", "mx.snd.test")
        self.world.add_mx("held.test", "mx.held.test")
        self.base = os.path.abspath(self.mktemp())
        self.dir = os.path.join(self.base, "data")
        os.makedirs(self.dir)
        self.log = os.path.join(self.base, "relay.log")
        self.children: set[int] = set()

    async def zygote(self) -> Zygote:
        proto = Zygote()
        process = reactor.spawnProcess(proto, sys.executable, [sys.executable, "-c", ZYGOTE],
                                       env=dict(os.environ), path=self.base)

        async def stop() -> None:
            for pid in list(self.children):
                kill_and_wait(pid)
            if not proto.ended.called:
                process.signalProcess("KILL")
                await proto.ended

        self.addCleanup(stop)
        return proto

    def relay_argv(self, extra: tuple[str, ...] = (), helo: str = "relay.test") -> list[str]:
        return ["--data-dir", self.dir, "--nameserver", self.world.dns.nameserver,
                "--ca-file", self.world.ca_file, "--smtp", "tcp:0:interface=127.0.0.1",
                "--socketmap", "none", "--metrics", "none", "--helo-name", helo,
                "--no-reports", "--delivery-port", str(self.mx.port), *extra]

    async def fork_relay(self, zygote: Zygote, extra: tuple[str, ...] = (), helo: str = "relay.test") -> tuple[int, int]:
        pid, port = await zygote.fork("relay", self.log, self.relay_argv(extra, helo))
        self.children.add(pid)
        return pid, port

    def kill(self, pid: int) -> None:
        kill_and_wait(pid)
        self.children.discard(pid)
        self.assertFalse(alive(pid))

    def queued(self) -> list[Any]:
        return Queue(os.path.join(self.dir, "queue")).list()

    # -- the kill loop ------------------------------------------------------

    async def test_kill9_loop(self) -> None:
        """
        C{kill -9} at random points during accept, queueing, delivery and
        DSN creation, C{MTASTS_CRASH_ITERATIONS} times (200) plus a few
        twistd iterations: every message that got a 250 arrives at the MX
        at least once and at most once (save the documented window), or is
        still queued; so does the DSN of each one with a bouncing
        recipient.
        """
        iterations = int(os.environ.get("MTASTS_CRASH_ITERATIONS", "200"))
        per_iteration = 4
        rng = random.Random(os.environ.get("MTASTS_CRASH_SEED", str(time.time_ns())))
        zygote = await self.zygote()
        arrivals = Arrivals(self.mx)
        self.addCleanup(arrivals.stop)
        accepted: dict[str, bool] = {}  # message id -> has a bouncing recipient
        submitted = 0
        kills: list[float] = []  # monotonic time of each kill, by generation
        started = time.monotonic()

        async def one_generation(gen: int, start: Any, kill: Any, delay: float) -> None:
            nonlocal submitted
            port = await start()
            sends = []
            for k in range(per_iteration):
                ident = f"crash-{gen}-{k}@snd.test"
                bounce = rng.random() < 0.3
                recipients = [f"r{gen}-{k}@rcpt.test"] + ([BOUNCE] if bounce else [])
                message = make_message(SENDER, recipients[0], f"crash {gen}", ident)
                d = deferToThread(send_one, port, recipients, message)
                d.addCallback(lambda ok, i=ident, b=bounce: accepted.__setitem__(i, b) if ok else None)
                sends.append(d)
                submitted += 1
            await deferLater(reactor, delay)
            await kill()
            kills.append(time.monotonic())
            await DeferredList(sends)

        gen = 0
        for _ in range(iterations):
            pid_box: list[int] = []

            async def start(gen: int = gen, pid_box: list[int] = pid_box) -> int:
                pid, port = await self.fork_relay(zygote, helo=f"relay-g{gen}.test")
                pid_box.append(pid)
                return port

            async def kill(pid_box: list[int] = pid_box) -> None:
                self.kill(pid_box[0])

            await one_generation(gen, start, kill, rng.uniform(0.0, 0.25))
            gen += 1
        # a few iterations with twistd itself
        twistd_iterations = 3
        for _ in range(twistd_iterations):
            relay = RelayProcess(self, self.world, self.dir, [str(self.mx.port)])
            relay.helo_name = f"relay-g{gen}.test"

            async def start_twistd(relay: RelayProcess = relay) -> int:
                await relay.start()
                return relay.smtp_port

            await one_generation(gen, start_twistd, relay.kill9, rng.uniform(0.0, 0.5))
            gen += 1
        # the final relay delivers what is left
        pid, _ = await self.fork_relay(zygote, helo=f"relay-g{gen}.test")
        try:
            await wait_until(lambda: not self.queued(), 60, "the queue to drain after the last restart",
                             step=0.1)
            await deferLater(reactor, 0.5)  # anything late would show up now
        finally:
            self.kill(pid)
        kills.append(time.monotonic())
        arrivals.poll()
        arrivals.stop()

        # -- accounting ---------------------------------------------------
        originals: dict[str, list[int]] = {}
        dsns: dict[str, list[int]] = {}  # DSN copies by the DSN's own Message-ID
        dsn_of: dict[str, dict[str, int]] = {}  # original id -> DSN id -> generation that made it
        for index, (_, gen_of, m) in enumerate(arrivals.seen):
            self.assertGreaterEqual(gen_of, 0, m)
            self.assertTrue(m.tls, "a copy arrived without TLS")
            if not m.accepted:
                continue
            found = ID_RE.search(m.data)
            self.assertIsNotNone(found, m.data[:300])
            ident = found.group(0).decode()
            if m.mail_from == SENDER:
                self.assertEqual(m.recipients[:1], (f"r{ident.split('-')[1]}-{ident.split('-')[2].split('@')[0]}@rcpt.test",))
                originals.setdefault(ident, []).append(index)
            else:
                self.assertEqual((m.mail_from, m.recipients), ("", (SENDER,)))
                self.assertIn(b"Status: 5.1.1", m.data)
                own = re.search(rb"(?im)^Message-ID:\s*(<[^>]+>)", m.data).group(1).decode()
                maker = int(re.search(rb"Reporting-MTA: dns; relay-g(\d+)\.test", m.data).group(1))
                dsns.setdefault(own, []).append(index)
                dsn_of.setdefault(ident, {})[own] = maker
        still_queued = {ID_RE.search(read_bytes(os.path.join(self.dir, "queue", q.id, "message"))).group(0)
                        .decode() for q in self.queued()}

        def window_duplicates(copies: dict[str, list[int]]) -> tuple[int, list[str]]:
            in_window, outside = 0, []
            for ident, indexes in copies.items():
                for earlier, later in pairwise(indexes):
                    (t1, g1, _), (_, g2, _) = arrivals.seen[earlier], arrivals.seen[later]
                    before_kill = kills[g1] - t1
                    # the final relay (the last generation) is not killed mid-way
                    if g2 > g1 and g1 < len(kills) - 1 and before_kill < WINDOW:
                        in_window += 1
                    else:
                        outside.append(f"{ident}: copies in generations {g1} and {g2}, "
                                       f"{before_kill} s before the kill")
            return in_window, outside

        lost = [i for i in accepted if i not in originals and i not in still_queued]
        lost_dsns = [i for i, bounce in accepted.items() if bounce and i not in dsn_of and i not in still_queued]
        # Several DSNs about one message: only from a kill between queueing
        # the DSN and recording the failure, so each by another generation.
        same_maker = {i: made for i, made in dsn_of.items() if len(set(made.values())) != len(made)}
        dup_window, dup_outside = window_duplicates(originals)
        dsn_window, dsn_outside = window_duplicates(dsns)
        figures = {
            "kill_iterations": iterations + twistd_iterations,
            "forked_iterations": iterations,
            "twistd_iterations": twistd_iterations,
            "messages_submitted": submitted,
            "messages_accepted": len(accepted),
            "messages_delivered": sum(1 for i in accepted if i in originals),
            "unaccepted_delivered": sum(1 for i in originals if i not in accepted),
            "still_queued": len(still_queued),
            "duplicates": sum(len(v) - 1 for v in originals.values()),
            "duplicates_in_window": dup_window,
            "duplicates_outside_window": len(dup_outside),
            "dsns_expected": sum(1 for b in accepted.values() if b),
            "dsns_delivered": sum(1 for i, b in accepted.items() if b and i in dsn_of),
            "dsn_duplicates": sum(len(v) - 1 for v in dsns.values()),
            "dsn_duplicates_in_window": dsn_window,
            "dsns_made_again": sum(len(v) - 1 for v in dsn_of.values()),
            "lost": len(lost),
            "lost_dsns": len(lost_dsns),
            "seconds": round(time.monotonic() - started, 1),
        }
        # trial runs in its temp dir (_trial_temp, or _trial_temp/N under -jN)
        path = os.path.abspath(os.environ.get("MTASTS_CRASH_FIGURES", "crash-figures.json"))
        write_json(path, figures)
        print(f"\ncrash figures ({path}): {json.dumps(figures, sort_keys=True)}")
        self.assertEqual(lost, [], tail(self.log))
        self.assertEqual(lost_dsns, [])
        self.assertEqual(dup_outside, [])
        self.assertEqual(dsn_outside, [])
        self.assertEqual(same_maker, {})
        self.assertGreater(len(accepted), iterations)  # the loop really submitted mail
        self.assertNotIn("Traceback", tail(self.log, 10**7).replace("Unhandled Error", ""), "see relay.log")

    # -- SQLite --------------------------------------------------------------

    async def test_sqlite_survives_kill9(self) -> None:
        """
        The SQLite store (cache and TLSRPT result tables) killed at random
        points of a write load: it reopens, C{PRAGMA integrity_check} is
        C{ok}, and every write acknowledged before the kill is there.
        """
        zygote = await self.zygote()
        url = "sqlite:" + os.path.join(self.dir, "mtasts.sqlite")
        rng = random.Random()
        acked: list[str] = []
        for _ in range(15):
            zygote.lines.clear()
            pid, _ = await zygote.fork("store", self.log, [url, POLICY_TABLE, RESULTS_TABLE])
            self.children.add(pid)
            await deferLater(reactor, rng.uniform(0.02, 0.25))
            self.kill(pid)
            await deferLater(reactor, 0.01)
            acked += [line.split()[1] for line in zygote.lines if line.startswith(f"ack {pid}-")]
            conn = sqlite3.connect(os.path.join(self.dir, "mtasts.sqlite"))
            try:
                self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
                keys = set()
                for table in (POLICY_TABLE, RESULTS_TABLE):
                    keys |= {row[0] for row in conn.execute(f'SELECT key FROM "{table}"')}
            finally:
                conn.close()
            missing = [k for k in acked if k not in keys]
            self.assertEqual(missing, [], tail(self.log))
        self.assertGreater(len(acked), 15, tail(self.log))

    # -- a corrupt queue entry ------------------------------------------------

    async def test_corrupt_queue_entry_quarantined(self) -> None:
        """
        A message whose envelope is cut short (as by a torn write) is
        moved to C{queue/quarantine/} with a log line at restart, not
        dropped; the intact message next to it is delivered.
        """
        queue = Queue(os.path.join(self.dir, "queue"))
        good = queue.enqueue(SENDER, ["good@rcpt.test"], make_message(SENDER, "good@rcpt.test", "ok", "crash-0-1@snd.test"))
        bad = queue.enqueue(SENDER, ["bad@rcpt.test"], make_message(SENDER, "bad@rcpt.test", "x", "crash-0-2@snd.test"))
        envelope = os.path.join(queue.directory, bad.id, "envelope.json")
        data = read_bytes(envelope)
        os.truncate(envelope, len(data) // 2)
        zygote = await self.zygote()
        pid, _ = await self.fork_relay(zygote)
        try:
            await wait_until(lambda: self.mx.messages, 20, "delivery of the intact message")
            await wait_until(lambda: good.id not in os.listdir(queue.directory), 10, "its removal")
        finally:
            self.kill(pid)
        self.assertEqual([m.recipients for m in self.mx.messages], [("good@rcpt.test",)])
        [entry] = os.listdir(os.path.join(queue.directory, "quarantine"))
        self.assertTrue(entry.startswith(bad.id + "."), entry)
        kept = os.path.join(queue.directory, "quarantine", entry)
        self.assertEqual(sorted(os.listdir(kept)), ["envelope.json", "message"])
        self.assertIn(b"crash-0-2@snd.test", read_bytes(os.path.join(kept, "message")))
        self.assertIn(f"queue entry {bad.id} quarantined", tail(self.log, 10**6))
        self.assertNotIn(good.id, os.listdir(queue.directory))

    # -- disk full -------------------------------------------------------------

    async def test_disk_full_452(self) -> None:
        """
        The queue on a 2 MiB tmpfs, filled up: the relay answers 452 to new
        mail, the message already queued stays intact, and once space is
        freed mail is accepted again.
        """
        queue_dir = os.path.join(self.dir, "queue")
        os.makedirs(queue_dir)
        if os.geteuid() != 0:
            if os.environ.get("CI") == "true":
                self.fail("disk-full test needs root to mount a tmpfs, and CI=true")
            raise SkipTest("disk-full test needs root to mount a tmpfs")
        result = run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", queue_dir)
        if result.returncode != 0:
            if os.environ.get("CI") == "true":
                self.fail(f"cannot mount a tmpfs (CI=true): {result.stderr.strip()}")
            raise SkipTest(f"cannot mount a tmpfs: {result.stderr.strip()}")
        self.addCleanup(run, "umount", "-l", queue_dir)
        # mx.held.test's port refuses connections: the first message stays queued
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
        s.close()
        zygote = await self.zygote()
        pid, port = await self.fork_relay(zygote, ("--delivery-port", f"mx.held.test={closed}"))
        self.addCleanup(lambda: self.kill(pid))
        first = make_message(SENDER, "a@held.test", "held", "crash-1-1@snd.test")
        self.assertTrue(await deferToThread(send_one, port, ["a@held.test"], first))
        [held] = await wait_until(lambda: [m for m in self.queued() if m.attempts >= 1], 20, "an attempt")
        # fill the file system
        filler = os.path.join(queue_dir, "filler")
        fill(filler)
        code = await deferToThread(self._send_code, port, make_message(SENDER, "b@rcpt.test", "full", "crash-1-2@snd.test"))
        self.assertEqual(code, 452)
        self.assertEqual([m.id for m in self.queued()], [held.id])
        body = read_bytes(os.path.join(queue_dir, held.id, "message"))
        self.assertEqual(len(body), held.size)
        self.assertIn(b"crash-1-1@snd.test", body)
        self.assertEqual([n for n in os.listdir(queue_dir) if n.startswith("tmp-")], [])
        self.assertFalse(os.path.exists(os.path.join(queue_dir, "quarantine")))
        self.assertTrue(alive(pid))
        os.unlink(filler)
        self.assertTrue(await deferToThread(send_one, port, ["c@rcpt.test"],
                                            make_message(SENDER, "c@rcpt.test", "ok", "crash-1-3@snd.test")))
        await wait_until(lambda: self.mx.messages, 20, "delivery after space was freed")
        self.assertEqual([m.recipients for m in self.mx.messages], [("c@rcpt.test",)])
        self.assertIn(held.id, [m.id for m in self.queued()])

    @staticmethod
    def _send_code(port: int, message: bytes) -> int:
        """The first non-2xx/3xx code of a submission (or 250)."""
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            try:
                client.sendmail(SENDER, ["b@rcpt.test"], message)
            except smtplib.SMTPSenderRefused as e:
                return e.smtp_code
            except smtplib.SMTPDataError as e:
                return e.smtp_code
            except smtplib.SMTPRecipientsRefused as e:
                return next(iter(e.recipients.values()))[0]
            return 250


class UnwritableEnvelopeTests(SynchronousTestCase):
    """
    The workers when an outcome cannot be written (disk full): the
    delivered recipient is not delivered again at every poll, and the
    outcome reaches the disk once there is room.
    """

    def test_delivered_not_repeated_while_disk_full(self) -> None:
        from mtasts_twisted.delivery import Status
        from mtasts_twisted.relay import QueueFullError, UnknownMessageError
        from mtasts_twisted.relay import RelayService, RelaySettings

        from .test_relay import MESSAGE, FakeDeliverer

        directory = self.mktemp()
        clock = Clock()
        clock.advance(1_700_000_000)
        settings = RelaySettings(reporting_mta="relay.test", poll_interval=5)
        queue = settings.make_queue(directory, clock=clock)
        deliverer = FakeDeliverer()
        service = RelayService(queue, deliverer, settings, clock)
        message = queue.enqueue("a@example.org", ["b@example.com", "c@example.net"], MESSAGE)
        full = [True]
        real_update = queue.update

        def update(m: Any) -> None:
            if full[0]:
                raise QueueFullError("disk full: [Errno 28] No space left on device")
            real_update(m)

        queue.update = update  # type: ignore[method-assign]
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(sorted(c[1][0] for c in deliverer.calls), ["b@example.com", "c@example.net"])
        first = next(i for i, c in enumerate(deliverer.calls) if c[1] == ["b@example.com"])
        deliverer.fire(first, Status.DELIVERED)
        self.assertIn(message.id, service.unwritten)
        clock.pump([5] * 6)  # six polls with the disk still full
        self.assertEqual(len(deliverer.calls), 2, "b@example.com delivered again")
        full[0] = False
        clock.advance(5)
        self.assertEqual(service.unwritten, {})
        [state] = [r for r in queue.get(message.id).recipients if r.address == "b@example.com"]
        self.assertEqual(state.state.value, "delivered")
        self.assertEqual(len(deliverer.calls), 2)
        other = 1 - first
        deliverer.fire(other, Status.DELIVERED)
        self.assertRaises(UnknownMessageError, queue.get, message.id)
        self.flushLoggedErrors()
