"""
Issue 16 end to end: C{twistd -n mtasts} with C{--smtp-tls-cert} and
C{--smtp-tls-key} in a subprocess; mail submitted with C{smtplib} over
STARTTLS with REQUIRETLS, or with C{TLS-Required: No}, delivered to
loopback MX servers (RFC 8689 §4.2, §5).
"""

from __future__ import annotations

import os
import smtplib
import ssl
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer
from mtasts_twisted.testing.world import LoopbackWorld
from tests.test_e2e_relay import RelayProcess, make_message, policy_text, seed_policy, submit, wait_until


class TLSRelayProcess(RelayProcess):
    """The relay with STARTTLS on its intake."""

    tls_files: tuple[str, str] = ("", "")

    def args(self, smtp_port: int = 0) -> list[str]:
        return [*super().args(smtp_port), "--smtp-tls-cert", self.tls_files[0], "--smtp-tls-key", self.tls_files[1]]


def _submit_requiretls(port: int, ca_pem: bytes, sender: str, recipients: list[str], message: bytes) -> Any:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.check_hostname = False  # smtplib names the server by its address; the chain is verified
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.starttls(context=context)
        client.ehlo("client.test")
        return client.sendmail(sender, recipients, message, mail_options=["REQUIRETLS"])


class RequireTLSEndToEndTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.world = LoopbackWorld.start(reactor)
        self.addCleanup(self.world.stop)
        pki = self.world.pki
        # An enforce domain whose MX offers REQUIRETLS.
        self.rt = self.mx("mx.rt.test", Behaviour(certificate=pki.valid("mx.rt.test"), hostname="mx.rt.test",
                                                  extensions=("REQUIRETLS",)))
        self.world.add_mx("rt.test", "mx.rt.test")
        self.world.dns.add_txt("_mta-sts.rt.test", "v=STSv1; id=1")
        # An enforce domain whose MX presents an untrusted certificate.
        self.bad = self.mx("mx.bad.test", Behaviour(certificate=pki.untrusted("mx.bad.test"), hostname="mx.bad.test"))
        self.world.add_mx("bad.test", "mx.bad.test")
        self.world.dns.add_txt("_mta-sts.bad.test", "v=STSv1; id=1")
        # The sender's domain, no policy, no REQUIRETLS: DSNs go there.
        self.sender_mx = self.mx("mx.sender.test",
                                 Behaviour(certificate=pki.valid("mx.sender.test"), hostname="mx.sender.test"))
        self.world.add_mx("sender.test", "mx.sender.test")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        issued = pki.valid("relay.test")
        self.tls_files = (self.write("relay-cert.pem", issued.chain_pem), self.write("relay-key.pem", issued.key_pem))

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def mx(self, name: str, behaviour: Behaviour) -> SMTPTestServer:
        server = SMTPTestServer(behaviour)
        server.start()
        self.addCleanup(server.stop)
        return server

    async def relay(self) -> TLSRelayProcess:
        await seed_policy(self.dir, "rt.test", policy_text("mx.rt.test"))
        await seed_policy(self.dir, "bad.test", policy_text("mx.bad.test"))
        relay = TLSRelayProcess(self, self.world, self.dir, [
            str(self.rt.port), f"mx.sender.test={self.sender_mx.port}", f"mx.bad.test={self.bad.port}",
        ])
        relay.tls_files = self.tls_files
        await relay.start()
        self.addCleanup(relay.stop)
        return relay

    async def test_requiretls_relayed_and_bounced(self) -> None:
        """
        REQUIRETLS over STARTTLS: to the enforce domain with a REQUIRETLS
        MX it is delivered with the parameter; to the sender's no-policy
        domain it fails at once (5.7.30) and its DSN (headers only) comes
        back to the sender, sent although that MX lacks REQUIRETLS (§5).
        """
        relay = await self.relay()
        good = make_message("alice@sender.test", "bob@rt.test", "rt", "rt-1@sender.test")
        refused = await deferToThread(_submit_requiretls, relay.smtp_port, self.world.pki.ca_pem,
                                      "alice@sender.test", ["bob@rt.test"], good)
        self.assertEqual(refused, {})
        await wait_until(lambda: self.rt.messages, 20, "delivery to mx.rt.test")
        [got] = self.rt.messages
        self.assertIn("REQUIRETLS", got.mail_parameters)
        self.assertTrue(got.tls_at_mail)
        self.assertIn(b"with ESMTPS", got.data)

        nopolicy = make_message("alice@sender.test", "carol@nopolicy.sender.test", "np", "np-1@sender.test")
        self.world.add_mx("nopolicy.sender.test", "mx.sender.test")
        refused = await deferToThread(_submit_requiretls, relay.smtp_port, self.world.pki.ca_pem,
                                      "alice@sender.test", ["carol@nopolicy.sender.test"],
                                      nopolicy + b"SECRET-BODY-LINE\r\n")
        self.assertEqual(refused, {})
        await wait_until(lambda: self.sender_mx.messages, 30, "the DSN at mx.sender.test")
        [dsn] = self.sender_mx.messages
        self.assertEqual((dsn.mail_from, dsn.recipients), ("", ("alice@sender.test",)))
        self.assertNotIn("REQUIRETLS", dsn.mail_parameters)  # no REQUIRETLS there; sent anyway (§5)
        self.assertIn(b"Status: 5.7.30", dsn.data)
        self.assertIn(b"Subject: np", dsn.data)
        self.assertNotIn(b"SECRET-BODY-LINE", dsn.data)
        # Nothing of the REQUIRETLS message reached the no-policy domain's MX as mail to carol.
        self.assertEqual([m for m in self.sender_mx.messages if "carol@nopolicy.sender.test" in m.recipients], [])

    async def test_tls_required_no_to_bad_certificate(self) -> None:
        """C{TLS-Required: No} to an enforce domain with an untrusted certificate: delivered (over TLS)."""
        relay = await self.relay()
        message = b"TLS-Required: No\r\n" + make_message("alice@sender.test", "bob@bad.test", "cert", "c-1@x.test")
        refused = await submit(relay.smtp_port, "alice@sender.test", ["bob@bad.test"], message)
        self.assertEqual(refused, {})
        await wait_until(lambda: self.bad.messages, 20, "delivery to mx.bad.test")
        [got] = self.bad.messages
        self.assertTrue(got.tls)
        self.assertTrue(got.data.endswith(message))
