"""
End to end through a real Postfix: L{mtasts_twisted.delivery} delivers
under an C{enforce} policy to a Postfix instance on a loopback port
(STARTTLS with a test certificate for the MX name), which stores the
message in a Maildir.

Needs the Debian C{postfix} package and root.  Skipped when Postfix is not
usable on a developer machine; a failure when C{CI=true}.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.trial import unittest

from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.delivery import Deliverer, DeliverySettings, Status
from mtasts_twisted.dns import DNSResolver
from mtasts_twisted.policy import Mode
from mtasts_twisted.store import MemoryStore
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.testing.memory import FakeFetcher
from mtasts_twisted.testing.pki import PKI
from mtasts_twisted.testing.postfix import PostfixServer

DOMAIN = "example.test"
MX = "mx.example.test"
POLICY = f"version: STSv1\nmode: enforce\nmx: {MX}\nmax_age: 86400\n"
MESSAGE = (
    b"From: alice@example.org\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: MTA-STS end to end\r\n"
    b"Message-ID: <e2e-1@example.org>\r\n"
    b"\r\n"
    b"Delivered by mtasts-twisted.\r\n"
    b".A line that starts with a dot.\r\n"
)


class PostfixDeliveryTests(unittest.TestCase):
    """Delivery to a real Postfix under an enforce policy."""

    timeout = 90

    def setUp(self) -> None:
        reason = PostfixServer.unavailable()
        if reason is not None:
            if os.environ.get("CI") == "true":
                self.fail(f"CI=true but Postfix cannot run: {reason}")
            raise unittest.SkipTest(reason)
        self.pki = PKI()
        directory = tempfile.mkdtemp(prefix="mtasts-postfix-")
        os.chmod(directory, 0o755)  # Postfix's unprivileged daemons reach in
        self.addCleanup(shutil.rmtree, directory, True)
        self.postfix = PostfixServer(
            os.path.join(directory, "instance"),
            domain=DOMAIN,
            hostname=MX,
            certificate=self.pki.valid(MX),
        )
        self.addCleanup(self.postfix.stop)
        self.postfix.start(timeout=30)

        self.dns = DNSTestServer()
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.dns.add_mx(DOMAIN, 10, MX + ".")
        self.dns.add_a(MX, "127.0.0.1")
        self.dns.add_txt("_mta-sts." + DOMAIN, "v=STSv1; id=20240101")
        fetcher = FakeFetcher()
        fetcher.policies[DOMAIN] = POLICY
        resolver = DNSResolver(reactor, [self.dns.nameserver], timeout=1, budget=5)
        cache = PolicyCache(MemoryStore(), resolver, fetcher, reactor)
        self.deliverer = Deliverer(
            reactor,
            resolver,
            cache,
            trust_root=self.pki.ca_pem,
            settings=DeliverySettings(
                helo_name="client.example.org",
                port_for={MX: self.postfix.port},
                connect_timeout=10,
                reply_timeout=30,
                session_timeout=60,
            ),
        )

    async def test_enforce_delivery(self) -> None:
        """
        Verified STARTTLS to Postfix; the stored message is ours, with a
        C{Received: ... with ESMTPS} line (RFC 3848).
        """
        result = await self.deliverer.deliver("alice@example.org", ["bob@example.test"], io.BytesIO(MESSAGE))
        [outcome] = result.outcomes
        self.assertEqual(outcome.status, Status.DELIVERED, f"{outcome}\n{self.postfix.log_text()}")
        self.assertEqual((outcome.code, outcome.mx_host, outcome.verified), (250, MX, True))
        self.assertTrue(outcome.tls_version and outcome.tls_version.startswith("TLSv1."), outcome.tls_version)
        self.assertEqual(result.policy_mode, Mode.ENFORCE)
        self.assertEqual([(r.success_count, r.failures) for r in result.results[1:]], [(1, ())])

        stored = await self.postfix.wait_for_message(reactor, "bob", timeout=30)
        headers, _, body = stored.partition(b"\n\n")
        self.assertEqual(body, b"Delivered by mtasts-twisted.\n.A line that starts with a dot.\n")
        self.assertIn(b"Message-ID: <e2e-1@example.org>", headers)
        unfolded = headers.replace(b"\n\t", b" ").replace(b"\n ", b" ")
        received = [line for line in unfolded.split(b"\n") if line.startswith(b"Received:")]
        self.assertTrue(received, headers)
        self.assertIn(b"with ESMTPS", received[0])
        self.assertIn(b"by " + MX.encode(), received[0])
        self.assertIn(b"<bob@example.test>", received[0])
