"""
Tests for DANE in L{Deliverer} (C{DeliverySettings.dane}): a resolver
answering from dicts (L{FakeResolver}, secure or not per name) and real
SMTP test servers on loopback.  The TLSA name's port label is the port
delivery connects to (RFC 7672 §2.2.3), here the test server's.
The same scenarios on real DNSSEC (Knot, Unbound) are in
C{tests.test_dane_relay}.
"""

from __future__ import annotations

import io
import random
from typing import Any

from cryptography import x509
from twisted.internet import reactor
from twisted.trial import unittest

from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.delivery import Deliverer, DeliveryResult, DeliverySettings, Status
from mtasts_twisted.dns import DNSTemporaryError
from mtasts_twisted.pkix import tlsa_association_data
from mtasts_twisted.results import PolicyType, Result, ResultType
from mtasts_twisted.store import MemoryStore
from mtasts_twisted.testing.memory import FakeFetcher, FakeResolver
from mtasts_twisted.testing.pki import PKI
from mtasts_twisted.testing.sinks import ListSink
from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer, StartTLS
from mtasts_twisted.tlsrpt import Report, merge_results
from tests.test_tlsrpt_report import SETTINGS, validate_report

_PKI = PKI()
DOMAIN = "dane.example"
MX = "mx.dane.example"
SENDER = "alice@example.org"
BOB = "bob@dane.example"
MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n"
SELF_SIGNED = _PKI.self_signed(MX)
OTHER = _PKI.self_signed(MX)


def spki_sha256(certificate: x509.Certificate) -> str:
    data = tlsa_association_data(certificate, 1, 1)
    assert data is not None
    return data.hex()


def policy_text(mode: str, *mx: str) -> str:
    return "".join(["version: STSv1\n", f"mode: {mode}\n", *(f"mx: {m}\n" for m in mx), "max_age: 86400\n"])


class _DANEWorld(unittest.TestCase):
    """A secure FakeResolver, a policy cache, a sink; SMTP test servers per test."""

    timeout = 30

    def setUp(self) -> None:
        self.resolver = FakeResolver(secure=True)
        self.resolver.mx[DOMAIN] = [(10, MX)]
        self.resolver.addresses[MX] = ["127.0.0.1"]
        self.fetcher = FakeFetcher()
        self.cache = PolicyCache(MemoryStore(), self.resolver, self.fetcher, reactor)
        self.sink = ListSink()

    def server(self, behaviour: Behaviour) -> SMTPTestServer:
        server = SMTPTestServer(behaviour, reactor=reactor)
        self.port = server.start()
        self.addCleanup(server.stop)
        return server

    def tlsa(self, *records: tuple[int, int, int, str]) -> None:
        # RFC 7672 §2.2.3: _PORT._tcp.HOST with the port delivery uses.
        self.resolver.tlsa[f"_{self.port}._tcp.{MX}"] = list(records)

    def sts(self, mode: str, *mx: str) -> None:
        self.resolver.txt["_mta-sts." + DOMAIN] = ["v=STSv1; id=1"]
        self.fetcher.policies[DOMAIN] = policy_text(mode, *mx)

    def deliverer(self, **settings: Any) -> Deliverer:
        values: dict[str, Any] = dict(port=self.port, connect_timeout=3, reply_timeout=3, session_timeout=10,
                                      dane=True)
        values.update(settings)
        deliverer = Deliverer(reactor, self.resolver, self.cache, trust_root=_PKI.ca_pem, sink=self.sink,
                              settings=DeliverySettings(**values), rng=random.Random(1))
        self.addCleanup(deliverer.close)
        return deliverer

    async def deliver(self, deliverer: Deliverer | None = None) -> DeliveryResult:
        deliverer = deliverer or self.deliverer()
        result = await deliverer.deliver(SENDER, [BOB], io.BytesIO(MESSAGE))
        self.assertEqual(self.sink.results[-len(result.results):], list(result.results))
        report = Report.build(SETTINGS, DOMAIN, "2024-05-01", "t1", merge_results(result.results))
        validate_report(report.to_json())
        return result

    def tlsa_results(self, result: DeliveryResult) -> list[Result]:
        found = [r for r in result.results if r.policy.policy_type is PolicyType.TLSA]
        for r in found:
            # RFC 8460 §3: the tlsa policy's domain is the TLSA base domain;
            # the report goes to the recipient domain's rua.
            self.assertEqual((r.policy.policy_domain, r.reported_to), (MX, DOMAIN))
        return found

    def assertNothingSent(self, server: SMTPTestServer) -> None:
        self.assertEqual(server.messages, [])
        self.assertEqual(server.plaintext_transactions(), [])
        verbs = [c.verb for s in server.sessions for c in s.commands]
        self.assertNotIn("MAIL", verbs)
        self.assertNotIn("RCPT", verbs)


class DANEDeliveryTests(_DANEWorld):
    async def test_dane_ee_pass_sts_would_refuse(self) -> None:
        """
        DANE-EE with a self-signed certificate: delivered over TLS with SNI
        the TLSA base domain, though an enforced MTA-STS policy does not
        list the host (RFC 8461 §2); one tlsa success, nothing under sts.
        """
        server = self.server(Behaviour(certificate=SELF_SIGNED))
        self.tlsa((3, 1, 1, spki_sha256(SELF_SIGNED.certificates()[0])))
        for sts in (None, ("enforce", "other.example")):
            if sts is not None:
                self.sts(*sts)
            deliverer = self.deliverer()
            result = await self.deliver(deliverer)
            [outcome] = result.outcomes
            self.assertEqual((outcome.status, outcome.verified), (Status.DELIVERED, True), outcome)
            [tlsa] = self.tlsa_results(result)
            self.assertEqual((tlsa.success_count, tlsa.failure_count), (1, 0))
            self.assertEqual(tlsa.policy.policy_strings,
                             (f"3 1 1 {spki_sha256(SELF_SIGNED.certificates()[0])}",))
            self.assertEqual(sum(r.success_count + r.failure_count for r in result.results), 1)
            self.assertEqual(deliverer.dane_lookups["secure-usable"], 1)
        self.assertEqual([(m.tls, m.sni) for m in server.messages], [(True, MX)] * 2)

    async def test_dane_off_by_default(self) -> None:
        """Without C{dane}, no TLSA lookup is made."""
        self.server(Behaviour(certificate=SELF_SIGNED))
        self.tlsa((3, 1, 1, spki_sha256(OTHER.certificates()[0])))
        result = await self.deliver(self.deliverer(dane=False))
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertFalse([q for q in self.resolver.queries if q[0] == "TLSA"])

    async def test_failures_defer(self) -> None:
        """
        Under DANE every failure is transient (never a bounce, never
        plaintext, never unauthenticated TLS), with its tlsa result: a
        TLSA mismatch (tlsa-invalid), a failed TLSA lookup (dnssec-invalid,
        no connection at all), TLSA records and no STARTTLS
        (starttls-not-supported); each with an MTA-STS policy that would
        have accepted the host.
        """
        other = spki_sha256(OTHER.certificates()[0])
        cases = [
            ("mismatch", Behaviour(certificate=_PKI.valid(MX)), [(3, 1, 1, other)], ResultType.TLSA_INVALID),
            ("bogus", Behaviour(certificate=SELF_SIGNED), DNSTemporaryError("SERVFAIL"), ResultType.DNSSEC_INVALID),
            ("no starttls", Behaviour(starttls=StartTLS.NOT_OFFERED), [(3, 1, 1, other)],
             ResultType.STARTTLS_NOT_SUPPORTED),
        ]
        self.sts("enforce", MX)
        for name, behaviour, records, result_type in cases:
            server = self.server(behaviour)
            key = f"_{self.port}._tcp.{MX}"
            self.resolver.tlsa[key] = records
            result = await self.deliver()
            [outcome] = result.outcomes
            self.assertEqual(outcome.status, Status.TRANSIENT, name)
            self.assertTrue(outcome.message.startswith("4.7.5 "), outcome.message)
            self.assertNothingSent(server)
            [tlsa] = self.tlsa_results(result)
            self.assertEqual((tlsa.success_count, tlsa.failure_count), (0, 1), name)
            self.assertEqual([f.result_type for f in tlsa.failures], [result_type], name)
            self.assertEqual([r for r in result.results if r.policy.policy_type is PolicyType.STS
                              and (r.success_count or r.failure_count)], [], name)
            if name == "bogus":
                self.assertEqual(server.sessions, [])

    async def test_unusable_requires_tls_only(self) -> None:
        """
        Secure TLSA records, none usable (PKIX-EE): TLS without
        authentication (RFC 7672 §2.2): an untrusted certificate is
        accepted, plaintext is not.
        """
        for behaviour, delivered in ((Behaviour(certificate=_PKI.untrusted(MX)), True),
                                     (Behaviour(starttls=StartTLS.NOT_OFFERED), False)):
            server = self.server(behaviour)
            self.tlsa((1, 1, 1, spki_sha256(SELF_SIGNED.certificates()[0])))
            result = await self.deliver()
            [outcome] = result.outcomes
            self.assertEqual(outcome.status, Status.DELIVERED if delivered else Status.TRANSIENT)
            self.assertEqual(outcome.verified, False)
            [tlsa] = self.tlsa_results(result)
            self.assertEqual((tlsa.success_count, tlsa.failure_count), (1, 0) if delivered else (0, 1))
            self.assertEqual(server.plaintext_transactions(), [])
            self.assertEqual(len(server.messages), int(delivered))

    async def test_insecure_mx_no_dane(self) -> None:
        """An insecure MX RRset: no TLSA lookup; MTA-STS alone (opportunistic here)."""
        self.server(Behaviour(certificate=SELF_SIGNED))
        self.tlsa((3, 1, 1, spki_sha256(OTHER.certificates()[0])))
        self.resolver.security[DOMAIN] = False
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertFalse([q for q in self.resolver.queries if q[0] == "TLSA"])
        self.assertEqual(self.tlsa_results(result), [])

    async def test_session_reuse_keyed_by_tlsa(self) -> None:
        """
        A parked DANE session carries the next message while the TLSA
        records stay; once they change, a new session is made (and
        authenticated by the new records).
        """
        server = self.server(Behaviour(certificate=SELF_SIGNED))
        own = spki_sha256(SELF_SIGNED.certificates()[0])
        self.tlsa((3, 1, 1, own))
        deliverer = self.deliverer(reuse_idle_time=30.0)
        for _ in range(2):
            result = await self.deliver(deliverer)
            self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertEqual(len(server.sessions), 1)
        self.tlsa((3, 1, 1, own), (3, 0, 1, spki_sha256(OTHER.certificates()[0])))
        result = await self.deliver(deliverer)
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertEqual(len(server.sessions), 2)
        self.assertEqual(len(server.messages), 3)


    async def test_dane_ta(self) -> None:
        """
        DANE-TA(2): a chain to the published anchor naming the host is
        delivered; one naming another host, or expired, is deferred with
        the certificate's result type under the tlsa policy.
        """
        import datetime

        from mtasts_twisted.dns import TLSARecord

        anchor = tlsa_association_data(_PKI.dane_root, 0, 1)
        assert anchor is not None
        past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        cases = [
            (_PKI.dane_issued(MX), None),
            (_PKI.dane_issued("other.example"), ResultType.CERTIFICATE_HOST_MISMATCH),
            (_PKI.dane_issued(MX, not_before=past, not_after=past + datetime.timedelta(days=30)),
             ResultType.CERTIFICATE_EXPIRED),
        ]
        for certificate, failure in cases:
            server = self.server(Behaviour(certificate=certificate))
            self.resolver.tlsa[f"_{self.port}._tcp.{MX}"] = [TLSARecord(2, 0, 1, anchor)]
            result = await self.deliver()
            [outcome] = result.outcomes
            [tlsa] = self.tlsa_results(result)
            if failure is None:
                self.assertEqual((outcome.status, tlsa.success_count), (Status.DELIVERED, 1))
                self.assertEqual(len(server.messages), 1)
            else:
                self.assertEqual(outcome.status, Status.TRANSIENT)
                self.assertEqual([f.result_type for f in tlsa.failures], [failure])
                self.assertNothingSent(server)

class ReportDomainTests(unittest.SynchronousTestCase):
    def test_tlsa_result_kept_for_the_recipient_domain(self) -> None:
        """
        The aggregator keeps a tlsa result (policy domain the TLSA base
        domain) under the recipient domain it is reported to; the report's
        JSON carries the TLSA base domain as policy-domain.
        """
        from twisted.internet.task import Clock

        from mtasts_twisted.results import PolicyDescriptor
        from mtasts_twisted.tlsrpt import ResultAggregator

        aggregator = ResultAggregator(MemoryStore(), Clock())
        policy = PolicyDescriptor(PolicyType.TLSA, MX, ("3 1 1 ab",))
        result = Result(policy, 1, report_domain=DOMAIN)
        aggregator.record(result, when=0)
        self.assertEqual(aggregator.pending_keys, [f"1970-01-01|{DOMAIN}"])
        self.assertEqual(result.to_json()["policy"]["policy-domain"], MX)
        self.assertEqual(Result(policy, 1), result)  # not part of equality (merging)



class ReportDescriptorTests(unittest.SynchronousTestCase):
    def test_the_policy_that_decided(self) -> None:
        """
        A host is counted under tlsa when DANE decided it, under the
        delivery's policy when MTA-STS did (secure TLSA none usable, and an
        enforce policy: the stricter MTA-STS decision).
        """
        from mtasts_twisted.dane import DANEState, DANEStatus
        from mtasts_twisted.delivery import HostAction, plan_host
        from mtasts_twisted.delivery.danehost import report_descriptor
        from mtasts_twisted.dns import MXHost, TLSARecord
        from mtasts_twisted.policy import parse_policy
        from mtasts_twisted.results import PolicyDescriptor

        record = TLSARecord(1, 1, 1, b"\xab" * 32)
        unusable = DANEStatus(MX, DANEState.UNUSABLE, 25, base_domain=MX, tlsa_name=f"_25._tcp.{MX}",
                              records=(record,))
        sts = PolicyDescriptor(PolicyType.STS, DOMAIN, ("version: STSv1",), (MX,))
        for mode, action, policy_type in [("enforce", HostAction.REQUIRE_VERIFIED_TLS, PolicyType.STS),
                                          ("testing", HostAction.REQUIRE_TLS, PolicyType.TLSA)]:
            target = plan_host(parse_policy(policy_text(mode, MX)), MXHost(10, MX), unusable)
            self.assertIs(target.action, action)
            descriptor = report_descriptor(sts, target)
            self.assertIs(descriptor.policy_type, policy_type)
            if policy_type is PolicyType.TLSA:
                self.assertEqual((descriptor.policy_domain, descriptor.policy_strings),
                                 (MX, (record.to_text(),)))


class RelayDANETests(_DANEWorld):
    """The relay over a DANE deliverer: a DANE failure keeps the message queued, no DSN."""

    async def test_dane_failure_stays_queued(self) -> None:
        import shutil
        import tempfile

        from twisted.internet.defer import Deferred

        from mtasts_twisted.relay import RecipientStatus, RelayService, RelaySettings

        server = self.server(Behaviour(certificate=_PKI.valid(MX)))
        self.tlsa((3, 1, 1, spki_sha256(OTHER.certificates()[0])))
        directory = tempfile.mkdtemp(prefix="mtasts-dane-relay-")
        self.addCleanup(shutil.rmtree, directory, True)
        settings = RelaySettings(reporting_mta="relay.test", poll_interval=60)
        queue = settings.make_queue(directory)
        done: Deferred[DeliveryResult] = Deferred()
        deliverer = self.deliverer()

        class Notifying:
            settings = deliverer.settings

            def deliver(self, *args: Any, **kwargs: Any) -> Any:
                d = deliverer.deliver(*args, **kwargs)
                d.addCallback(lambda r: (reactor.callLater(0, done.callback, r), r)[1])
                return d

            def close(self) -> Any:
                return deliverer.close()

        relay = RelayService(queue, Notifying(), settings, reactor)  # type: ignore[arg-type]
        message = queue.enqueue(SENDER, [BOB], MESSAGE)
        relay.startService()
        self.addCleanup(relay.stopService)
        result = await done
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        [queued] = queue.list()
        self.assertEqual(queued.id, message.id)  # no DSN: the original, still pending
        self.assertEqual([r.state for r in queued.recipients], [RecipientStatus.PENDING])
        self.assertEqual(queued.recipients[0].attempts, 1)
        self.assertNothingSent(server)


class DANEOnlyOverrideTests(_DANEWorld):
    """
    The operator's C{dane-only} override with C{--dane}: only hosts that
    DANE authenticates take the message; anything else is deferred, never
    sent under MTA-STS or opportunistic TLS.
    """

    def deliverer(self, **settings: Any) -> Deliverer:
        from mtasts_twisted.overrides import Override, OverrideKind, OverrideTable, OverridingPolicySource

        table = OverrideTable(overrides={DOMAIN: Override(DOMAIN, OverrideKind.DANE_ONLY)})
        self.cache = OverridingPolicySource(self.cache, table, reactor)  # type: ignore[assignment]
        return super().deliverer(**settings)

    async def test_dane_authenticated_host_takes_it(self) -> None:
        server = self.server(Behaviour(certificate=SELF_SIGNED))
        self.tlsa((3, 1, 1, spki_sha256(SELF_SIGNED.certificates()[0])))
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertEqual([(m.tls, m.sni) for m in server.messages], [(True, MX)])

    async def test_no_tlsa_deferred(self) -> None:
        """No TLSA records: MTA-STS or opportunistic TLS would deliver; dane-only defers."""
        server = self.server(Behaviour(certificate=_PKI.valid(MX)))
        self.sts("enforce", MX)
        result = await self.deliver()
        [outcome] = result.outcomes
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertIn("dane-only", outcome.message)
        self.assertNothingSent(server)

    async def test_insecure_mx_deferred(self) -> None:
        """An unsigned MX RRset has no DANE at all: deferred."""
        self.resolver.security[DOMAIN] = False
        server = self.server(Behaviour(certificate=SELF_SIGNED))
        self.tlsa((3, 1, 1, spki_sha256(SELF_SIGNED.certificates()[0])))
        result = await self.deliver()
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertNothingSent(server)
