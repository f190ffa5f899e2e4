"""
Tests for L{mtasts_twisted.delivery}: every policy mode × server behaviour
against the loopback world (DNSTestServer, SMTPTestServer with PKI
certificates, a PolicyCache over MemoryStore + FakeFetcher), failover,
timeouts, per-recipient replies, 8-bit and SMTPUTF8, streaming.

Every MX host resolves to 127.0.0.1; each test SMTP server has its own
ephemeral port, which the deliverer finds in C{DeliverySettings.port_for}.
"""

from __future__ import annotations

import io
import os
import random
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.delivery import (
    Deliverer,
    DeliveryResult,
    DeliverySettings,
    MessageInfo,
    Status,
    _DataEncoder,
    deliver,
    order_mx_hosts,
    scan_message,
)
from mtasts_twisted.dns import DNSResolver, MXHost
from mtasts_twisted.interfaces import IResultSink
from mtasts_twisted.policy import Mode
from mtasts_twisted.results import PolicyType, Result, ResultType
from mtasts_twisted.store import MemoryStore
from mtasts_twisted.testing.dns import Behaviour as DNSBehaviour
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.testing.memory import FakeFetcher
from mtasts_twisted.testing.pki import PKI
from mtasts_twisted.testing.sinks import ListSink
from mtasts_twisted.testing.smtp import (
    Behaviour,
    Reply,
    SMTPTestServer,
    Stage,
    StartTLS,
)
from mtasts_twisted.tlsrpt import Report, merge_results
from tests.test_tlsrpt_report import SETTINGS, validate_report

_PKI = PKI()
DOMAIN = "example.com"
MX1 = "mx1.example.com"
MX2 = "mx2.example.com"
EVIL = "mx.evil.example"
SENDER = "alice@example.org"
BOB = "bob@example.com"
MESSAGE = b"Subject: hello\r\nFrom: alice@example.org\r\n\r\nHello Bob.\r\n.leading dot\r\n"

_CERTS = {
    "valid": _PKI.valid(MX1),
    "expired": _PKI.expired(MX1),
    "wrong_name": _PKI.valid("other.example.net"),
    "untrusted": _PKI.untrusted(MX1),
}
_VALID2 = _PKI.valid(MX2)
_VALID_EVIL = _PKI.valid(EVIL)

#: Server behaviours of the matrix, with the TLSRPT failure each causes
#: under an sts policy (None: verified TLS).
MATRIX: dict[str, tuple[Behaviour, tuple[ResultType, str | None] | None]] = {
    "valid": (Behaviour(certificate=_CERTS["valid"]), None),
    "expired": (
        Behaviour(certificate=_CERTS["expired"]),
        (ResultType.CERTIFICATE_EXPIRED, "X509_V_ERR_CERT_HAS_EXPIRED"),
    ),
    "wrong_name": (Behaviour(certificate=_CERTS["wrong_name"]), (ResultType.CERTIFICATE_HOST_MISMATCH, None)),
    "untrusted": (Behaviour(certificate=_CERTS["untrusted"]), (ResultType.CERTIFICATE_NOT_TRUSTED, None)),
    "no_starttls": (
        Behaviour(starttls=StartTLS.NOT_OFFERED),
        (ResultType.STARTTLS_NOT_SUPPORTED, "starttls-not-offered"),
    ),
    "refused": (
        Behaviour(certificate=_CERTS["valid"], starttls=StartTLS.REFUSE),
        (ResultType.STARTTLS_NOT_SUPPORTED, "starttls-refused-454"),
    ),
    "alert": (
        Behaviour(certificate=_CERTS["valid"], starttls=StartTLS.ALERT),
        (ResultType.VALIDATION_FAILURE, "tls-alert-protocol-version"),
    ),
}
#: Behaviours where TLS never carries the session.
_NO_TLS = {"no_starttls", "refused", "alert"}


def policy_text(mode: str, *mx: str) -> str:
    lines = ["version: STSv1", f"mode: {mode}"] + [f"mx: {m}" for m in mx] + ["max_age: 86400"]
    return "\n".join(lines) + "\n"


class _ReadSpy(io.BufferedReader):
    """A file that remembers the largest read."""

    largest = 0

    def read(self, size: int | None = -1) -> bytes:  # type: ignore[override]
        if size is None or size < 0:
            raise AssertionError("the message was read whole")
        self.largest = max(self.largest, size)
        return super().read(size)


class DeliveryWorld(unittest.TestCase):
    """The loopback world: DNS, SMTP servers, policy cache, a deliverer."""

    timeout = 20

    def setUp(self) -> None:
        self.dns = DNSTestServer()
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.resolver = DNSResolver(reactor, [self.dns.nameserver], timeout=0.5, budget=3)
        self.fetcher = FakeFetcher()
        self.cache = PolicyCache(MemoryStore(), self.resolver, self.fetcher, reactor)
        self.sink = ListSink()
        self.ports: dict[str, int] = {}

    def server(self, behaviour: Behaviour, host: str = MX1, preference: int = 10, domain: str = DOMAIN) -> SMTPTestServer:
        server = SMTPTestServer(behaviour, reactor=reactor)
        self.ports[host] = server.start()
        self.addCleanup(server.stop)
        if host != domain:
            self.dns.add_mx(domain, preference, host + ".")
        self.dns.add_a(host, "127.0.0.1")
        return server

    def policy(self, mode: str | None, *mx: str) -> None:
        if mode is None:
            return
        self.dns.add_txt("_mta-sts." + DOMAIN, "v=STSv1; id=1")
        self.fetcher.policies[DOMAIN] = policy_text(mode, *(mx or (MX1, MX2)))

    def deliverer(self, **settings: Any) -> Deliverer:
        values: dict[str, Any] = dict(
            port=1, port_for=self.ports, connect_timeout=3, reply_timeout=3, session_timeout=10
        )
        values.update(settings)
        return Deliverer(
            reactor,
            self.resolver,
            self.cache,
            trust_root=_PKI.ca_pem,
            sink=self.sink,
            settings=DeliverySettings(**values),
            rng=random.Random(1),
        )

    async def deliver(
        self, recipients: tuple[str, ...] = (BOB,), message: bytes | Any = MESSAGE, **settings: Any
    ) -> DeliveryResult:
        file = io.BytesIO(message) if isinstance(message, bytes) else message
        result = await self.deliverer(**settings).deliver(SENDER, recipients, file)
        self.assertEqual(self.sink.results, list(result.results))
        if result.results:
            # Every delivery's results make a valid RFC 8460 report.
            report = Report.build(SETTINGS, result.domain, "2024-05-01", "t1", merge_results(result.results))
            validate_report(report.to_json())
        return result

    def assertNothingSent(self, *servers: SMTPTestServer) -> None:
        """No MAIL, RCPT or DATA reached the servers at all (TLS or not)."""
        for server in servers:
            self.assertEqual(server.plaintext_transactions(), [])
            self.assertEqual(server.messages, [])
            verbs = [c.verb for s in server.sessions for c in s.commands]
            self.assertNotIn("MAIL", verbs)
            self.assertNotIn("RCPT", verbs)

    def failures(self, result: DeliveryResult) -> list[tuple[ResultType, str | None]]:
        return [(f.result_type, f.failure_reason_code) for r in result.results[1:] for f in r.failures]


class MatrixTests(DeliveryWorld):
    """Policy mode × server behaviour: outcome and TLSRPT result."""

    async def check(self, mode: str | None, name: str) -> None:
        behaviour, failure = MATRIX[name]
        server = self.server(behaviour)
        self.policy(mode)
        result = await self.deliver()
        [outcome] = result.outcomes
        sts = mode in ("enforce", "testing")
        self.assertEqual(result.domain, DOMAIN)
        self.assertEqual(result.policy_mode, Mode(mode) if mode else None)
        descriptor = result.results[0].policy
        self.assertEqual(
            descriptor.policy_type, PolicyType.STS if sts else PolicyType.NO_POLICY_FOUND
        )
        for r in result.results[1:]:
            self.assertEqual(r.policy, descriptor)
            self.assertEqual(r.success_count + r.failure_count, 1)
            for f in r.failures:
                self.assertEqual(f.receiving_mx_hostname, MX1)
                self.assertEqual(f.receiving_ip, "127.0.0.1")
                # RFC 8460 §4.4: the session's local address.
                self.assertEqual(f.sending_mta_ip, "127.0.0.1")

        if mode == "enforce" and failure is not None:
            # RFC 8461 §5: nothing of the message, to anyone unverified.
            self.assertEqual(outcome.status, Status.TRANSIENT, outcome)
            # The code is the last server reply, if the session ended on one.
            self.assertEqual(outcome.code, 454 if name == "refused" else None)
            self.assertIn("4.7.5", outcome.message)
            self.assertNothingSent(server)
            self.assertEqual(len(server.sessions), 1)  # no plaintext retry
            [(kind, reason)] = self.failures(result)
            self.assertEqual(kind, failure[0])
            if failure[1] is not None:
                self.assertEqual(reason, failure[1])
            self.assertEqual([r.success_count for r in result.results], [0, 0])
            return

        self.assertEqual(outcome.status, Status.DELIVERED, outcome)
        self.assertEqual(outcome.code, 250)
        self.assertEqual(outcome.mx_host, MX1)
        [message] = server.messages
        self.assertTrue(message.accepted)
        self.assertEqual(message.recipients, (BOB,))
        self.assertEqual(message.mail_from, SENDER)
        self.assertEqual(message.data, MESSAGE)
        tls = name not in _NO_TLS
        self.assertEqual(message.tls, tls)
        self.assertEqual(message.sni, MX1 if tls else None)
        self.assertEqual(outcome.tls_version, message.tls_version)
        self.assertEqual(outcome.verified, name == "valid")
        self.assertEqual(len(server.sessions), 2 if name == "alert" else 1)

        if sts:
            if failure is None:
                self.assertEqual([(r.success_count, r.failures) for r in result.results[1:]], [(1, ())])
            else:
                # testing: delivered, and a failure in the report.
                [(kind, reason)] = self.failures(result)
                self.assertEqual(kind, failure[0])
                if failure[1] is not None:
                    self.assertEqual(reason, failure[1])
                self.assertEqual(result.results[1].success_count, 0)
        elif tls:
            # No policy: TLS counts as success, verified or not.
            self.assertEqual([(r.success_count, r.failures) for r in result.results[1:]], [(1, ())])
        elif name == "alert":
            # A failed handshake is reported; the plaintext retry is not.
            self.assertEqual(self.failures(result), [failure])
        else:
            # No TLS negotiation, no policy: nothing to report.
            self.assertEqual(len(result.results), 1)


def _matrix_test(mode: str | None, name: str) -> Any:
    async def test(self: MatrixTests) -> None:
        await self.check(mode, name)

    test.__name__ = f"test_{mode or 'no_policy'}_{name}"
    test.__doc__ = f"Policy {mode or 'absent'}, server {name}."
    return test


for _mode in ("enforce", "testing", "none", None):
    for _name in MATRIX:
        _test = _matrix_test(_mode, _name)
        setattr(MatrixTests, _test.__name__, _test)


class MXTests(DeliveryWorld):
    """MX selection, policy matching, failover, DNS failures."""

    async def test_enforce_skips_mismatch(self) -> None:
        """
        Enforce: an MX host outside the policy is never contacted and is
        reported as mtasts-policy-mx-mismatch; the next host delivers.
        """
        evil = self.server(Behaviour(certificate=_VALID_EVIL), host=EVIL, preference=5)
        good = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertEqual(result.outcomes[0].mx_host, MX1)
        self.assertEqual(evil.sessions, [])
        self.assertEqual(len(good.messages), 1)
        [lookup, mismatch, success] = result.results
        [detail] = mismatch.failures
        self.assertEqual(
            (detail.result_type, detail.failure_reason_code, detail.receiving_mx_hostname, detail.receiving_ip),
            (ResultType.VALIDATION_FAILURE, "mtasts-policy-mx-mismatch", EVIL, None),
        )
        self.assertEqual(success.success_count, 1)

    async def test_enforce_only_mismatch(self) -> None:
        """Enforce and no MX host in the policy: transient, nobody contacted."""
        evil = self.server(Behaviour(certificate=_VALID_EVIL), host=EVIL)
        self.policy("enforce")
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertIn("not an MX host of the MTA-STS policy", result.outcomes[0].message)
        self.assertEqual(evil.sessions, [])

    async def test_testing_delivers_to_mismatch(self) -> None:
        """Testing: a host outside the policy gets the mail; the session is a failure."""
        evil = self.server(Behaviour(certificate=_VALID_EVIL), host=EVIL)
        self.policy("testing")
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertTrue(result.outcomes[0].verified)
        self.assertEqual(len(evil.messages), 1)
        [detail] = result.results[1].failures
        self.assertEqual(detail.failure_reason_code, "mtasts-policy-mx-mismatch")
        self.assertEqual((detail.receiving_ip, detail.sending_mta_ip), ("127.0.0.1", "127.0.0.1"))
        self.assertEqual(result.results[1].success_count, 0)

    async def test_failover_after_certificate_failure(self) -> None:
        """Enforce: mx1's expired certificate moves on to mx2."""
        first = self.server(Behaviour(certificate=_CERTS["expired"]), host=MX1, preference=10)
        second = self.server(Behaviour(certificate=_VALID2), host=MX2, preference=20)
        self.policy("enforce")
        result = await self.deliver()
        outcome = result.outcomes[0]
        self.assertEqual((outcome.status, outcome.mx_host, outcome.verified), (Status.DELIVERED, MX2, True))
        self.assertNothingSent(first)
        self.assertEqual(len(second.messages), 1)
        self.assertEqual(self.failures(result), [(ResultType.CERTIFICATE_EXPIRED, "X509_V_ERR_CERT_HAS_EXPIRED")])
        self.assertEqual([r.success_count for r in result.results], [0, 0, 1])

    async def test_failover_after_connection_refused(self) -> None:
        """A host that refuses the connection is skipped; it is not a TLS result."""
        dead = self.server(Behaviour(), host=MX1, preference=10)
        await dead.stop()
        second = self.server(Behaviour(certificate=_VALID2), host=MX2, preference=20)
        self.policy("enforce")
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].mx_host, MX2)
        self.assertEqual(len(second.messages), 1)
        self.assertEqual([r.success_count for r in result.results], [0, 1])

    async def test_all_fail_enforce_transient(self) -> None:
        """Enforce: every host fails (one even with a 5xx greeting): transient, never permanent."""
        first = self.server(Behaviour(certificate=_CERTS["valid"], replies={Stage.GREETING: Reply(554, "go away")}))
        second = self.server(Behaviour(starttls=StartTLS.NOT_OFFERED), host=MX2, preference=20)
        self.policy("enforce")
        result = await self.deliver()
        outcome = result.outcomes[0]
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertIn("554 go away", outcome.message)
        self.assertIn("STARTTLS not offered", outcome.message)
        self.assertNothingSent(first, second)

    async def test_null_mx(self) -> None:
        """RFC 7505: a null MX is permanent, and nothing is contacted."""
        self.dns.add_record(DOMAIN, "MX", "0 .")
        result = await self.deliver()
        outcome = result.outcomes[0]
        self.assertEqual(outcome.status, Status.PERMANENT)
        self.assertTrue(outcome.message.startswith("5.1.10"), outcome.message)
        self.assertIsNone(outcome.code)

    async def test_no_such_domain(self) -> None:
        """A domain that does not exist: permanent."""
        result = await self.deliver(recipients=("bob@nowhere.example",))
        self.assertEqual(result.outcomes[0].status, Status.PERMANENT)
        self.assertEqual(result.domain, "nowhere.example")

    async def test_mx_lookup_servfail(self) -> None:
        """SERVFAIL for the MX lookup: transient."""
        self.dns.add_a(MX1, "127.0.0.1")
        self.dns.add_mx(DOMAIN, 10, MX1 + ".")
        self.dns.set_behaviour(DOMAIN, DNSBehaviour.SERVFAIL, rdtype="MX")
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)

    async def test_policy_lookup_temporary_failure(self) -> None:
        """A temporary policy lookup failure: transient, and its result is recorded."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.dns.set_behaviour("_mta-sts." + DOMAIN, DNSBehaviour.SERVFAIL)
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        [lookup] = result.results
        self.assertEqual(lookup.failures[0].result_type, ResultType.STS_POLICY_FETCH_ERROR)
        self.assertEqual(self.sink.results, [lookup])
        self.assertEqual(server.sessions, [])

    async def test_implicit_mx(self) -> None:
        """RFC 5321 §5.1: no MX, an A record: the domain is its own MX."""
        server = self.server(Behaviour(certificate=_PKI.valid(DOMAIN)), host=DOMAIN)
        result = await self.deliver()
        outcome = result.outcomes[0]
        self.assertEqual((outcome.status, outcome.mx_host, outcome.verified), (Status.DELIVERED, DOMAIN, True))
        self.assertEqual(len(server.messages), 1)

    async def test_ipv6_then_ipv4(self) -> None:
        """AAAA first: ::1 (nothing listening there) fails, 127.0.0.1 delivers."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.dns.add_aaaa(MX1, "::1")
        self.policy("enforce")
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertEqual(len(server.sessions), 1)

    def test_order_mx_hosts(self) -> None:
        """By preference; shuffled within one preference."""
        hosts = [MXHost(10, "a"), MXHost(10, "b"), MXHost(10, "c"), MXHost(5, "z"), MXHost(20, "y")]
        orders = set()
        for seed in range(20):
            ordered = order_mx_hosts(hosts, random.Random(seed))
            self.assertEqual(ordered[0].host, "z")
            self.assertEqual(ordered[-1].host, "y")
            orders.add(tuple(h.host for h in ordered[1:4]))
        self.assertGreater(len(orders), 1)

    async def test_max_mx_hosts(self) -> None:
        """Only the first max_mx_hosts hosts are tried."""
        self.server(Behaviour(starttls=StartTLS.NOT_OFFERED), host=MX1, preference=10)
        second = self.server(Behaviour(certificate=_VALID2), host=MX2, preference=20)
        self.policy("enforce")
        result = await self.deliver(max_mx_hosts=1)
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertEqual(second.sessions, [])


class StageTests(DeliveryWorld):
    """Scripted replies at each stage, after verified TLS under enforce."""

    async def stage(self, stage: Stage, code: int, servers: int = 1) -> tuple[Any, SMTPTestServer]:
        server = self.server(Behaviour(certificate=_CERTS["valid"], replies={stage: Reply(code, "scripted")}))
        self.policy("enforce")
        result = await self.deliver()
        return result.outcomes[0], server

    async def test_greeting_421(self) -> None:
        outcome, server = await self.stage(Stage.GREETING, 421)
        self.assertEqual((outcome.status, outcome.code), (Status.TRANSIENT, 421))

    async def test_ehlo_550_then_helo(self) -> None:
        """EHLO refused: HELO works but offers no STARTTLS: transient under enforce."""
        outcome, server = await self.stage(Stage.EHLO, 550)
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertIn("STARTTLS not offered", outcome.message)
        self.assertNothingSent(server)
        self.assertIn("HELO", [c.verb for c in server.sessions[0].commands])

    async def test_mail_451(self) -> None:
        outcome, server = await self.stage(Stage.MAIL, 451)
        self.assertEqual((outcome.status, outcome.code), (Status.TRANSIENT, 451))

    async def test_mail_550(self) -> None:
        """A 5xx to MAIL from a verified host is permanent."""
        outcome, server = await self.stage(Stage.MAIL, 550)
        self.assertEqual((outcome.status, outcome.code, outcome.verified), (Status.PERMANENT, 550, True))

    async def test_data_451(self) -> None:
        outcome, server = await self.stage(Stage.DATA, 451)
        self.assertEqual((outcome.status, outcome.code), (Status.TRANSIENT, 451))

    async def test_data_554(self) -> None:
        outcome, server = await self.stage(Stage.DATA, 554)
        self.assertEqual((outcome.status, outcome.code), (Status.PERMANENT, 554))

    async def test_end_of_data_452(self) -> None:
        outcome, server = await self.stage(Stage.END_OF_DATA, 452)
        self.assertEqual((outcome.status, outcome.code), (Status.TRANSIENT, 452))

    async def test_end_of_data_552(self) -> None:
        outcome, server = await self.stage(Stage.END_OF_DATA, 552)
        self.assertEqual((outcome.status, outcome.code, outcome.message), (Status.PERMANENT, 552, "scripted"))

    async def test_mixed_recipients(self) -> None:
        """
        Several recipients in ONE transaction: 250, 450 and 550 to RCPT give
        delivered, transient and permanent; only the accepted one got DATA.
        """
        carol, dave = "carol@example.com", "dave@example.com"
        server = self.server(
            Behaviour(
                certificate=_CERTS["valid"],
                recipient_replies={carol: Reply(450, "later"), dave: Reply(550, "no such user")},
            )
        )
        self.policy("enforce")
        result = await self.deliver(recipients=(BOB, carol, dave))
        self.assertEqual(
            [(o.recipient, o.status, o.code) for o in result.outcomes],
            [(BOB, Status.DELIVERED, 250), (carol, Status.TRANSIENT, 450), (dave, Status.PERMANENT, 550)],
        )
        self.assertEqual(result.outcome(dave).message, "no such user")
        self.assertEqual(len(server.sessions), 1)
        [message] = server.messages
        self.assertEqual(message.recipients, (BOB,))
        self.assertEqual([c.verb for c in server.sessions[0].commands].count("MAIL"), 1)

    async def test_drop_during_data(self) -> None:
        """The server drops the connection mid-DATA: transient, nothing accepted."""
        server = self.server(Behaviour(certificate=_CERTS["valid"], drop_during_data=True))
        self.policy("enforce")
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertFalse(any(m.accepted for m in server.messages))

    async def test_drop_during_data_failover(self) -> None:
        """Dropped while the message is still being sent: mx2 gets it."""
        self.server(Behaviour(certificate=_CERTS["valid"], drop_during_data=True), host=MX1, preference=10)
        second = self.server(Behaviour(certificate=_VALID2), host=MX2, preference=20)
        self.policy("enforce")
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 4000
        result = await self.deliver(message=big)
        outcome = result.outcomes[0]
        if outcome.status is Status.DELIVERED:
            self.assertEqual(outcome.mx_host, MX2)
            self.assertEqual(second.messages[0].data, big)
        else:
            # The whole message left before the drop: maybe delivered (RFC 1047).
            self.assertEqual(outcome.status, Status.TRANSIENT)
            self.assertIn("may have been delivered", outcome.message)


class TimeoutTests(DeliveryWorld):
    """Reply, session and end-of-data timeouts with short settings."""

    async def test_reply_timeout_greeting(self) -> None:
        server = self.server(Behaviour(certificate=_CERTS["valid"], stall_at=Stage.GREETING))
        result = await self.deliver(reply_timeout=0.3)
        outcome = result.outcomes[0]
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertIn("no reply to the greeting within 0.3 s", outcome.message)
        self.assertEqual(len(server.sessions), 1)

    async def test_session_timeout(self) -> None:
        """The whole session is bounded even when each reply would be waited for longer."""
        self.server(Behaviour(certificate=_CERTS["valid"], stall_at=Stage.RCPT))
        self.policy("enforce")
        result = await self.deliver(reply_timeout=30, session_timeout=0.5)
        outcome = result.outcomes[0]
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertIn("session timed out after 0.5 s", outcome.message)

    async def test_end_of_data_timeout_not_retried(self) -> None:
        """No reply to the final dot: transient, and not sent to mx2 (RFC 1047)."""
        self.server(Behaviour(certificate=_CERTS["valid"], stall_at=Stage.END_OF_DATA), host=MX1, preference=10)
        second = self.server(Behaviour(certificate=_VALID2), host=MX2, preference=20)
        self.policy("enforce")
        result = await self.deliver(reply_timeout=0.3)
        outcome = result.outcomes[0]
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertIn("may have been delivered", outcome.message)
        self.assertEqual(second.sessions, [])

    async def test_tls_stall_enforce(self) -> None:
        """A STARTTLS that never replies under enforce: transient, nothing sent."""
        server = self.server(Behaviour(certificate=_CERTS["valid"], stall_at=Stage.STARTTLS))
        self.policy("enforce")
        result = await self.deliver(reply_timeout=0.3)
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertNothingSent(server)


class MessageTests(DeliveryWorld):
    """8-bit, SMTPUTF8, SIZE and streaming."""

    EIGHT_BIT = "Subject: café\r\n\r\nÇa va?\r\n".encode()

    async def test_8bit_without_8bitmime(self) -> None:
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        result = await self.deliver(message=self.EIGHT_BIT)
        outcome = result.outcomes[0]
        self.assertEqual(outcome.status, Status.PERMANENT)
        self.assertIn("8BITMIME", outcome.message)
        self.assertTrue(outcome.message.startswith("5.6.3"))
        self.assertNothingSent(server)

    async def test_8bit_with_8bitmime(self) -> None:
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=("8BITMIME",)))
        self.policy("enforce")
        result = await self.deliver(message=self.EIGHT_BIT)
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        [mail] = [c for c in server.sessions[0].commands if c.verb == "MAIL"]
        self.assertIn(b"BODY=8BITMIME", mail.line)
        self.assertEqual(server.messages[0].data, self.EIGHT_BIT)

    async def test_smtputf8_needed(self) -> None:
        """A non-ASCII local part needs SMTPUTF8; the others still go."""
        jose = "josé@example.com"
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        result = await self.deliver(recipients=(BOB, jose))
        self.assertEqual(result.outcome(BOB).status, Status.DELIVERED)
        self.assertEqual(result.outcome(jose).status, Status.PERMANENT)
        self.assertIn("SMTPUTF8", result.outcome(jose).message)
        self.assertEqual(server.messages[0].recipients, (BOB,))
        [mail] = [c for c in server.sessions[0].commands if c.verb == "MAIL"]
        self.assertNotIn(b"SMTPUTF8", mail.line)

    async def test_smtputf8_offered(self) -> None:
        """With SMTPUTF8 offered, MAIL says SMTPUTF8 and RCPT carries UTF-8."""
        jose = "josé@example.com"
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=("SMTPUTF8", "8BITMIME")))
        self.policy("enforce")
        await self.deliver(recipients=(BOB, jose))
        commands = [c.line for c in server.sessions[0].commands]
        self.assertTrue(any(line.startswith(b"MAIL") and line.endswith(b" SMTPUTF8") for line in commands))
        self.assertIn("RCPT TO:<josé@example.com>".encode(), commands)

    async def test_size_limit(self) -> None:
        """A message above the server's SIZE: permanent, not sent."""
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=("SIZE 10",)))
        self.policy("enforce")
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.PERMANENT)
        self.assertTrue(result.outcomes[0].message.startswith("5.3.4"))
        self.assertNothingSent(server)

    async def test_size_param(self) -> None:
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=("SIZE 100000",)))
        self.policy("enforce")
        await self.deliver()
        [mail] = [c for c in server.sessions[0].commands if c.verb == "MAIL"]
        self.assertTrue(mail.line.endswith(b" SIZE=%d" % len(MESSAGE)), mail.line)

    async def test_big_message_streamed(self) -> None:
        """5 MB from a temporary file, over verified TLS, read in chunks."""
        path = self.mktemp()
        line = b"." + b"y" * 997 + b"\r\n"  # every line needs dot-stuffing
        with open(path, "wb") as f:
            f.write(b"Subject: big\r\n\r\n")
            for _ in range(5 * 1024):
                f.write(line * 1)
                f.write(b"z" * 1022 + b"\r\n" * 1)
            size = f.tell()
        self.assertGreater(size, 5_000_000 // 2)
        with open(path, "rb", buffering=0) as raw:
            spy = _ReadSpy(raw)
            server = self.server(Behaviour(certificate=_CERTS["valid"]))
            self.policy("enforce")
            result = await self.deliver(message=spy)
            self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
            self.assertLessEqual(spy.largest, 64 * 1024)
            self.assertEqual(spy.tell(), 0)
        with open(path, "rb") as f:
            self.assertEqual(server.messages[0].data, f.read())

    def test_encoder(self) -> None:
        """CRLF normalisation and dot-stuffing across chunk boundaries."""
        cases = [
            ([b""], b".\r\n"),
            ([b"a\nb"], b"a\r\nb\r\n.\r\n"),
            ([b"a\r", b"\nb\r\n"], b"a\r\nb\r\n.\r\n"),
            ([b"a\r", b"b"], b"a\r\nb\r\n.\r\n"),
            ([b"a\r"], b"a\r\n.\r\n"),
            ([b".x\r\n.", b".y\r\n"], b"..x\r\n...y\r\n.\r\n"),
            ([b"x\r\n", b".\r\n"], b"x\r\n..\r\n.\r\n"),
            ([b"x\r", b"\n.", b"\r\n"], b"x\r\n..\r\n.\r\n"),
        ]
        for chunks, expected in cases:
            encoder = _DataEncoder()
            out = b"".join(encoder.encode(c) for c in chunks) + encoder.finish()
            self.assertEqual(out, expected, chunks)

    def test_scan(self) -> None:
        f = io.BytesIO(b"xx" + self.EIGHT_BIT)
        f.seek(2)
        self.assertEqual(scan_message(f), MessageInfo(2, len(self.EIGHT_BIT), True))
        self.assertEqual(f.tell(), 2)
        self.assertFalse(scan_message(io.BytesIO(MESSAGE)).eight_bit)


class APITests(DeliveryWorld):
    """Arguments, the module function, the sink, the example."""

    def test_sink_interface(self) -> None:
        verifyObject(IResultSink, ListSink())

    async def test_several_domains(self) -> None:
        d = self.deliverer().deliver(SENDER, [BOB, "x@example.net"], io.BytesIO(MESSAGE))
        self.failureResultOf(d, ValueError)

    async def test_no_recipients(self) -> None:
        self.failureResultOf(self.deliverer().deliver(SENDER, [], io.BytesIO(MESSAGE)), ValueError)

    async def test_bad_address(self) -> None:
        d = self.deliverer().deliver("a b@example.org", [BOB], io.BytesIO(MESSAGE))
        self.failureResultOf(d, ValueError)

    async def test_module_function(self) -> None:
        """deliver() with keyword settings; the null sender."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        result = await deliver(
            reactor,
            self.resolver,
            self.cache,
            "",
            [BOB],
            io.BytesIO(MESSAGE),
            trust_root=_PKI.ca_pem,
            settings=DeliverySettings(port_for=self.ports, reply_timeout=3),
        )
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertEqual(server.messages[0].mail_from, "")

    def test_example_compiles(self) -> None:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "relay_delivery.py")
        with open(path, encoding="utf-8") as f:
            compile(f.read(), path, "exec")

    async def test_failing_sink(self) -> None:
        """A sink that raises does not fail the delivery (IResultSink: must not fail the caller)."""

        @implementer(IResultSink)
        class Broken:
            def record(self, result: Result, when: float | None = None) -> None:
                raise RuntimeError("sink down")

        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        deliverer = Deliverer(
            reactor, self.resolver, self.cache, trust_root=_PKI.ca_pem, sink=Broken(),
            settings=DeliverySettings(port_for=self.ports, reply_timeout=3),
        )
        result = await deliverer.deliver(SENDER, [BOB], io.BytesIO(MESSAGE))
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertEqual(len(server.messages), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    async def test_cache_error_is_transient(self) -> None:
        """An unexpected policy cache error (store down): transient, never fail open."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))

        class Down:
            def get(self, domain: str) -> Any:
                from twisted.internet.defer import fail

                return fail(RuntimeError("store down"))

        deliverer = Deliverer(reactor, self.resolver, Down(), trust_root=_PKI.ca_pem,
                              settings=DeliverySettings(port_for=self.ports))
        result = await deliverer.deliver(SENDER, [BOB], io.BytesIO(MESSAGE))
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertEqual(result.results, ())
        self.assertEqual(server.sessions, [])
        self.flushLoggedErrors(RuntimeError)


class TLSContextReuseTests(DeliveryWorld):
    """One OpenSSL context per MX host for all sessions of a L{Deliverer}."""

    async def test_context_built_once_per_host(self) -> None:
        """
        Three sessions to one MX host build its client TLS options once;
        an enforce session to a host with a bad certificate is still
        refused and its outcome recorded after sessions that verified.
        """
        from mtasts_twisted import tls as tls_module

        built: list[str] = []
        real = tls_module.ssl.optionsForClientTLS

        def counting(hostname: str, *args: Any, **kwargs: Any) -> Any:
            built.append(hostname)
            return real(hostname, *args, **kwargs)

        self.patch(tls_module.ssl, "optionsForClientTLS", counting)
        first = self.server(Behaviour(certificate=_CERTS["valid"]), host=MX1, preference=10)
        self.policy("enforce")
        deliverer = self.deliverer()
        for _ in range(3):
            result = await deliverer.deliver(SENDER, [BOB], io.BytesIO(MESSAGE))
            self.assertEqual((result.outcomes[0].status, result.outcomes[0].verified), (Status.DELIVERED, True))
        self.assertEqual(len(first.messages), 3)
        self.assertEqual(built, [MX1])
        # The same host now presents an expired certificate: refused.
        first.behaviour = attrs.evolve(first.behaviour, certificate=_CERTS["expired"])
        result = await deliverer.deliver(SENDER, [BOB], io.BytesIO(MESSAGE))
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertEqual(self.failures(result), [(ResultType.CERTIFICATE_EXPIRED, "X509_V_ERR_CERT_HAS_EXPIRED")])
        self.assertEqual(len(first.messages), 3)
        self.assertEqual(built, [MX1])
