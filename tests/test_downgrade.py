"""
Downgrade attacks (RFC 8461 §10) against a domain whose C{enforce} policy
is known, on real loopback sockets through L{PolicyCache.get} and
L{Deliverer.deliver}.

In every attack the delivery is deferred (L{Status.TRANSIENT}), and the
receiving servers, legitimate or the attacker's, show that nothing of the
message arrived in plaintext and nothing was accepted over TLS that did not
verify: no C{MAIL}/C{RCPT}/C{DATA} outside TLS, no message at all at a host
outside the policy or with a bad certificate.
"""

from __future__ import annotations

import io

from twisted.internet import reactor
from twisted.trial import unittest

from mtasts_twisted.cache import FALLBACK
from mtasts_twisted.delivery import Deliverer, DeliveryResult, DeliverySettings, Status
from mtasts_twisted.policy import Mode
from mtasts_twisted.results import ResultType
from mtasts_twisted.testing.https import Route
from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer, StartTLS
from tests.test_faults import (
    MESSAGE,
    SENDER,
    Harness,
    RawSMTP,
    failures,
    policy_text,
    tally,
)

DOMAIN = "bank.test"
MX = "mx.bank.test"
EVIL = "mx.attacker.test"
BOB = "bob@" + DOMAIN
ENFORCE = policy_text("enforce", MX)
NONE = policy_text("none", MX)


class DowngradeTests(Harness, unittest.TestCase):
    """Each test: the enforce policy is cached, then the attacker acts."""

    def setUp(self) -> None:
        super().setUp()
        self.world.publish(DOMAIN, ENFORCE, record_id="1", ttl=0)
        self.legit = self.smtp(Behaviour(certificate=self.pki.valid(MX)), MX, DOMAIN)

    async def cache_enforce(self) -> None:
        """A first, normal delivery: the enforce policy is now cached."""
        result = await self.deliver(BOB)
        self.assertEqual((result.policy_mode, result.outcomes[0].status), (Mode.ENFORCE, Status.DELIVERED))
        self.assertEqual(len(self.legit.messages), 1)

    def attacker(self, behaviour: Behaviour, host: str = EVIL) -> SMTPTestServer:
        """The attacker's MX host replaces the legitimate one in DNS."""
        self.world.dns.remove(DOMAIN, "MX")
        server = self.smtp(behaviour, host, DOMAIN)
        self.world.resolver.clear_cache()
        return server

    async def attacked(self, *servers: SMTPTestServer) -> DeliveryResult:
        """Deliver under attack: deferred, nothing leaked to any server."""
        counts = [len(s.messages) for s in servers]
        result = await self.fault(lambda: self.deliver(BOB))
        [outcome] = result.outcomes
        self.assertEqual(result.policy_mode, Mode.ENFORCE)
        self.assertEqual(outcome.status, Status.TRANSIENT, outcome)
        self.assertTrue(outcome.message.startswith("4."), outcome.message)
        for server, count in zip(servers, counts):
            self.assertEqual(server.plaintext_transactions(), [])
            self.assertEqual(len(server.messages), count, "a message arrived under attack")
            self.assertTrue(all(m.tls and m.tls_at_mail for m in server.messages))
        tally("downgrade_case")
        return result

    def assertNoTransaction(self, server: SMTPTestServer) -> None:
        verbs = {c.verb for s in server.sessions for c in s.commands}
        self.assertFalse(verbs & {"MAIL", "RCPT", "DATA"}, verbs)
        self.assertEqual(server.messages, [])

    # -- §10.2: the TXT record is deleted (or DNS fails) while the policy is cached --

    async def test_txt_deleted_mx_replaced_plaintext(self) -> None:
        await self.cache_enforce()
        self.world.unpublish(DOMAIN)
        evil = self.attacker(Behaviour(starttls=StartTLS.NOT_OFFERED))
        result = await self.attacked(self.legit, evil)
        self.assertEqual(failures(result.results[:1]),
                         [(ResultType.STS_POLICY_FETCH_ERROR.value, "no-record" + FALLBACK)])
        # The attacker's host is outside the policy: not even connected to.
        self.assertEqual(evil.sessions, [])

    async def test_txt_deleted_cert_swapped(self) -> None:
        """TXT gone and the real MX name now answers with an untrusted certificate."""
        await self.cache_enforce()
        self.world.unpublish(DOMAIN)
        self.world.resolver.clear_cache()
        self.legit.behaviour = Behaviour(certificate=self.pki.untrusted(MX))
        result = await self.attacked(self.legit)
        self.assertEqual(failures(result.results[1:]),
                         [(ResultType.CERTIFICATE_NOT_TRUSTED.value, "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY")])
        self.assertEqual(len(self.legit.messages), 1)

    async def test_txt_servfail_starttls_stripped(self) -> None:
        """The TXT lookup fails (attacker drops DNS) and STARTTLS is stripped."""
        from mtasts_twisted.testing.dns import Behaviour as DNSBehaviour

        await self.cache_enforce()
        self.world.resolver.clear_cache()
        self.world.dns.set_behaviour("_mta-sts." + DOMAIN, DNSBehaviour.SERVFAIL)
        self.legit.behaviour = Behaviour(starttls=StartTLS.NOT_OFFERED)
        result = await self.attacked(self.legit)
        self.assertEqual(failures(result.results[:1]),
                         [(ResultType.STS_POLICY_FETCH_ERROR.value, "dns-lookup" + FALLBACK)])

    # -- §10.1-ish: DNS answers MX hosts outside the policy --

    async def test_mx_outside_policy_with_valid_certificate(self) -> None:
        """The attacker's MX has a perfectly valid certificate for its own name: still refused."""
        await self.cache_enforce()
        evil = self.attacker(Behaviour(certificate=self.pki.valid(EVIL)))
        result = await self.attacked(evil)
        self.assertEqual(failures(result.results[1:]),
                         [(ResultType.VALIDATION_FAILURE.value, "mtasts-policy-mx-mismatch")])
        self.assertEqual(evil.sessions, [])

    async def test_mx_outside_policy_first_preference(self) -> None:
        """An attacker's MX added before the real one: skipped, the real one gets the mail over TLS."""
        await self.cache_enforce()
        self.world.resolver.clear_cache()
        evil = self.smtp(Behaviour(certificate=self.pki.valid(EVIL)), EVIL, DOMAIN, preference=1)
        result = await self.fault(lambda: self.deliver(BOB))
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertEqual(result.outcomes[0].mx_host, MX)
        self.assertEqual(evil.sessions, [])
        self.assertTrue(all(m.tls for m in self.legit.messages))

    # -- STARTTLS stripping and injection --

    async def test_starttls_stripped_from_ehlo(self) -> None:
        await self.cache_enforce()
        self.legit.behaviour = Behaviour(starttls=StartTLS.NOT_OFFERED)
        result = await self.attacked(self.legit)
        self.assertEqual(failures(result.results[1:]),
                         [(ResultType.STARTTLS_NOT_SUPPORTED.value, "starttls-not-offered")])
        self.assertEqual(len(self.legit.messages), 1)

    async def test_starttls_refused(self) -> None:
        await self.cache_enforce()
        self.legit.behaviour = Behaviour(certificate=self.pki.valid(MX), starttls=StartTLS.REFUSE)
        await self.attacked(self.legit)

    async def test_plaintext_injected_after_starttls(self) -> None:
        """A man in the middle appends plaintext replies after '220 go ahead' (CVE-2011-0411 style)."""
        await self.cache_enforce()
        raw = RawSMTP(
            b"220 mx.bank.test ESMTP\r\n",
            script=(
                (b"EHLO", b"250-mx.bank.test\r\n250 STARTTLS\r\n"),
                (b"STARTTLS", b"220 go ahead\r\n250 injected\r\n"),
            ),
        )
        self.addCleanup(raw.stop)
        self.ports[MX] = raw.port
        result = await self.fault(lambda: self.deliver(BOB, reply_timeout=1.0))
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertNotIn(b"MAIL", raw.received)
        tally("downgrade_case")

    # -- §10.3: the policy host is attacked --

    async def test_mode_none_over_invalid_certificate(self) -> None:
        """A new id whose policy says 'none', served over an untrusted certificate: ignored."""
        await self.cache_enforce()
        self.world.publish(DOMAIN, NONE, record_id="2", ttl=0)
        self.world.https.serve("mta-sts." + DOMAIN, Route.policy(NONE),
                               certificate=self.pki.untrusted("mta-sts." + DOMAIN))
        self.world.resolver.clear_cache()
        evil = self.attacker(Behaviour(starttls=StartTLS.NOT_OFFERED))
        result = await self.attacked(self.legit, evil)
        self.assertEqual(failures(result.results[:1]),
                         [(ResultType.STS_WEBPKI_INVALID.value, "certificate-not-trusted" + FALLBACK)])
        self.assertEqual(evil.sessions, [])
        # Still enforced on the next attempt (backoff for id 2, cached policy kept).
        again = await self.deliver(BOB)
        self.assertEqual((again.policy_mode, again.outcomes[0].status), (Mode.ENFORCE, Status.TRANSIENT))

    async def test_mode_none_with_expired_certificate_nothing_cached(self) -> None:
        """Nothing cached: a 'none' policy over an expired certificate is not a policy (fails to no-policy)."""
        self.world.publish("fresh.test", policy_text("none", "mx.fresh.test"))
        self.world.https.serve("mta-sts.fresh.test", Route.policy(NONE),
                               certificate=self.pki.expired("mta-sts.fresh.test"))
        lookup = await self.fault(lambda: self.cache.get("fresh.test"))
        self.assertIsNone(lookup.policy)
        self.assertEqual(failures([lookup.result]), [(ResultType.STS_WEBPKI_INVALID.value, "certificate-expired")])

    async def test_new_id_fetch_fails(self) -> None:
        """A new id whose fetch fails (stall, 404, reset...): the cached enforce policy holds."""
        await self.cache_enforce()
        for n, route in enumerate([Route.status_only(404), Route.reset_connection(), Route.stall_headers()]):
            self.world.publish(DOMAIN, None, record_id=f"x{n}", ttl=0)
            self.world.https.serve("mta-sts." + DOMAIN, route)
            self.world.resolver.clear_cache()
            self.legit.behaviour = Behaviour(starttls=StartTLS.NOT_OFFERED)
            result = await self.attacked(self.legit)
            [failure] = result.results[0].failures
            self.assertTrue(failure.failure_reason_code.endswith(FALLBACK), failure)
        # The backoff keeps later lookups from fetching, and the policy holds.
        requests = len(self.world.https.requests)
        again = await self.deliver(BOB)
        self.assertEqual(again.outcomes[0].status, Status.TRANSIENT)
        self.assertEqual(len(self.world.https.requests), requests)

    async def test_new_id_policy_drops_real_mx(self) -> None:
        """A new id over a valid certificate can change the policy (that is the owner's right)."""
        await self.cache_enforce()
        self.world.publish(DOMAIN, policy_text("enforce", EVIL), record_id="9", ttl=0)
        self.world.resolver.clear_cache()
        result = await self.fault(lambda: self.deliver(BOB))
        # The real MX is now outside the (legitimately) new policy: refused, not sent in clear.
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertEqual(len(self.legit.messages), 1)
        self.assertEqual(self.legit.plaintext_transactions(), [])

    async def test_after_attack_legitimate_delivery_resumes(self) -> None:
        """Once the attack stops, mail flows again over verified TLS."""
        await self.cache_enforce()
        self.legit.behaviour = Behaviour(starttls=StartTLS.NOT_OFFERED)
        await self.attacked(self.legit)
        self.legit.behaviour = Behaviour(certificate=self.pki.valid(MX))
        result = await self.deliver(BOB)
        self.assertEqual((result.outcomes[0].status, result.outcomes[0].verified), (Status.DELIVERED, True))
        self.assertTrue(all(m.tls and m.tls_at_mail for m in self.legit.messages))
        self.assertEqual(self.legit.plaintext_transactions(), [])


class ReuseDowngradeTests(Harness, unittest.TestCase):
    """
    Session reuse (connection caching) under attack: a verified session to
    the real MX is parked when the attacker acts.  The attacker cannot make
    the deliverer send over anything but that verified session or a new one
    that passes every check again.
    """

    def setUp(self) -> None:
        super().setUp()
        self.world.publish(DOMAIN, ENFORCE, record_id="1", ttl=0)
        self.legit = self.smtp(Behaviour(certificate=self.pki.valid(MX)), MX, DOMAIN)
        self.reusing = Deliverer(
            reactor, self.world.resolver, self.cache, trust_root=self.pki.ca_pem, sink=self.sink,
            settings=DeliverySettings(port=1, port_for=self.ports, connect_timeout=2, reply_timeout=2,
                                      session_timeout=10, reuse_idle_time=10.0),
        )
        self.addCleanup(self.reusing.close)

    async def send(self) -> DeliveryResult:
        return await self.reusing.deliver(SENDER, [BOB], io.BytesIO(MESSAGE))

    async def park(self) -> None:
        result = await self.send()
        self.assertEqual((result.outcomes[0].status, result.outcomes[0].verified), (Status.DELIVERED, True))
        self.assertEqual((len(self.legit.sessions), len(self.legit.messages)), (1, 1))

    def assertDeferredNothingLeaked(self, result: DeliveryResult, *servers: SMTPTestServer) -> None:
        self.assertEqual((result.policy_mode, result.outcomes[0].status), (Mode.ENFORCE, Status.TRANSIENT))
        for server in servers:
            self.assertEqual(server.plaintext_transactions(), [])
            self.assertTrue(all(m.tls and m.tls_at_mail for m in server.messages))
        tally("downgrade_case")

    async def test_parked_session_reset_then_starttls_stripped(self) -> None:
        """
        The attacker resets the parked session (forcing a new one) and strips
        STARTTLS from the new connection: deferred, nothing in plaintext.
        """
        await self.park()
        self.legit.behaviour = Behaviour(starttls=StartTLS.NOT_OFFERED)
        [proto] = list(self.legit._live)
        proto.transport.abortConnection()
        result = await self.send()
        self.assertDeferredNothingLeaked(result, self.legit)
        self.assertEqual(len(self.legit.messages), 1)
        self.assertEqual(len(self.legit.sessions), 2)
        self.assertEqual(failures(result.results[1:]),
                         [(ResultType.STARTTLS_NOT_SUPPORTED.value, "starttls-not-offered")])

    async def test_parked_session_then_untrusted_certificate(self) -> None:
        """Reset, then an untrusted certificate on the new connection: deferred, no transaction."""
        await self.park()
        self.legit.behaviour = Behaviour(certificate=self.pki.untrusted(MX))
        [proto] = list(self.legit._live)
        proto.transport.loseConnection()
        result = await self.send()
        self.assertDeferredNothingLeaked(result, self.legit)
        self.assertEqual(len(self.legit.messages), 1)
        self.assertNotIn("MAIL", [c.verb for c in self.legit.sessions[1].commands])

    async def test_mx_replaced_while_parked(self) -> None:
        """
        The MX record is swapped for the attacker's host (outside the policy)
        while a session to the real MX is parked: the attacker's host is
        never contacted, and the parked session is not used either (the
        real MX is no longer a candidate): deferred, as without reuse.
        """
        await self.park()
        self.world.dns.remove(DOMAIN, "MX")
        evil = self.smtp(Behaviour(certificate=self.pki.valid(EVIL)), EVIL, DOMAIN)
        self.world.resolver.clear_cache()
        result = await self.send()
        self.assertDeferredNothingLeaked(result, self.legit, evil)
        self.assertEqual(evil.sessions, [])
        self.assertEqual(len(self.legit.messages), 1)
        self.assertNotIn("RSET", [c.verb for c in self.legit.sessions[0].commands])

    async def test_policy_turns_to_new_mx_while_parked(self) -> None:
        """
        A new policy id that no longer lists the parked session's host: that
        session is not reused (the real MX is outside the new policy).
        """
        await self.park()
        self.world.publish(DOMAIN, policy_text("enforce", EVIL), record_id="2", ttl=0)
        self.world.resolver.clear_cache()
        result = await self.send()
        self.assertDeferredNothingLeaked(result, self.legit)
        self.assertEqual(len(self.legit.messages), 1)
        self.assertEqual(len(self.legit.sessions), 1)
