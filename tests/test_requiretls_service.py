"""
Issue 16: C{--smtp-tls-cert} and C{--smtp-tls-key} of C{twistd mtasts}:
checked at startup (one line), and the running intake offers STARTTLS and
then REQUIRETLS, which a client can ask for (RFC 8689 §2).
"""

from __future__ import annotations

import os
import smtplib
import ssl

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import TestCase

from mtasts_twisted import service
from mtasts_twisted.relay import Queue
from mtasts_twisted.testing.pki import PKI
from tests.test_service import EPHEMERAL, parse

_PKI = PKI()


class SMTPTLSOptionsTests(TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        issued = _PKI.valid("relay.test")
        self.cert = self.write("cert.pem", issued.chain_pem)
        self.key = self.write("key.pem", issued.key_pem)
        self.other_key = self.write("other.pem", _PKI.valid("other.test").key_pem)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assertUsage(self, message: str, *argv: str) -> None:
        error = self.assertRaises(usage.UsageError, parse, "--data-dir", self.dir, *argv)
        self.assertIn(message, str(error))
        self.assertNotIn("\n", str(error))

    def test_errors(self) -> None:
        """Unreadable, not PEM, mismatched, or one without the other: one line naming the option."""
        missing = os.path.join(self.dir, "missing.pem")
        self.assertUsage("--smtp-tls-cert and --smtp-tls-key go together", "--smtp-tls-cert", self.cert)
        self.assertUsage("--smtp-tls-cert and --smtp-tls-key go together", "--smtp-tls-key", self.key)
        self.assertUsage(f"--smtp-tls-cert {missing}: cannot read it",
                         "--smtp-tls-cert", missing, "--smtp-tls-key", self.key)
        self.assertUsage(f"--smtp-tls-key {missing}: cannot read it",
                         "--smtp-tls-cert", self.cert, "--smtp-tls-key", missing)
        self.assertUsage("no PEM certificate", "--smtp-tls-cert", self.key, "--smtp-tls-key", self.key)
        self.assertUsage("no PEM private key", "--smtp-tls-cert", self.cert, "--smtp-tls-key", self.cert)
        self.assertUsage("does not match the certificate",
                         "--smtp-tls-cert", self.cert, "--smtp-tls-key", self.other_key)

    def test_accepted(self) -> None:
        options = parse("--data-dir", self.dir, "--smtp-tls-cert", self.cert, "--smtp-tls-key", self.key)
        self.assertEqual((options.settings.smtp_tls_cert, options.settings.smtp_tls_key), (self.cert, self.key))
        self.assertIsNone(parse("--data-dir", self.dir).settings.smtp_tls_cert)

    async def test_running_intake_requiretls(self) -> None:
        """
        The service's intake with the options: STARTTLS, then REQUIRETLS
        in the EHLO reply; a message sent with it is queued tagged.
        """
        options = parse("--data-dir", self.dir, "--socketmap", "none", "--metrics", "none", "--no-reports",
                        "--nameserver", "127.0.0.1:1", "--smtp", EPHEMERAL,
                        "--smtp-tls-cert", self.cert, "--smtp-tls-key", self.key)
        svc = service.makeService(options, reactor, fatal=lambda code: None)
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        self.assertTrue(await svc.ready)
        svc.relay.stopService()  # keep the message queued
        port = svc.listeners["smtp"].port.getHost().port
        context = ssl.create_default_context(cadata=_PKI.ca_pem.decode())
        context.check_hostname = False  # smtplib names the server by its address; the chain is verified
        seen: dict[str, bool] = {}

        def submit() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("client.test")
                seen["before"] = client.has_extn("requiretls")
                client.starttls(context=context)
                client.ehlo("client.test")
                seen["after"] = client.has_extn("requiretls")
                client.sendmail("alice@example.org", ["bob@example.com"], b"Subject: hi\r\n\r\nhello\r\n",
                                mail_options=["REQUIRETLS"])

        await deferToThread(submit)
        self.assertEqual(seen, {"before": False, "after": True})
        [message] = Queue(service.queue_directory(svc.config)).list()
        self.assertTrue(message.requiretls)
        await svc.stopService()
