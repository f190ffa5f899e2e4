"""
examples/twistedmail_sendmail.py end to end: a real subprocess, the
loopback DNS server, one STARTTLS server on loopback answering for every
MX host (certificates chosen by SNI), policies pre-seeded in the program's
SQLite cache (their TXT ids published, so the cache uses them without a
fetch on port 443).  Its contract: one line per recipient, exit 0 when all
were delivered, 75 when any was deferred, 69 when any failed permanently
(64 on bad usage).
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor, utils
from twisted.trial import unittest

from mtasts_twisted.testing.smtp import Behaviour, Reply, SMTPTestServer
from mtasts_twisted.testing.world import LoopbackWorld
from tests.test_e2e_relay import seed_policy

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "twistedmail_sendmail.py")
MESSAGE = b"Subject: example\nFrom: alice@relay.test\n\nHello from twisted.mail.\n"


def enforce(mx: str) -> str:
    return f"version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: 86400\n"


class ExampleTests(unittest.TestCase):
    timeout = 120

    async def test_exit_statuses(self) -> None:
        world = LoopbackWorld.start(reactor)
        self.addCleanup(world.stop)
        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        server = SMTPTestServer(Behaviour(
            certificate=world.pki.valid("mx.good.test"),
            certificates_by_name={"mx.good.test": world.pki.valid("mx.good.test"),
                                  "mx.bad.test": world.pki.untrusted("mx.bad.test")},
            recipient_replies={"nobody@good.test": Reply(550, "no such user")},
        ), reactor=reactor)
        port = server.start()
        self.addCleanup(server.stop)
        for domain in ("good.test", "bad.test"):
            world.add_mx(domain, "mx." + domain)
            world.publish(domain, enforce("mx." + domain))
            await seed_policy(data_dir, domain, enforce("mx." + domain))

        async def run(*recipients: str) -> tuple[list[str], int]:
            out, err, code = await utils.getProcessOutputAndValue(
                sys.executable,
                [EXAMPLE, "--nameserver", world.dns.nameserver, "--ca-file", world.ca_file, "--port", str(port),
                 "--helo", "client.test", "--data-dir", data_dir, "alice@relay.test", *recipients],
                env=dict(os.environ), stdinBytes=MESSAGE)
            return out.decode().splitlines(), code

        lines, code = await run("bob@good.test")
        self.assertEqual((lines, code), (["bob@good.test delivered mx=mx.good.test tls=TLSv1.3 verified=yes"], 0))
        [message] = server.messages
        self.assertEqual((message.tls, message.data), (True, MESSAGE.replace(b"\n", b"\r\n")))

        lines, code = await run("bob@good.test", "nobody@good.test")
        self.assertEqual(code, 69, lines)
        self.assertEqual(lines[1], "nobody@good.test failed mx=mx.good.test tls=TLSv1.3 verified=yes "
                                   "(550 no such user)")

        lines, code = await run("bob@good.test", "nobody@good.test", "carol@bad.test")
        self.assertEqual(code, 75, lines)
        self.assertEqual([line.split()[:2] for line in lines],
                         [["bob@good.test", "delivered"], ["nobody@good.test", "failed"],
                          ["carol@bad.test", "deferred"]])
        self.assertTrue(lines[2].startswith("carol@bad.test deferred mx=mx.bad.test tls=none verified=no (4.7.5"),
                        lines[2])
        # Nothing for the enforce domain whose certificate did not verify.
        self.assertNotIn("carol@bad.test", [r for m in server.messages for r in m.recipients])
        self.assertEqual(server.plaintext_transactions(), [])

        _, err, code = await utils.getProcessOutputAndValue(sys.executable, [EXAMPLE], env=dict(os.environ))
        self.assertEqual(code, 64, err)
