"""
C{twistd mtasts} in a real subprocess on loopback ports: it serves the
socketmap from a cache pre-seeded in its SQLite file, refuses bad options
and a port in use with one line, and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time

from twisted.internet import reactor, utils
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase

from mtasts_twisted.cache import POLICY_TABLE, CacheEntry
from mtasts_twisted.policy import parse_policy
from mtasts_twisted.socketmap import encode_netstring
from mtasts_twisted.store import default_database_url, open_store
from mtasts_twisted.testing.dns import DNSTestServer

from .test_service import socketmap_query

#: C{python -m twisted.scripts.twistd} runs nothing (the module has no
#: C{__main__} block), so run twistd's entry point the way its script does.
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]
ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmax_age: 86400\n"
STARTED = re.compile(rb"mtasts started: [^\n]*socketmap on 127\.0\.0\.1:(\d+)")


class Twistd(ProcessProtocol):
    """A twistd subprocess whose output is collected."""

    def __init__(self) -> None:
        self.output = b""
        #: fires with C{(exit code, signal)}
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()
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
            d.errback(AssertionError(f"twistd ended:\n{self.output.decode(errors='replace')}"))
        self._waiting = []
        value = reason.value
        self.ended.callback((value.exitCode, value.signal))

    def wait_for(self, pattern: re.Pattern[bytes]) -> Deferred[re.Match[bytes]]:
        d: Deferred[re.Match[bytes]] = Deferred()
        match = pattern.search(self.output)
        if match:
            d.callback(match)
        else:
            self._waiting.append((pattern, d))
        return d


class TwistdTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dns = DNSTestServer()
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def args(self, *extra: str) -> list[str]:
        return [sys.executable, *TWISTD, "-n", "--pidfile=", "mtasts", "--data-dir", self.dir,
                "--nameserver", self.dns.nameserver, "--smtp", "none", *extra]

    def spawn(self, *extra: str) -> Twistd:
        proto = Twistd()
        process = reactor.spawnProcess(proto, sys.executable, self.args(*extra), env=dict(os.environ),
                                       path=self.dir)

        def kill() -> Deferred[tuple[int | None, int | None]] | None:
            if proto.ended.called:
                return None
            process.signalProcess("KILL")
            return proto.ended

        self.addCleanup(kill)
        return proto

    async def seed(self, domain: str, policy: str, record_id: str) -> None:
        store = await open_store(default_database_url(self.dir), reactor)
        now = time.time()
        entry = CacheEntry(domain=domain, alabel=domain, inserted=now, last_update=now, last_use=now,
                           record_id=record_id, policy=parse_policy(policy), valid_end=now + 86400)
        await store.shelf(POLICY_TABLE).put(domain, entry.to_json())
        await store.close()

    async def test_serves_and_stops(self) -> None:
        """
        A cached enforce policy is served over the socketmap; on SIGTERM
        twistd shuts down cleanly and then, as twistd does since Twisted
        19.7, ends itself with that signal.
        """
        await self.seed("example.com", ENFORCE, "1")
        self.dns.add_txt("_mta-sts.example.com", "v=STSv1; id=1")
        self.dns.add_mx("example.com", 10, "mx1.example.com")
        proto = self.spawn("--socketmap", "tcp:0:interface=127.0.0.1", "--no-reports")
        port = int((await proto.wait_for(STARTED)).group(1))
        answer = await socketmap_query(port, "example.com")
        self.assertEqual(answer, encode_netstring(b"OK secure match=mx1.example.com servername=hostname"))
        answer = await socketmap_query(port, "no-policy.example")
        self.assertEqual(answer, encode_netstring(b"NOTFOUND "))
        os.kill(proto.transport.pid, signal.SIGTERM)
        code, sig = await proto.ended
        self.assertIn((code, sig), [(0, None), (None, signal.SIGTERM)], proto.output)
        self.assertIn(b"Server Shut Down", proto.output)
        self.assertNotIn(b"Traceback", proto.output)

    async def test_bad_option(self) -> None:
        """A bad option: exit status 1 and one line on stderr saying what is wrong, no usage."""
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, self.args("--nameserver", "dns.example")[1:], env=dict(os.environ), path=self.dir)
        self.assertEqual((code, out), (1, b""), err)
        self.assertEqual(err.decode().splitlines(),
                         ["twistd mtasts: --nameserver: invalid nameserver 'dns.example': 'dns.example' is not an IP"
                          " address (use IP, IP:PORT or [IPv6]:PORT; host names are not allowed)"])

    async def test_startup_errors_are_one_line(self) -> None:
        """
        Every error found before the service starts (an unknown option, a
        config file that is not TOML, a bad endpoint, a data directory that
        cannot be used) is one line on stderr and exit status 1.
        """
        bad_toml = os.path.join(self.dir, "bad.toml")
        with open(bad_toml, "w") as f:
            f.write("data-dir = \n")
        a_file = os.path.join(self.dir, "a-file")
        with open(a_file, "w") as f:
            f.write("")
        for extra, fragment in [
            (["--bogus"], "--bogus"),
            (["--config", bad_toml], "not valid TOML"),
            (["--socketmap", "tcp:notaport"], "--socketmap 'tcp:notaport': not a valid endpoint"),
            (["--data-dir", a_file], f"--data-dir {a_file}: not a directory"),
            (["--data-dir", os.path.join(a_file, "sub")], f"{a_file} is not a directory"),
        ]:
            out, err, code = await utils.getProcessOutputAndValue(
                sys.executable, self.args(*extra)[1:], env=dict(os.environ), path=self.dir)
            lines = err.decode().splitlines()
            self.assertEqual((code, out, len(lines)), (1, b"", 1), (extra, out + err))
            self.assertTrue(lines[0].startswith("twistd mtasts: "), lines)
            self.assertIn(fragment, lines[0])

    async def test_port_in_use(self) -> None:
        """A port in use: exit status 1, one line, no traceback."""
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, self.args("--socketmap", f"tcp:{port}:interface=127.0.0.1")[1:],
            env=dict(os.environ), path=self.dir)
        self.assertEqual(code, 1, out + err)
        lines = [line for line in (out + err).decode().splitlines() if "cannot listen" in line]
        self.assertEqual(len(lines), 1, out + err)
        self.assertIn(f"--socketmap tcp:{port}:interface=127.0.0.1", lines[0])
        self.assertIn("Address already in use", lines[0])
        self.assertNotIn(b"Traceback", out + err)
