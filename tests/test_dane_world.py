"""
The DANE foundation end to end, on real parts: signed zones behind a
validating Unbound (L{mtasts_twisted.testing.dnssec}), the TLSA search
(L{mtasts_twisted.dane.discover_dane}) through L{DNSResolver}, the one
decision per host (L{mtasts_twisted.delivery.plan.plan_host}) and STARTTLS
with the creator the decision asks for, through twisted.mail's ESMTP
client to the SMTP test server, asserting on the server side what arrived.

The scenarios of issue 14 that do not need the relay: DANE-EE pass
(self-signed), DANE-TA pass, DANE pass with an MTA-STS policy that would
refuse the host, TLSA mismatch with one that would accept it, bogus
signatures, an insecure zone with a wrong TLSA record, a signed zone
without TLSA, TLSA without STARTTLS.  (The TLSA names use port 25; the
test server listens elsewhere: the port label is tested with a fake
resolver in C{tests.test_dane}.)
"""

from __future__ import annotations

import io
from typing import Any

from cryptography import x509
from twisted.internet import defer, reactor
from twisted.mail import smtp
from twisted.python.failure import Failure
from twisted.trial import unittest

from mtasts_twisted.dane import DANEState, discover_dane
from mtasts_twisted.delivery import HostAction, PlannedHost, plan_host
from mtasts_twisted.dns import DNSResolver, MXHost
from mtasts_twisted.pkix import DANECheck, tlsa_association_data
from mtasts_twisted.policy import Policy, parse_policy
from mtasts_twisted.results import ResultType
from mtasts_twisted.testing.dnssec import DNSSECWorld, Security, Zone, require_world
from mtasts_twisted.testing.pki import PKI, IssuedCertificate
from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer, StartTLS
from tests.clients import ClosingSenderFactory
from mtasts_twisted.tls import MXConnectionCreator, TLSVerificationError, VerifyMode

DOMAIN = "dane.test"
_PKI = PKI()
SELF_SIGNED = _PKI.self_signed("ee.dane.test")
OTHER = _PKI.self_signed("ee.dane.test")


def digest(certificate: x509.Certificate, selector: int = 1) -> str:
    data = tlsa_association_data(certificate, selector, 1)
    assert data is not None
    return data.hex()


ZONES = [
    Zone("dane.test.", (
        "@ 300 IN MX 10 ee",
        "@ 300 IN MX 20 ta",
        "@ 300 IN MX 30 mismatch",
        "@ 300 IN MX 40 bogus",
        "@ 300 IN MX 50 notlsa",
        "@ 300 IN MX 60 nostarttls",
        *(f"{host} 300 IN A 127.0.0.1" for host in ("ee", "ta", "mismatch", "bogus", "notlsa", "nostarttls")),
        f"_25._tcp.ee 300 IN TLSA 3 1 1 {digest(SELF_SIGNED.certificates()[0])}",
        f"_25._tcp.ta 300 IN TLSA 2 0 1 {digest(_PKI.dane_root, selector=0)}",
        f"_25._tcp.mismatch 300 IN TLSA 3 1 1 {digest(OTHER.certificates()[0])}",
        f"_25._tcp.bogus 300 IN TLSA 3 1 1 {digest(SELF_SIGNED.certificates()[0])}",
        f"_25._tcp.nostarttls 300 IN TLSA 3 1 1 {digest(SELF_SIGNED.certificates()[0])}",
        "viaalias 300 IN CNAME ee",
        "toplain 300 IN CNAME mx.plain.test.",
        f"_25._tcp.toplain 300 IN TLSA 3 1 1 {digest(SELF_SIGNED.certificates()[0])}",
        "unusable 300 IN A 127.0.0.1",
        f"_25._tcp.unusable 300 IN TLSA 1 1 1 {digest(SELF_SIGNED.certificates()[0])}",
    ), bogus_rrsets=(("_25._tcp.bogus", "TLSA"),),
       raw_records=(("_25._tcp.unusable", "TLSA", b"\x03\x01\x01" + b"\xab" * 31),)),
    Zone("plain.test.", (
        "@ 300 IN MX 10 mx",
        "mx 300 IN A 127.0.0.1",
        f"_25._tcp.mx 300 IN TLSA 3 1 1 {digest(OTHER.certificates()[0])}",
    ), security=Security.INSECURE),
]

_world: list[DNSSECWorld] = []


def shared_world() -> DNSSECWorld:
    if not _world:
        _world.append(require_world(ZONES))
    return _world[0]


def policy(mode: str, *mx: str) -> Policy:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return parse_policy("\n".join(lines) + "\n")


class DANEWorldTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        world = shared_world()
        assert world.nameserver is not None
        self.resolver = DNSResolver(reactor, [world.nameserver], timeout=5, budget=20, attempts=1)

    async def plan(self, domain: str, host: str, sts: Policy | None) -> PlannedHost:
        """The MX lookup, the TLSA search and the decision, as a sender makes them."""
        mx = await self.resolver.lookup_mx(domain)
        [target] = [h for h in mx.hosts if h.host == host]
        status = await discover_dane(self.resolver, host, mx_secure=mx.secure)
        return plan_host(sts, MXHost(target.preference, host), status)

    async def deliver(self, domain: str, target: PlannedHost, certificate: IssuedCertificate | None,
                      starttls: StartTLS = StartTLS.OFFER) -> tuple[SMTPTestServer, MXConnectionCreator | None, Any]:
        """Follow the plan over STARTTLS to a test server presenting C{certificate}."""
        server = SMTPTestServer(Behaviour(certificate=certificate, starttls=starttls), reactor=reactor)
        server.start()
        self.addCleanup(server.stop)
        if target.skipped:
            return server, None, None
        if target.verify is VerifyMode.DANE:
            assert target.dane is not None
            creator = MXConnectionCreator(
                target.host, _PKI.ca_pem, mode=VerifyMode.DANE, server_name=target.server_name,
                dane=DANECheck(target.tlsa_records, target.dane.reference_identifiers(domain)))
        else:
            creator = MXConnectionCreator(target.host, _PKI.ca_pem, mode=target.verify)
        done: defer.Deferred[Any] = defer.Deferred()
        factory = ClosingSenderFactory(
            None, None, "a@example.org", [f"b@{domain}"], io.BytesIO(b"Subject: t\r\n\r\nbody\r\n"), done,
            retries=0, contextFactory=creator, requireAuthentication=False,
            requireTransportSecurity=target.require_tls,
        )
        reactor.connectTCP(server.host, server.port, factory)
        try:
            result: Any = await done
        except Exception:
            result = Failure()
        await factory.closed
        return server, creator, result

    def assert_nothing_arrived(self, server: SMTPTestServer) -> None:
        self.assertEqual(server.messages, [])
        self.assertEqual(server.plaintext_transactions(), [])

    async def test_dane_ee_self_signed_sts_would_refuse(self) -> None:
        """
        DANE-EE with a self-signed certificate, on a host an enforced
        MTA-STS policy does not list: delivered over TLS (DANE decides).
        """
        target = await self.plan(DOMAIN, "ee.dane.test", policy("enforce", "other.example"))
        self.assertIs(target.action, HostAction.REQUIRE_DANE)
        server, creator, result = await self.deliver(DOMAIN, target, SELF_SIGNED)
        self.assertEqual(result[0], 1)
        [message] = server.messages
        self.assertEqual((message.tls, message.sni), (True, "ee.dane.test"))
        assert creator is not None
        self.assertTrue(creator.outcome().verified)  # type: ignore[union-attr]

    async def test_dane_ta(self) -> None:
        target = await self.plan(DOMAIN, "ta.dane.test", None)
        self.assertIs(target.action, HostAction.REQUIRE_DANE)
        server, _, result = await self.deliver(DOMAIN, target, _PKI.dane_issued("ta.dane.test"))
        self.assertEqual(result[0], 1)
        self.assertTrue(server.messages[0].tls)

    async def test_mismatch_sts_would_accept(self) -> None:
        """
        A WebPKI-valid certificate on a host the enforced policy lists, but
        the TLSA record names another key: nothing delivered.
        """
        host = "mismatch.dane.test"
        target = await self.plan(DOMAIN, host, policy("enforce", host))
        self.assertIs(target.action, HostAction.REQUIRE_DANE)
        server, _, result = await self.deliver(DOMAIN, target, _PKI.valid(host))
        result.trap(smtp.SMTPConnectError)
        self.assertIsInstance(result.value.__cause__, TLSVerificationError)
        self.assertEqual(result.value.__cause__.outcome.classify()[0], ResultType.TLSA_INVALID)
        self.assert_nothing_arrived(server)

    async def test_bogus_signature_defers(self) -> None:
        """A forged TLSA RRset: the host is deferred, no connection is made."""
        target = await self.plan(DOMAIN, "bogus.dane.test", policy("enforce", "bogus.dane.test"))
        self.assertEqual((target.action, target.skipped), (HostAction.DEFER, True))
        assert target.skip_reason is not None and target.dane is not None
        self.assertIs(target.skip_reason.result_type, ResultType.DNSSEC_INVALID)
        self.assertIn("SERVFAIL", target.dane.detail)
        server, _, _ = await self.deliver(DOMAIN, target, SELF_SIGNED)
        self.assertEqual(server.sessions, [])

    async def test_insecure_zone_wrong_tlsa_ignored(self) -> None:
        """An unsigned zone's TLSA record, matching nothing: ignored; opportunistic TLS delivers."""
        target = await self.plan("plain.test", "mx.plain.test", None)
        assert target.dane is not None
        self.assertIs(target.dane.state, DANEState.INSECURE)
        self.assertIs(target.action, HostAction.OPPORTUNISTIC)
        server, _, result = await self.deliver("plain.test", target, _PKI.valid("mx.plain.test"))
        self.assertEqual(result[0], 1)

    async def test_signed_zone_without_tlsa(self) -> None:
        """A secure denial of TLSA: MTA-STS decides, as without DANE."""
        host = "notlsa.dane.test"
        target = await self.plan(DOMAIN, host, policy("enforce", host))
        assert target.dane is not None
        self.assertIs(target.dane.state, DANEState.NONE)
        self.assertIs(target.action, HostAction.REQUIRE_VERIFIED_TLS)
        server, creator, result = await self.deliver(DOMAIN, target, _PKI.valid(host))
        self.assertEqual(result[0], 1)
        self.assertTrue(server.messages[0].tls)

    async def test_tlsa_without_starttls(self) -> None:
        """TLSA records promise TLS: a server without STARTTLS gets nothing, not even in plaintext."""
        target = await self.plan(DOMAIN, "nostarttls.dane.test", None)
        self.assertIs(target.action, HostAction.REQUIRE_DANE)
        server, _, result = await self.deliver(DOMAIN, target, None, StartTLS.NOT_OFFERED)
        result.trap(smtp.TLSRequiredError)
        self.assert_nothing_arrived(server)


class DiscoveryWorldTests(unittest.TestCase):
    """L{discover_dane} through the validating resolver: the CNAME cases and unusable records."""

    timeout = 60

    def setUp(self) -> None:
        world = shared_world()
        assert world.nameserver is not None
        self.resolver = DNSResolver(reactor, [world.nameserver], timeout=5, budget=20, attempts=1)

    async def test_secure_cname_expanded_name_first(self) -> None:
        """RFC 7672 §2.2.2: a secure alias: the TLSA base domain is the expanded name."""
        status = await discover_dane(self.resolver, "viaalias.dane.test", mx_secure=True)
        self.assertEqual((status.state, status.base_domain), (DANEState.USABLE, "ee.dane.test"))

    async def test_insecure_cname_with_a_secure_alias(self) -> None:
        """
        RFC 7672 §2.2.2 "Insecure CNAME": a secure alias into an unsigned
        zone: the alias's own TLSA records count.
        """
        status = await discover_dane(self.resolver, "toplain.dane.test", mx_secure=True)
        self.assertEqual((status.state, status.base_domain), (DANEState.USABLE, "toplain.dane.test"))

    async def test_all_unusable(self) -> None:
        """A PKIX-EE(1) record and a digest one octet short: secure, unusable: TLS without authentication."""
        status = await discover_dane(self.resolver, "unusable.dane.test", mx_secure=True)
        self.assertEqual((status.state, len(status.records), status.usable), (DANEState.UNUSABLE, 2, ()))
        self.assertIs(plan_host(None, MXHost(10, "unusable.dane.test"), status).action, HostAction.REQUIRE_TLS)

    async def test_insecure_mx(self) -> None:
        mx = await self.resolver.lookup_mx("plain.test")
        status = await discover_dane(self.resolver, "mx.plain.test", mx_secure=mx.secure)
        self.assertEqual((mx.secure, status.state), (False, DANEState.INSECURE))
