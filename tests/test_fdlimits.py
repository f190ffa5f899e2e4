"""
Tests for L{mtasts_twisted.service.fdlimits}: the soft C{RLIMIT_NOFILE} is
raised to the hard limit at start, and the listeners' connection caps are
sized so that they, the deliveries and a reserve fit under it (issue 17.1);
the service passes the caps to the socketmap and the SMTP intake and logs
the figures.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mtasts_twisted import service
from mtasts_twisted.service import tap
from mtasts_twisted.service.fdlimits import RESERVE, FDLimit, size_connection_caps
from mtasts_twisted.testing.dns import DNSTestServer

from .test_service import EPHEMERAL, parse


class SizingTests(SynchronousTestCase):
    def test_defaults_fit(self) -> None:
        """With a usual hard limit the defaults stand."""
        caps = size_connection_caps(1_048_576)
        self.assertEqual((caps.socketmap, caps.smtp, caps.smtp_per_ip, caps.scaled), (1024, 100, 20, False))
        self.assertEqual(caps.deliveries, 3 * 20 + 50)
        self.assertEqual(caps.used, 2 * 1124 + 110 + RESERVE)

    def test_smallest_limit_for_the_defaults(self) -> None:
        """2 x (1024 + 100) + 110 + 64 = 2422 descriptors keep the defaults."""
        self.assertFalse(size_connection_caps(2422).scaled)
        self.assertTrue(size_connection_caps(2421).scaled)

    def test_scaled_at_1024(self) -> None:
        """ulimit -n 1024 (the issue's setting): both caps scaled, all of it fits."""
        caps = size_connection_caps(1024)
        self.assertTrue(caps.scaled)
        self.assertEqual((caps.socketmap, caps.smtp, caps.smtp_per_ip), (387, 38, 20))
        self.assertLessEqual(caps.used, 1024)
        self.assertIn("<= 1024 file descriptors", caps.describe())

    def test_every_limit_fits(self) -> None:
        """From a tiny limit up, what is counted stays under the limit (each listener keeps one)."""
        for limit in range(RESERVE + 110 + 4, 5000, 7):
            caps = size_connection_caps(limit)
            self.assertLessEqual(caps.used, limit, limit)
            self.assertGreaterEqual(min(caps.socketmap, caps.smtp, caps.smtp_per_ip), 1, limit)
            self.assertLessEqual(caps.smtp_per_ip, caps.smtp)

    def test_one_listener(self) -> None:
        caps = size_connection_caps(512, smtp=0, smtp_per_ip=0, delivery_slots=0, parked_sessions=0)
        self.assertEqual((caps.smtp, caps.socketmap), (0, (512 - RESERVE) // 2))
        caps = size_connection_caps(512, socketmap=0)
        self.assertEqual((caps.socketmap, caps.smtp), (0, 100))


RAISE = (
    "import resource\n"
    "from mtasts_twisted.service.fdlimits import raise_fd_limit\n"
    "limit = raise_fd_limit()\n"
    "print(limit.before, limit.soft, limit.hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
)


class RaiseTests(SynchronousTestCase):
    def run_with(self, ulimit: str) -> list[str]:
        done = subprocess.run(["sh", "-c", f'{ulimit} && exec "$0" -c "$1"', sys.executable, RAISE],
                              capture_output=True, text=True, timeout=60)
        if done.returncode and "ulimit" in done.stderr:
            raise SkipTest(done.stderr)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.split()

    def test_soft_raised_to_hard(self) -> None:
        """A soft limit under the hard one is raised to it, in the process itself."""
        hard = subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout.strip()
        if hard == "unlimited" or int(hard) <= 300:
            raise SkipTest(f"hard limit {hard}")
        before, soft, hard_seen, now = self.run_with("ulimit -Sn 300")
        self.assertEqual((before, soft, hard_seen, now), ("300", hard, hard, hard))

    def test_at_hard_limit(self) -> None:
        """Soft already at the hard limit: kept."""
        self.assertEqual(self.run_with("ulimit -n 512"), ["512", "512", "512", "512"])


class ServiceCapsTests(TestCase):
    """The service sizes the caps at start, passes them on and logs them."""

    def setUp(self) -> None:
        self.dns = DNSTestServer()
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)

    async def test_caps_passed_and_logged(self) -> None:
        self.patch(tap, "raise_fd_limit", lambda: FDLimit(before=256, soft=1024, hard=1024))
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        options = parse("--data-dir", self.mktemp(), "--nameserver", self.dns.nameserver, "--no-reports",
                        "--socketmap", EPHEMERAL, "--smtp", EPHEMERAL, "--metrics", "none")
        svc = service.makeService(options, reactor, fatal=self.fail)
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        self.assertTrue(await svc.ready)
        assert svc.caps is not None
        self.assertEqual((svc.caps.fd_limit, svc.caps.socketmap, svc.caps.smtp), (1024, 387, 38))
        self.assertEqual(svc.stats.socketmap.settings.max_connections, 387)
        relay = svc._late["smtp"].factory
        self.assertEqual((relay.settings.max_connections, relay.settings.max_connections_per_ip), (38, 20))
        [line] = [e for e in events if "file descriptors: soft limit" in e.get("log_format", "")]
        self.assertEqual((line["soft"], line["before"], line["hard"]), (1024, 256, 1024))
        self.assertIn("2 x (387 socketmap + 38 SMTP connections) + 110 for deliveries + 64 reserve",
                      line["sizing"])
        self.assertTrue(any("is low for the default connection caps" in e.get("log_format", "")
                            for e in events))
        await svc.stopService()


class MetricsSizingTests(SynchronousTestCase):
    def test_metrics_connections_counted(self) -> None:
        """The metrics endpoint's cap comes out of the budget when it is on."""
        without = size_connection_caps(2422)
        self.assertFalse(without.scaled)
        caps = size_connection_caps(2422, metrics=32)
        self.assertTrue(caps.scaled)
        self.assertLessEqual(caps.used, 2422)
        self.assertEqual(caps.used - without.used + (without.socketmap - caps.socketmap) * 2
                         + (without.smtp - caps.smtp) * 2, 32)
        self.assertIn("32 metrics", caps.describe())
