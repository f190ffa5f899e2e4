"""
C{examples/relay_delivery.py}, the embedding example of README, run as a
program against the loopback world: a DNS server, an HTTPS policy host and
an STARTTLS SMTP server, all with the world's test CA.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor, utils
from twisted.trial.unittest import TestCase

from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer
from mtasts_twisted.testing.world import LoopbackWorld

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "relay_delivery.py")
ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmax_age: 86400\n"


class RelayDeliveryExampleTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.world = LoopbackWorld.start(reactor)
        self.addCleanup(self.world.stop)

    async def test_delivers_with_enforce(self) -> None:
        """
        The example delivers one message under an enforce policy, verifying
        the MX with --ca-file, asking --nameserver, saying --helo.
        """
        self.world.publish("example.com", ENFORCE)
        self.world.add_mx("example.com", "mx1.example.com.")
        server = SMTPTestServer(Behaviour(certificate=self.world.pki.valid("mx1.example.com")), reactor=reactor)
        port = server.start()
        self.addCleanup(server.stop)
        message = os.path.abspath(self.mktemp())
        with open(message, "wb") as f:
            f.write(b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
        data_dir = os.path.abspath(self.mktemp())
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable,
            [EXAMPLE, "alice@example.org", "bob@example.com", message,
             "--nameserver", self.world.dns.nameserver, "--ca-file", self.world.ca_file,
             "--helo", "relay.test", "--data-dir", data_dir,
             "--delivery-port", f"mx1.example.com={port}", "--policy-port", str(self.world.https.port)],
            env=dict(os.environ), reactor=reactor)
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"example.com: policy enforce", out)
        self.assertIn(b"bob@example.com: DELIVERED via mx1.example.com (TLSv1.3 verified)", out)
        [received] = server.messages
        self.assertEqual(received.mail_from, "alice@example.org")
        self.assertEqual([c.line for c in server.sessions[0].commands][:2], [b"EHLO relay.test", b"STARTTLS"])
        self.assertEqual(server.plaintext_transactions(), [])
        self.assertEqual(self.world.https.request_count("mta-sts.example.com"), 1)
        self.assertTrue(os.path.isfile(os.path.join(data_dir, "mtasts.sqlite")))
