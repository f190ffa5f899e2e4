"""
The log of a delivery, as an operator greps it: one line per recipient and
delivery attempt in Postfix's shape (L{mtasts_twisted.delivery.logline}),
the failure reason once, no Python reprs, no line per connection from
Twisted's factories.  Checked on the events a C{twisted.logger} observer
sees, on loopback sockets (the world of C{tests.test_delivery}).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.delivery import Status
from mtasts_twisted.delivery.logline import dsn_of, policy_label, relay_label
from mtasts_twisted.policy import Mode
from mtasts_twisted.testing.dns import Behaviour as DNSBehaviour
from mtasts_twisted.testing.smtp import Behaviour, Reply, StartTLS
from tests.test_delivery import _CERTS, BOB, DOMAIN, MX1, DeliveryWorld

CAROL = "carol@" + DOMAIN
#: The line, its fields as named groups.
LINE = re.compile(
    r"to=<(?P<to>[^>]*)>, relay=(?P<relay>none|[^\[\s]+\[[0-9a-f.:]+\]:\d+), delay=(?P<delay>\d+\.\d\d), "
    r"tls=(?P<tls>none|TLSv1\.[23] (verified|untrusted)), policy=(?P<policy>sts-enforce|sts-testing|none|unknown), "
    r"dsn=(?P<dsn>[245]\.\d{1,3}\.\d{1,3}), status=(?P<status>sent|deferred|bounced) \((?P<reply>.*)\)\Z"
)
#: What must never be in a line an operator reads.
REPRS = re.compile(r"<[A-Za-z_.]+( object at 0x[0-9a-f]+|: )|\bNone\b|Starting factory|Stopping factory")


class DeliveryLogTests(DeliveryWorld):
    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self) -> list[str]:
        """Every line at info or above (what an operator's log shows)."""
        return [formatEvent(e) for e in self.events
                if e.get("log_level", LogLevel.debug) >= LogLevel.info
                and not e.get("log_namespace", "").startswith("mtasts_twisted.testing")
                and e.get("log_namespace") != "log_legacy"]

    def outcome_lines(self) -> list[dict[str, str]]:
        """The delivery lines, parsed; every info line is checked for reprs."""
        found = []
        for line in self.lines():
            self.assertIsNone(REPRS.search(line), line)
            match = LINE.match(line)
            if match is not None:
                found.append(match.groupdict())
        return found

    async def test_sent_verified(self) -> None:
        """Enforce, verified: one line, and no other line at info (no factory noise)."""
        self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        await self.deliver()
        [line] = self.outcome_lines()
        self.assertEqual(len(self.lines()), 1, self.lines())
        self.assertEqual(line["to"], BOB)
        self.assertEqual(line["relay"], f"{MX1}[127.0.0.1]:{self.ports[MX1]}")
        self.assertRegex(line["tls"], r"TLSv1\.[23] verified")
        self.assertEqual((line["policy"], line["dsn"], line["status"]), ("sts-enforce", "2.0.0", "sent"))
        self.assertTrue(line["reply"].startswith("250 "), line)
        [event] = [e for e in self.events if e.get("log_format", "").startswith("to=<")]
        self.assertEqual((event["to"], event["status"], event["dsn"]), (BOB, "sent", "2.0.0"))

    async def test_deferred_enforce_reason_once(self) -> None:
        """
        Enforce and an expired certificate: deferred, dsn 4.7.5, the TLS
        failure named once in the whole log (not also by the TLS layer).
        """
        self.server(Behaviour(certificate=_CERTS["expired"]))
        self.policy("enforce")
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        [line] = self.outcome_lines()
        self.assertEqual((line["tls"], line["policy"], line["dsn"], line["status"]),
                         ("none", "sts-enforce", "4.7.5", "deferred"))
        self.assertEqual(line["relay"], f"{MX1}[127.0.0.1]:{self.ports[MX1]}")
        self.assertTrue(line["reply"].startswith("4.7.5 no MX host of example.com passed MTA-STS"), line)
        log = "\n".join(self.lines())
        self.assertEqual(log.count("X509_V_ERR_CERT_HAS_EXPIRED"), 1, log)
        self.assertEqual(log.count("certificate-expired"), 1, log)

    async def test_testing_untrusted_and_two_recipients(self) -> None:
        """Testing, an untrusted certificate: one line per recipient, tls untrusted."""
        self.server(Behaviour(certificate=_CERTS["untrusted"]))
        self.policy("testing")
        await self.deliver(recipients=(BOB, CAROL))
        lines = self.outcome_lines()
        self.assertEqual([line["to"] for line in lines], [BOB, CAROL])
        for line in lines:
            self.assertRegex(line["tls"], r"TLSv1\.[23] untrusted")
            self.assertEqual((line["policy"], line["status"]), ("sts-testing", "sent"))

    async def test_bounced(self) -> None:
        """A 550 to RCPT: bounced, its enhanced code, the reply."""
        self.server(Behaviour(certificate=_CERTS["valid"],
                              recipient_replies={BOB: Reply(550, "5.1.1 no such user")}))
        await self.deliver(recipients=(BOB, CAROL))
        bob, carol = self.outcome_lines()
        self.assertEqual((bob["policy"], bob["dsn"], bob["status"], bob["reply"]),
                         ("none", "5.1.1", "bounced", "550 5.1.1 no such user"))
        self.assertEqual((carol["to"], carol["status"]), (CAROL, "sent"))

    async def test_no_starttls_no_policy(self) -> None:
        """No policy, no STARTTLS: sent in plaintext, tls=none, policy=none."""
        self.server(Behaviour(starttls=StartTLS.NOT_OFFERED))
        await self.deliver()
        [line] = self.outcome_lines()
        self.assertEqual((line["tls"], line["policy"], line["status"]), ("none", "none", "sent"))

    async def test_plaintext_retry(self) -> None:
        """
        A failed handshake without a policy: one line says why and that it
        retries without STARTTLS; the recipient's line says tls=none, sent.
        """
        self.server(Behaviour(certificate=_CERTS["valid"], starttls=StartTLS.ALERT))
        await self.deliver()
        [line] = self.outcome_lines()
        self.assertEqual((line["tls"], line["status"]), ("none", "sent"))
        [retry] = [text for text in self.lines() if "retrying without STARTTLS" in text]
        self.assertTrue(retry.startswith(f"{MX1}[127.0.0.1]:{self.ports[MX1]}: TLS with {MX1} failed: "), retry)
        self.assertEqual(len(self.lines()), 2, self.lines())

    async def test_policy_lookup_failed(self) -> None:
        """The policy lookup failed: deferred, policy=unknown, relay=none."""
        self.dns.set_behaviour("_mta-sts." + DOMAIN, DNSBehaviour.SERVFAIL)
        await self.deliver()
        [line] = self.outcome_lines()
        self.assertEqual((line["relay"], line["tls"], line["policy"], line["dsn"], line["status"]),
                         ("none", "none", "unknown", "4.4.3", "deferred"))


class LabelTests(SynchronousTestCase):
    def test_dsn(self) -> None:
        """The enhanced code at the start of the text, its class agreeing with the status."""
        self.assertEqual(dsn_of(Status.DELIVERED, "2.0.0 Ok: queued"), "2.0.0")
        self.assertEqual(dsn_of(Status.DELIVERED, "Ok"), "2.0.0")
        self.assertEqual(dsn_of(Status.TRANSIENT, "4.7.5 no MX host"), "4.7.5")
        self.assertEqual(dsn_of(Status.TRANSIENT, "5.7.1 go away"), "4.7.1")
        self.assertEqual(dsn_of(Status.PERMANENT, "MAIL FROM refused: 5.1.8 bad"), "5.0.0")
        self.assertEqual(dsn_of(Status.PERMANENT, "5.1.10"), "5.1.10")
        self.assertEqual(dsn_of(Status.PERMANENT, "5.1.1000"), "5.0.0")

    def test_labels(self) -> None:
        self.assertEqual([policy_label(m) for m in (Mode.ENFORCE, Mode.TESTING, Mode.NONE, None)],
                         ["sts-enforce", "sts-testing", "none", "none"])
        self.assertEqual(policy_label(None, known=False), "unknown")
        self.assertEqual(relay_label("mx.example", "2001:db8::1", 25), "mx.example[2001:db8::1]:25")
        self.assertEqual(relay_label("mx.example", None, 25), "none")
