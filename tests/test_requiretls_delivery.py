"""
Issue 16: delivery of REQUIRETLS messages and of messages with
C{TLS-Required: No} (RFC 8689 §4.2), to loopback MX servers: what MAIL
says, which hosts get nothing, and what the outcome and the TLSRPT results
are.
"""

from __future__ import annotations

import io

from mtasts_twisted.delivery import DeliveryResult, Status
from mtasts_twisted.results import ResultType
from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer, StartTLS
from mtasts_twisted.twistedmail import RequireTLSUnsupportedError
from tests.test_delivery import _CERTS, _VALID2, BOB, DOMAIN, MESSAGE, MX1, MX2, SENDER, DeliveryWorld
from tests.test_twistedmail import DOMAIN as HOOK_DOMAIN
from tests.test_twistedmail import MX1 as HOOK_MX1
from tests.test_twistedmail import HookWorld

TLS_OPTIONAL = b"Subject: cert expired\r\nTLS-Required: No\r\nFrom: alice@example.org\r\n\r\nYour cert expired.\r\n"


class RequireTLSDeliveryTests(DeliveryWorld):
    async def send(self, message: bytes = MESSAGE, requiretls: bool = True, sender: str = SENDER,
                   recipients: tuple[str, ...] = (BOB,)) -> DeliveryResult:
        result = await self.deliverer().deliver(sender, recipients, io.BytesIO(message), requiretls=requiretls)
        self.assertEqual(self.sink.results, list(result.results))
        return result

    def mails(self, server: SMTPTestServer) -> list[bytes]:
        return [c.line for s in server.sessions for c in s.commands if c.verb == "MAIL"]

    def assertRefused(self, result: DeliveryResult, status: str = "5.7.30") -> None:
        for outcome in result.outcomes:
            self.assertEqual(outcome.status, Status.PERMANENT, outcome)
            self.assertTrue(outcome.message.startswith(status + " REQUIRETLS"), outcome.message)

    async def test_enforce_verified_requiretls_server(self) -> None:
        """
        RFC 8689 §4.2.1: enforce policy, verified certificate, REQUIRETLS
        after STARTTLS: delivered, and MAIL carries REQUIRETLS.
        """
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=("REQUIRETLS",)))
        self.policy("enforce")
        result = await self.send()
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        [got] = server.messages
        self.assertIn("REQUIRETLS", got.mail_parameters)
        self.assertTrue(got.tls_at_mail)
        self.assertEqual(server.plaintext_transactions(), [])

    async def test_testing_policy_listed_verified(self) -> None:
        """A testing policy that lists the host validates it (§4.2.1 step 2): delivered when the cert verifies."""
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=("REQUIRETLS",)))
        self.policy("testing")
        result = await self.send()
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        self.assertIn("REQUIRETLS", server.messages[0].mail_parameters)

    async def test_testing_policy_bad_certificate(self) -> None:
        """No testing-mode leniency: a certificate that does not verify is 5.7.10, nothing sent."""
        server = self.server(Behaviour(certificate=_CERTS["expired"], extensions=("REQUIRETLS",)))
        self.policy("testing")
        result = await self.send()
        self.assertRefused(result, "5.7.10")
        self.assertNothingSent(server)

    async def test_server_without_requiretls(self) -> None:
        """
        §4.2.1 step 5: the EHLO after STARTTLS lacks REQUIRETLS: QUIT, no
        MAIL, permanent 5.7.30 once no other host is left.
        """
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.server(Behaviour(certificate=_VALID2), host=MX2, preference=20)
        self.policy("enforce")
        result = await self.send()
        self.assertRefused(result)
        self.assertIn(MX1, result.outcomes[0].message)
        self.assertIn(MX2, result.outcomes[0].message)
        self.assertNothingSent(server)
        self.assertEqual([c.verb for c in server.sessions[0].commands][-1], "QUIT")
        # The sessions were verified TLS: reported as successes.
        self.assertEqual([r.success_count for r in result.results[1:]], [1, 1])

    async def test_second_host_offers_requiretls(self) -> None:
        """§4.2.1: the next MX host is tried; the one that meets the requirements gets it."""
        first = self.server(Behaviour(certificate=_CERTS["valid"]))
        second = self.server(Behaviour(certificate=_VALID2, extensions=("REQUIRETLS",)), host=MX2, preference=20)
        self.policy("enforce")
        result = await self.send()
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        self.assertEqual(result.outcomes[0].mx_host, MX2)
        self.assertNothingSent(first)
        self.assertIn("REQUIRETLS", second.messages[0].mail_parameters)

    async def test_no_policy_domain(self) -> None:
        """§4.2.1 step 2: no DNSSEC and no MTA-STS policy: no connection at all, 5.7.30."""
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=("REQUIRETLS",)))
        result = await self.send()
        self.assertRefused(result)
        self.assertEqual(server.sessions, [])

    async def test_testing_policy_mismatch(self) -> None:
        """A testing policy that does not list the MX host does not validate it: 5.7.30, no connection."""
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=("REQUIRETLS",)))
        self.policy("testing", "mx.other.example")
        result = await self.send()
        self.assertRefused(result)
        self.assertEqual(server.sessions, [])

    async def test_unreachable_host_is_transient(self) -> None:
        """A host that cannot be reached is no REQUIRETLS verdict: retried (transient)."""
        self.dns.add_mx(DOMAIN, 10, MX1 + ".")
        self.dns.add_a(MX1, "127.0.0.1")
        self.policy("enforce")
        self.ports[MX1] = 9  # discard: nothing listens
        result = await self.send()
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT, result.outcomes[0])

    async def test_null_sender_not_discarded(self) -> None:
        """
        RFC 8689 §4.2.1 and §5: a REQUIRETLS bounce (null reverse-path) is
        sent even where REQUIRETLS is not offered, without the parameter.
        """
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        result = await self.send(sender="")
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        self.assertNotIn("REQUIRETLS", server.messages[0].mail_parameters)

    async def test_null_sender_with_parameter_where_allowed(self) -> None:
        """§5: a REQUIRETLS bounce carries the parameter where the session meets §2."""
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=("REQUIRETLS",)))
        self.policy("enforce")
        result = await self.send(sender="")
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        self.assertIn("REQUIRETLS", server.messages[0].mail_parameters)

    async def test_not_requiretls_no_parameter(self) -> None:
        """Without the flag, MAIL never carries REQUIRETLS (as before)."""
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=("REQUIRETLS",)))
        self.policy("enforce")
        result = await self.send(requiretls=False)
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertNotIn(b"REQUIRETLS", self.mails(server)[0])


class TLSRequiredNoDeliveryTests(DeliveryWorld):
    async def send(self, message: bytes = TLS_OPTIONAL, requiretls: bool = False) -> DeliveryResult:
        result = await self.deliverer().deliver(SENDER, (BOB,), io.BytesIO(message), requiretls=requiretls)
        self.assertEqual(self.sink.results, list(result.results))
        return result

    async def test_enforce_bad_certificate_delivered_and_reported(self) -> None:
        """
        RFC 8689 §4.2.2: enforce, an expired certificate: TLS is still
        negotiated, the message delivered, the failure reported.
        """
        server = self.server(Behaviour(certificate=_CERTS["expired"]))
        self.policy("enforce")
        result = await self.send()
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        [got] = server.messages
        self.assertTrue(got.tls)
        self.assertEqual(self.failures(result), [(ResultType.CERTIFICATE_EXPIRED, "X509_V_ERR_CERT_HAS_EXPIRED")])
        self.assertEqual(result.results[1].success_count, 0)

    async def test_enforce_unlisted_host_delivered_and_reported(self) -> None:
        """An MX host the enforce policy does not list: delivered, reported as a mismatch."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce", "mx.other.example")
        result = await self.send()
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        self.assertEqual(len(server.messages), 1)
        self.assertEqual([f[0] for f in self.failures(result)], [ResultType.VALIDATION_FAILURE])

    async def test_enforce_no_starttls_plaintext(self) -> None:
        """§3: the message is sent regardless of STARTTLS: plaintext when it is not offered."""
        server = self.server(Behaviour(starttls=StartTLS.NOT_OFFERED))
        self.policy("enforce")
        result = await self.send()
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        self.assertFalse(server.messages[0].tls)

    async def test_without_header_enforce_holds(self) -> None:
        """The same message without the header: enforce refuses the expired certificate (as before)."""
        server = self.server(Behaviour(certificate=_CERTS["expired"]))
        self.policy("enforce")
        result = await self.send(MESSAGE)
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertNothingSent(server)

    async def test_requiretls_wins(self) -> None:
        """§4.1: with the REQUIRETLS parameter the header is ignored: no delivery over a bad certificate."""
        server = self.server(Behaviour(certificate=_CERTS["expired"], extensions=("REQUIRETLS",)))
        self.policy("enforce")
        result = await self.send(requiretls=True)
        self.assertEqual(result.outcomes[0].status, Status.PERMANENT, result.outcomes[0])
        self.assertNothingSent(server)


class TwistedMailRequireTLSTests(HookWorld):
    """twisted.mail's client sends no MAIL parameter: REQUIRETLS is refused there, nothing sent."""

    async def test_refused(self) -> None:
        server = self.server(Behaviour(certificate=self.pki.valid(HOOK_MX1), extensions=("REQUIRETLS",)),
                             HOOK_MX1, HOOK_DOMAIN)
        sender = self.sender()
        for call in (sender.sendmail, sender.deliver):
            with self.assertRaises(RequireTLSUnsupportedError) as caught:
                await call(SENDER, ["bob@" + HOOK_DOMAIN], MESSAGE, requiretls=True)
            self.assertIn("Deliverer", str(caught.exception))
        self.assertEqual(server.sessions, [])
        numOk, _ = await sender.sendmail(SENDER, ["bob@" + HOOK_DOMAIN], MESSAGE, requiretls=False)
        self.assertEqual(numOk, 1)
