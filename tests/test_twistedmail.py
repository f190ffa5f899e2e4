"""
Tests for L{mtasts_twisted.twistedmail}: twisted.mail's own sender driven
by the planner, in the loopback world (DNS and HTTPS policy servers, the
real fetcher, STARTTLS servers with the test PKI).

The matrix: policy C{enforce} / C{testing} / C{none} × MX host with a valid
certificate, an untrusted one, an expired one, one for the wrong name, no
STARTTLS, and an MX host outside the policy: the recipient's outcome, the
TLSRPT results (compared with the L{Deliverer}'s for the same case: one
planner, two senders), and on the server side that nothing reached an
C{enforce} domain in plaintext or over unverified TLS.
"""

from __future__ import annotations

import io
import random
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.mail import smtp
from twisted.python.failure import Failure
from twisted.trial import unittest

from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.delivery import Deliverer, DeliverySettings, HostAction, Status, plan_host
from mtasts_twisted.dns import MXHost
from mtasts_twisted.policy import Mode, parse_policy
from mtasts_twisted.results import PolicyType, Result, ResultType
from mtasts_twisted.store import MemoryStore
from mtasts_twisted.testing.sinks import ListSink
from mtasts_twisted.testing.smtp import Behaviour, Reply, SMTPTestServer, Stage, StartTLS
from mtasts_twisted.testing.world import LoopbackWorld
from mtasts_twisted.tls import MXTLSOptionsCache, VerifyMode
from mtasts_twisted.twistedmail import (
    DomainSender,
    MTASTSDeliveryError,
    MTASTSSender,
    Router,
    SendmailResult,
    SessionAttempt,
    classify,
    requirements,
)

SENDER = "alice@example.org"
MESSAGE = b"Subject: hello\r\nFrom: alice@example.org\r\n\r\nHello Bob.\r\n.leading dot\r\n"

#: The matrix cases: the TLSRPT failure each causes under an sts policy
#: (None: verified TLS).  "outside": an MX host the policy does not list.
CASES: dict[str, tuple[ResultType, str | None] | None] = {
    "valid": None,
    "untrusted": (ResultType.CERTIFICATE_NOT_TRUSTED, "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY"),
    "expired": (ResultType.CERTIFICATE_EXPIRED, "X509_V_ERR_CERT_HAS_EXPIRED"),
    "wrong-name": (ResultType.CERTIFICATE_HOST_MISMATCH, None),
    "no-starttls": (ResultType.STARTTLS_NOT_SUPPORTED, "starttls-not-offered"),
    "outside": (ResultType.VALIDATION_FAILURE, "mtasts-policy-mx-mismatch"),
}


def policy_text(mode: str, *mx: str) -> str:
    return "\n".join(["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]) + "\n"


def summary(results: tuple[Result, ...] | list[Result]) -> list[tuple[Any, ...]]:
    """Results without their timestamps, comparable across senders."""
    return [
        (r.policy.policy_type, r.policy.policy_domain, r.success_count, r.failure_count,
         tuple((f.result_type, f.failure_reason_code, f.receiving_mx_hostname, f.receiving_ip) for f in r.failures))
        for r in results
    ]


class HookWorld(unittest.TestCase):
    """The loopback world, a policy cache, and the hook's sender."""

    timeout = 60

    def setUp(self) -> None:
        self.world = LoopbackWorld.start(reactor, fetch_timeout=5.0, dns_timeout=1.0)
        self.addCleanup(self.world.stop)
        self.pki = self.world.pki
        self.cache = PolicyCache(MemoryStore(), self.world.resolver, self.world.fetcher, reactor)
        self.sink = ListSink()
        self.ports: dict[str, int] = {}

    def server(self, behaviour: Behaviour, host: str, domain: str | None = None, preference: int = 10,
               ip: str = "127.0.0.1") -> SMTPTestServer:
        """An SMTP server for MX host C{host} (of C{domain}, if given)."""
        server = SMTPTestServer(behaviour, reactor=reactor)
        self.ports[host] = server.start()
        self.addCleanup(server.stop)
        self.world.dns.remove(host, "A")
        self.world.dns.add_a(host, ip)
        if domain is not None:
            self.world.dns.add_mx(domain, preference, host)
        return server

    def settings(self, **overrides: Any) -> DeliverySettings:
        values: dict[str, Any] = dict(helo_name="client.test", port=1, port_for=self.ports, connect_timeout=3,
                                      reply_timeout=3, session_timeout=10)
        values.update(overrides)
        return DeliverySettings(**values)

    def sender(self, **overrides: Any) -> MTASTSSender:
        settings = self.settings(**overrides)
        router = Router(self.world.resolver, self.cache, MXTLSOptionsCache(self.pki.ca_pem), self.sink, settings,
                        rng=random.Random(1))
        return MTASTSSender(DomainSender(reactor, router, settings))

    def deliverer(self, sink: ListSink) -> Deliverer:
        return Deliverer(reactor, self.world.resolver, self.cache, trust_root=self.pki.ca_pem, sink=sink,
                         settings=self.settings(), rng=random.Random(1))

    async def send(self, *recipients: str, message: bytes = MESSAGE, **overrides: Any) -> SendmailResult:
        result = await self.sender(**overrides).deliver(SENDER, list(recipients), io.BytesIO(message))
        self.assertEqual(self.sink.results, [r for d in result.deliveries for r in d.results])
        return result

    def assertNothingSent(self, server: SMTPTestServer, case: str) -> None:
        """No MAIL, RCPT or DATA reached the server at all, TLS or not."""
        verbs = {c.verb for s in server.sessions for c in s.commands}
        self.assertFalse(verbs & {"MAIL", "RCPT", "DATA", "BDAT", "AUTH"}, case)
        self.assertEqual(server.messages, [], case)


class MatrixTests(HookWorld):
    """Policy mode × MX host: outcome, TLSRPT results, what the server saw."""

    async def check_mode(self, mode: str) -> None:
        for case, failure in CASES.items():
            self.sink.results.clear()
            domain = f"{case}-{mode}.test"
            listed = f"mx.{domain}"
            host = f"mx.other-{mode}.test" if case == "outside" else listed
            behaviour = {
                "valid": Behaviour(certificate=self.pki.valid(host)),
                "untrusted": Behaviour(certificate=self.pki.untrusted(host)),
                "expired": Behaviour(certificate=self.pki.expired(host)),
                "wrong-name": Behaviour(certificate=self.pki.valid("other.example.net")),
                "no-starttls": Behaviour(starttls=StartTLS.NOT_OFFERED),
                "outside": Behaviour(certificate=self.pki.valid(host)),
            }[case]
            server = self.server(behaviour, host, domain)
            self.world.publish(domain, policy_text(mode, listed))
            bob = "bob@" + domain

            result = await self.send(bob)
            [outcome] = result.outcomes
            [delivery] = result.deliveries
            where = f"{mode}/{case}"
            self.assertEqual(delivery.policy_mode, Mode(mode), where)
            sessions = [(r.success_count, [(f.result_type, f.failure_reason_code) for f in r.failures])
                        for r in delivery.results[1:]]
            sts = mode != "none"
            self.assertEqual(delivery.results[0].policy.policy_type,
                             PolicyType.STS if sts else PolicyType.NO_POLICY_FOUND, where)
            # Nothing of any message ever crossed in plaintext to an enforce domain.
            if mode == "enforce":
                self.assertEqual(server.plaintext_transactions(), [], where)
                self.assertTrue(all(m.tls and m.tls_at_mail for m in server.messages), where)

            if mode == "enforce" and failure is not None:
                self.assertEqual(outcome.status, Status.TRANSIENT, where)
                self.assertTrue(outcome.message.startswith("4.7.5"), (where, outcome.message))
                self.assertNothingSent(server, where)
                self.assertEqual(len(server.sessions), 0 if case == "outside" else 1, where)
                self.assertEqual(sessions, [(0, [failure])], where)
                [detail] = delivery.results[1].failures
                self.assertEqual(detail.receiving_ip, None if case == "outside" else "127.0.0.1", where)
            else:
                self.assertEqual((outcome.status, outcome.code, outcome.mx_host), (Status.DELIVERED, 250, host),
                                 (where, outcome))
                [message] = server.messages
                self.assertEqual((message.mail_from, message.recipients, message.data, message.accepted),
                                 (SENDER, (bob,), MESSAGE, True), where)
                tls = case != "no-starttls"
                self.assertEqual((message.tls, message.sni), (tls, host if tls else None), where)
                self.assertEqual(outcome.tls_version, message.tls_version, where)
                self.assertEqual(outcome.verified, case in ("valid", "outside"), where)
                if sts:
                    self.assertEqual(sessions, [(1, [])] if failure is None else [(0, [failure])], where)
                elif tls:
                    # No policy asked for verification: TLS is a success.
                    self.assertEqual(sessions, [(1, [])], where)
                else:
                    # No TLS negotiation and no policy: nothing to report.
                    self.assertEqual(sessions, [], where)

            # One planner, two senders: the Deliverer reports the same.
            before = len(server.messages)
            deliverer_sink = ListSink()
            expected = await self.deliverer(deliverer_sink).deliver(SENDER, [bob], io.BytesIO(MESSAGE))
            self.assertEqual(summary(delivery.results), summary(expected.results), where)
            self.assertEqual(expected.outcomes[0].status, outcome.status, where)
            self.assertEqual(len(server.messages) - before, 1 if outcome.status is Status.DELIVERED else 0, where)

    async def test_enforce(self) -> None:
        """Enforce: verified TLS or nothing; every failure reported."""
        await self.check_mode("enforce")

    async def test_testing(self) -> None:
        """Testing: delivered whatever the certificate; failures reported."""
        await self.check_mode("testing")

    async def test_none(self) -> None:
        """Mode none: opportunistic STARTTLS; a TLS session counts as success."""
        await self.check_mode("none")


DOMAIN = "example.test"
MX1 = "mx1.example.test"
MX2 = "mx2.example.test"
BOB = "bob@" + DOMAIN
CAROL = "carol@" + DOMAIN


class FallbackTests(HookWorld):
    """STARTTLS refused or failing: plaintext retry where the policy allows it, never under enforce."""

    async def test_refused_starttls(self) -> None:
        """454 to STARTTLS: enforce defers (one session); testing and none retry in plaintext, reported once."""
        for mode in ("enforce", "testing", "none"):
            domain = f"refused-{mode}.test"
            host = "mx." + domain
            server = self.server(Behaviour(certificate=self.pki.valid(host), starttls=StartTLS.REFUSE), host, domain)
            self.world.publish(domain, policy_text(mode, host))
            self.sink.results.clear()
            result = await self.send("bob@" + domain)
            [outcome] = result.outcomes
            sessions = summary(result.deliveries[0].results[1:])
            refused = (ResultType.STARTTLS_NOT_SUPPORTED, "starttls-refused-454", host, "127.0.0.1")
            if mode == "enforce":
                self.assertEqual((outcome.status, outcome.code), (Status.TRANSIENT, 454), mode)
                self.assertNothingSent(server, mode)
                self.assertEqual(len(server.sessions), 1, mode)
            else:
                self.assertEqual((outcome.status, outcome.tls_version), (Status.DELIVERED, None), mode)
                self.assertEqual(len(server.sessions), 2, mode)
                [message] = server.messages
                self.assertFalse(message.tls)
            if mode == "none":
                # No policy: a session without TLS is not reported.
                self.assertEqual(sessions, [], mode)
            else:
                self.assertEqual([s[2:] for s in sessions], [(0, 1, (refused,))], mode)

    async def test_failed_handshake_retried_in_plaintext(self) -> None:
        """A TLS 1.1-only server (protocol_version alert): testing retries without STARTTLS; one failure reported."""
        host = "mx.alert.test"
        server = self.server(Behaviour(certificate=self.pki.valid(host), starttls=StartTLS.ALERT), host, "alert.test")
        self.world.publish("alert.test", policy_text("testing", host))
        result = await self.send("bob@alert.test")
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertEqual(len(server.sessions), 2)
        self.assertEqual([m.tls for m in server.messages], [False])
        [session] = result.deliveries[0].results[1:]
        self.assertEqual([(f.result_type, f.failure_reason_code) for f in session.failures],
                         [(ResultType.VALIDATION_FAILURE, "tls-alert-protocol-version")])

    async def test_require_transport_security(self) -> None:
        """requireTransportSecurity=True: no plaintext even without a policy."""
        server = self.server(Behaviour(starttls=StartTLS.NOT_OFFERED), MX1, DOMAIN)
        with self.assertRaises(MTASTSDeliveryError) as caught:
            await self.sender().sendmail(SENDER, [BOB], io.BytesIO(MESSAGE), requireTransportSecurity=True)
        self.assertTrue(caught.exception.retry)
        self.assertNothingSent(server, "requireTransportSecurity")

    async def test_starttls_response_injection(self) -> None:
        """Plaintext injected after '220 go ahead': twisted.mail queues MAIL into TLS, which never verifies."""
        from tests.test_faults import RawSMTP

        raw = RawSMTP(b"220 mx1.example.test ESMTP\r\n", script=(
            (b"EHLO", b"250-mx1.example.test\r\n250 STARTTLS\r\n"),
            (b"STARTTLS", b"220 go ahead\r\n250 injected\r\n"),
        ))
        self.addCleanup(raw.stop)
        self.world.dns.add_a(MX1, "127.0.0.1")
        self.world.dns.add_mx(DOMAIN, 10, MX1)
        self.ports[MX1] = raw.port
        self.world.publish(DOMAIN, policy_text("enforce", MX1))
        result = await self.send(BOB, reply_timeout=0.5)
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertNotIn(b"MAIL", raw.received)
        self.assertNotIn(b"RCPT", raw.received)


class FailoverTests(HookWorld):
    """Several MX hosts, replies per recipient, timeouts."""

    async def test_failover_after_certificate_failure(self) -> None:
        """Enforce: mx1's expired certificate moves on to mx2; both sessions reported."""
        first = self.server(Behaviour(certificate=self.pki.expired(MX1)), MX1, DOMAIN, preference=10)
        second = self.server(Behaviour(certificate=self.pki.valid(MX2)), MX2, DOMAIN, preference=20)
        self.world.publish(DOMAIN, policy_text("enforce", MX1, MX2))
        result = await self.send(BOB)
        outcome = result.outcomes[0]
        self.assertEqual((outcome.status, outcome.mx_host, outcome.verified), (Status.DELIVERED, MX2, True))
        self.assertNothingSent(first, "mx1")
        self.assertEqual(len(second.messages), 1)
        self.assertEqual([s[2:] for s in summary(result.deliveries[0].results[1:])], [
            (0, 1, ((ResultType.CERTIFICATE_EXPIRED, "X509_V_ERR_CERT_HAS_EXPIRED", MX1, "127.0.0.1"),)),
            (1, 0, ()),
        ])

    async def test_skipped_host_reported_once_then_next(self) -> None:
        """Enforce: a host outside the policy is skipped (never contacted); the listed one delivers."""
        evil = self.server(Behaviour(certificate=self.pki.valid("mx.evil.test")), "mx.evil.test", DOMAIN, preference=5)
        good = self.server(Behaviour(certificate=self.pki.valid(MX1)), MX1, DOMAIN)
        self.world.publish(DOMAIN, policy_text("enforce", MX1))
        result = await self.send(BOB)
        self.assertEqual(result.outcomes[0].mx_host, MX1)
        self.assertEqual(evil.sessions, [])
        self.assertEqual(len(good.messages), 1)
        self.assertEqual([s[2:] for s in summary(result.deliveries[0].results[1:])], [
            (0, 1, ((ResultType.VALIDATION_FAILURE, "mtasts-policy-mx-mismatch", "mx.evil.test", None),)),
            (1, 0, ()),
        ])

    async def test_replies_per_recipient(self) -> None:
        """RCPT 550 and 451 decide those recipients; the others are delivered in the same transaction."""
        server = self.server(Behaviour(certificate=self.pki.valid(MX1), recipient_replies={
            CAROL: Reply(550, "no such user"), "dave@example.test": Reply(451, "later")}), MX1, DOMAIN)
        numOk, replies = await self.sender().sendmail(SENDER, [BOB, CAROL, "dave@example.test"], MESSAGE)
        self.assertEqual(numOk, 1)
        self.assertEqual([(a, c) for a, c, _ in replies],
                         [(BOB.encode(), 250), (CAROL.encode(), 550), (b"dave@example.test", 451)])
        self.assertEqual(replies[1][2], b"no such user")
        [message] = server.messages
        self.assertEqual(message.recipients, (BOB,))

    async def test_no_reply_after_end_of_data(self) -> None:
        """No reply to the final dot: transient, and not sent to mx2 as well (RFC 1047)."""
        first = self.server(Behaviour(certificate=self.pki.valid(MX1), stall_at=Stage.END_OF_DATA), MX1, DOMAIN)
        second = self.server(Behaviour(certificate=self.pki.valid(MX2)), MX2, DOMAIN, preference=20)
        result = await self.send(BOB, reply_timeout=0.5)
        outcome = result.outcomes[0]
        self.assertEqual((outcome.status, outcome.mx_host), (Status.TRANSIENT, MX1))
        self.assertTrue(outcome.message.startswith("4.4.2"), outcome.message)
        self.assertEqual(second.sessions, [])
        self.assertEqual(len(first.sessions), 1)

    async def test_session_timeout(self) -> None:
        """A server that trickles nothing after the greeting: the session ends at session_timeout, next host."""
        self.server(Behaviour(certificate=self.pki.valid(MX1), stall_at=Stage.EHLO), MX1, DOMAIN)
        second = self.server(Behaviour(certificate=self.pki.valid(MX2)), MX2, DOMAIN, preference=20)
        result = await self.send(BOB, reply_timeout=30, session_timeout=0.5)
        self.assertEqual(result.outcomes[0].mx_host, MX2)
        self.assertEqual(len(second.messages), 1)

    async def test_ipv6_then_ipv4(self) -> None:
        """AAAA first: ::1 (nothing listens there) fails, 127.0.0.1 delivers; no TLSRPT result for the refusal."""
        server = self.server(Behaviour(certificate=self.pki.valid(MX1)), MX1, DOMAIN)
        self.world.dns.add_aaaa(MX1, "::1")
        self.world.publish(DOMAIN, policy_text("enforce", MX1))
        route = await Router(self.world.resolver, self.cache, MXTLSOptionsCache(self.pki.ca_pem)).route(DOMAIN)
        self.assertEqual(route.hosts[0].addresses, ("::1", "127.0.0.1"))
        result = await self.send(BOB)
        self.assertEqual((result.outcomes[0].status, result.outcomes[0].verified), (Status.DELIVERED, True))
        self.assertEqual(len(server.sessions), 1)
        self.assertEqual([s[2:] for s in summary(result.deliveries[0].results[1:])], [(1, 0, ())])

    async def test_cancel(self) -> None:
        """Like twisted.mail's sendmail, the Deferred is cancellable: the session is aborted at once."""
        from twisted.internet.defer import CancelledError
        from twisted.internet.task import deferLater

        server = self.server(Behaviour(certificate=self.pki.valid(MX1), stall_at=Stage.MAIL), MX1, DOMAIN)
        d = self.sender().sendmail(SENDER, [BOB], MESSAGE)
        for _ in range(300):
            if any(c.verb == "MAIL" for s in server.sessions for c in s.commands):
                break
            await deferLater(reactor, 0.01, lambda: None)
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        await session_closed(server.sessions[0])
        self.assertTrue(server.sessions[0].closed)
        self.assertEqual(server.messages, [])

    async def test_dot_stuffing_across_chunks(self) -> None:
        """A '.' line at a 16 KiB chunk boundary (twisted.mail stuffs per chunk only) arrives intact."""
        server = self.server(Behaviour(certificate=self.pki.valid(MX1)), MX1, DOMAIN)
        body = b"Subject: dots\n\n" + b"x" * (16384 - 16) + b"\n" + b".\nafter the dot\n"
        self.assertEqual(body[16384:16386], b".\n")
        result = await self.send(BOB, message=body)
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        [message] = server.messages
        self.assertEqual(message.data, body.replace(b"\n", b"\r\n"))


class SendmailShapeTests(HookWorld):
    """twisted.mail's sendmail contract: result tuple, exceptions, grouping by domain."""

    async def test_two_domains(self) -> None:
        """Recipients grouped per domain, each under its own policy; one numOk and reply list."""
        self.server(Behaviour(certificate=self.pki.valid(MX1)), MX1, DOMAIN)
        strict = self.server(Behaviour(certificate=self.pki.untrusted("mx.strict.test")), "mx.strict.test",
                             "strict.test")
        self.world.publish("strict.test", policy_text("enforce", "mx.strict.test"))
        numOk, replies = await self.sender().sendmail(
            SENDER.encode(), [b"x@strict.test", BOB.encode()], MESSAGE, senderDomainName="me.test")
        self.assertEqual(numOk, 1)
        self.assertEqual([(a, c) for a, c, _ in replies], [(b"x@strict.test", 451), (BOB.encode(), 250)])
        self.assertTrue(replies[0][2].startswith(b"4.7.5 no MX host of strict.test"), replies[0][2])
        self.assertNothingSent(strict, "strict")
        self.assertEqual([c.line for c in strict.sessions[0].commands][:1], [b"EHLO me.test"])

    async def test_nothing_delivered_fails(self) -> None:
        """No recipient got it: MTASTSDeliveryError (an SMTPDeliveryError), retry when transient."""
        self.world.dns.add_record("null.test", "MX", "0 .")
        with self.assertRaises(MTASTSDeliveryError) as caught:
            await self.sender().sendmail(SENDER, "bob@null.test", b"Subject: x\n\nx\n")
        error = caught.exception
        self.assertIsInstance(error, smtp.SMTPDeliveryError)
        self.assertEqual((error.code, error.retry), (556, False))
        self.assertEqual([(a, c) for a, c, _ in error.addresses], [(b"bob@null.test", 556)])
        self.assertEqual(error.result.outcomes[0].status, Status.PERMANENT)

    async def test_addresses_twisted_mail_cannot_send(self) -> None:
        """A UTF-8 local part (SMTPUTF8) and an address literal fail permanently, without a connection."""
        result = await self.send("jörg@example.test", "bob@[127.0.0.1]")
        self.assertEqual([o.status for o in result.outcomes], [Status.PERMANENT, Status.PERMANENT])
        self.assertTrue(result.outcomes[0].message.startswith("5.6.7"))
        self.assertEqual(result.deliveries, ())

    async def test_idn_domain_and_null_sender(self) -> None:
        """A U-label domain is sent as A-labels; the null sender as <>."""
        host = "mx.xn--bcher-kva.test"
        server = self.server(Behaviour(certificate=self.pki.valid(host)), host, "xn--bcher-kva.test")
        result = await self.sender().deliver("", ["bob@bücher.test"], io.BytesIO(MESSAGE))
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertEqual(result.addresses, (b"bob@xn--bcher-kva.test",))
        self.assertEqual(server.messages[0].mail_from, "")
        self.assertEqual(server.messages[0].recipients, ("bob@xn--bcher-kva.test",))

    async def test_unseekable_file(self) -> None:
        """A pipe-like message is copied once, so failover can send it again."""

        class Pipe(io.RawIOBase):
            def __init__(self, data: bytes) -> None:
                self._data = io.BytesIO(data)

            def readable(self) -> bool:
                return True

            def readinto(self, b: Any) -> int:
                chunk = self._data.read(len(b))
                b[: len(chunk)] = chunk
                return len(chunk)

        self.server(Behaviour(certificate=self.pki.expired(MX1)), MX1, DOMAIN)
        server = self.server(Behaviour(certificate=self.pki.valid(MX2)), MX2, DOMAIN, preference=20)
        self.world.publish(DOMAIN, policy_text("enforce", MX1, MX2))
        numOk, _ = await self.sender().sendmail(SENDER, [BOB], io.BufferedReader(Pipe(MESSAGE)))
        self.assertEqual(numOk, 1)
        self.assertEqual(server.messages[0].data, MESSAGE)


class OwnFactoryTests(HookWorld):
    """The planner with a caller's own twisted.mail ESMTPSenderFactory (the routes docstring's loop)."""

    async def deliver_with_own_factory(self, domain: str) -> list[Any]:
        route = await Router(self.world.resolver, self.cache, MXTLSOptionsCache(self.pki.ca_pem), self.sink,
                             self.settings()).route(domain)
        outcomes = []
        for host in route.hosts:
            if host.skipped:
                route.report_skip(host)
                continue
            for ip in host.addresses:
                attempt = route.attempt(host, ip)
                done: Deferred[Any] = Deferred()
                factory = smtp.ESMTPSenderFactory(
                    None, None, SENDER, ["bob@" + domain], io.BytesIO(MESSAGE), done, retries=0,
                    contextFactory=attempt.context_factory, requireAuthentication=False,
                    requireTransportSecurity=attempt.require_tls)
                reactor.connectTCP(ip, attempt.port, factory)
                result: Any
                try:
                    result = await done
                except Exception as e:
                    result = e
                outcomes.append(route.report(attempt, result))
        return outcomes

    async def test_verified(self) -> None:
        self.server(Behaviour(certificate=self.pki.valid(MX1)), MX1, DOMAIN)
        self.world.publish(DOMAIN, policy_text("enforce", MX1))
        [outcome] = await self.deliver_with_own_factory(DOMAIN)
        self.assertEqual((outcome.value[0], outcome.verified, outcome.tls_decided), (1, True, True))
        self.assertEqual([s[2:] for s in summary(self.sink.results)], [(0, 0, ()), (1, 0, ())])

    async def test_refused_certificate_from_twisted_mail_exception(self) -> None:
        """twisted.mail's SMTPConnectError (cause: TLSVerificationError) becomes the TLSRPT failure."""
        server = self.server(Behaviour(certificate=self.pki.untrusted(MX1)), MX1, DOMAIN)
        self.world.publish(DOMAIN, policy_text("enforce", MX1))
        [outcome] = await self.deliver_with_own_factory(DOMAIN)
        self.assertIsInstance(outcome.error, smtp.SMTPConnectError)
        self.assertFalse(outcome.retry_plaintext)
        [(kind, reason)] = [(f.result_type, f.failure_reason_code) for f in self.sink.results[1].failures]
        self.assertEqual(kind, ResultType.CERTIFICATE_NOT_TRUSTED)
        self.assertNothingSent(server, "own factory")
        for session in server.sessions:
            await session_closed(session)

    async def test_refusals(self) -> None:
        """A skipped host takes no attempt; a TLS-requiring host takes no plaintext attempt."""
        self.world.dns.add_a(MX1, "127.0.0.1")
        self.world.dns.add_a("mx.evil.test", "127.0.0.1")
        self.world.dns.add_mx(DOMAIN, 10, MX1)
        self.world.dns.add_mx(DOMAIN, 5, "mx.evil.test")
        self.world.publish(DOMAIN, policy_text("enforce", MX1))
        route = await Router(self.world.resolver, self.cache, MXTLSOptionsCache(self.pki.ca_pem)).route(DOMAIN)
        [evil, good] = route.hosts
        self.assertEqual((evil.host, evil.skipped, evil.addresses), ("mx.evil.test", True, ()))
        self.assertRaises(ValueError, route.attempt, evil, "127.0.0.1")
        self.assertRaises(ValueError, route.attempt, good, "127.0.0.1", plaintext=True)
        attempt = route.attempt(good, "127.0.0.1")
        self.assertEqual((attempt.require_tls, attempt.verify), (True, VerifyMode.VERIFY))


async def session_closed(session: Any) -> None:
    """Wait (bounded) until the server side of a session has closed."""
    from twisted.internet.task import deferLater

    for _ in range(200):
        if session.closed:
            return
        await deferLater(reactor, 0.01, lambda: None)


class RequirementsTests(unittest.SynchronousTestCase):
    """What each planned host asks of a twisted.mail connection; unknown decisions fail closed."""

    def planned(self, mode: str | None, host: str = "mx.a.test") -> Any:
        policy = parse_policy(policy_text(mode, "mx.a.test")) if mode else None
        return plan_host(policy, MXHost(10, host))

    def test_known_actions(self) -> None:
        self.assertEqual(requirements(self.planned("enforce")), (True, VerifyMode.VERIFY))
        self.assertEqual(requirements(self.planned("testing")), (False, VerifyMode.RECORD_ONLY))
        self.assertEqual(requirements(self.planned("none")), (False, VerifyMode.RECORD_ONLY))
        self.assertEqual(requirements(self.planned(None)), (False, VerifyMode.RECORD_ONLY))

    def test_unknown_action_fails_closed(self) -> None:
        """An action the hook does not know (a later DANE one, say): verified TLS or nothing."""
        for action in ("dane-only", object()):
            target = attrs.evolve(self.planned("none"), action=action)
            self.assertEqual(requirements(target), (True, VerifyMode.VERIFY))
        # A fallback action whose fields ask for more is taken at its word.
        target = attrs.evolve(self.planned("testing"), require_tls=True)
        self.assertEqual(requirements(target), (True, VerifyMode.VERIFY))
        self.assertIs(self.planned("enforce", "mx.b.test").action, HostAction.SKIP)

    def test_classify_twisted_mail_exceptions(self) -> None:
        """454 to STARTTLS, STARTTLS missing where required, a refused greeting."""
        target = self.planned("testing")
        from mtasts_twisted.tls import MXConnectionCreator

        creator = MXConnectionCreator("mx.a.test", self_signed_root(), mode=VerifyMode.RECORD_ONLY)
        attempt = SessionAttempt("a.test", target, "192.0.2.1", 25, False, VerifyMode.RECORD_ONLY, creator)
        refused = classify(attempt, Failure(smtp.TLSError(454, b"TLS not available")))
        self.assertEqual((refused.tls_decided, refused.retry_plaintext), (True, True))
        assert refused.tls_failure is not None
        self.assertEqual(refused.tls_failure.failure_reason_code, "starttls-refused-454")
        missing = classify(attempt, smtp.TLSRequiredError(502, b"no TLS"))
        assert missing.tls_failure is not None
        self.assertEqual(missing.tls_failure.failure_reason_code, "starttls-not-offered")
        greeting = classify(attempt, smtp.SMTPConnectError(554, b"go away"))
        self.assertEqual((greeting.tls_decided, greeting.retry_plaintext), (False, False))
        plaintext = classify(attrs.evolve(attempt, context_factory=None), (1, [(b"b@a.test", 250, b"ok")]))
        self.assertEqual((plaintext.tls_decided, plaintext.value), (False, (1, [(b"b@a.test", 250, b"ok")])))


def self_signed_root() -> bytes:
    from mtasts_twisted.testing.pki import PKI

    return PKI().ca_pem
