"""
Issue 18: delivery of a message submitted with SMTPUTF8 (RFC 6531) and of
IDN and quoted addresses, to loopback MX servers: what MAIL and RCPT say,
and what happens at a server without SMTPUTF8.
"""

from __future__ import annotations

import io

from mtasts_twisted.delivery import DeliveryResult, Status
from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer
from tests.test_delivery import _CERTS, _PKI, BOB, SENDER, DeliveryWorld

IDN = "xn--bcher-kva.test"  # bücher.test
IDN_MX = "mx." + IDN
UTF8_MESSAGE = "From: jörg@example.org\r\nTo: bob@bücher.test\r\nSubject: grüße\r\n\r\nHallo.\r\n".encode()
ASCII_MESSAGE = b"From: a@example.org\r\nTo: bob@example.com\r\nSubject: hello\r\n\r\nHello.\r\n"


class SMTPUTF8DeliveryTests(DeliveryWorld):
    async def send(self, recipients: tuple[str, ...], message: bytes, smtputf8: bool,
                   sender: str = SENDER) -> DeliveryResult:
        result = await self.deliverer().deliver(sender, recipients, io.BytesIO(message), smtputf8=smtputf8)
        self.assertEqual(self.sink.results, list(result.results))
        return result

    def idn_server(self, *extensions: str) -> SMTPTestServer:
        return self.server(Behaviour(certificate=_PKI.valid(IDN_MX), hostname=IDN_MX, extensions=extensions),
                           host=IDN_MX, domain=IDN)

    def commands(self, server: SMTPTestServer, verb: str) -> list[bytes]:
        return [c.line for s in server.sessions for c in s.commands if c.verb == verb]

    async def test_idn_recipient_with_utf8_header(self) -> None:
        """
        bob@bücher.test, submitted with SMTPUTF8, UTF-8 in the header: the
        domain is looked up and sent as A-labels, MAIL says SMTPUTF8 and
        BODY=8BITMIME, the message arrives as it was.
        """
        server = self.idn_server("SMTPUTF8", "8BITMIME")
        result = await self.send(("bob@bücher.test",), UTF8_MESSAGE, smtputf8=True)
        self.assertEqual(result.domain, IDN)
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        [mail] = self.commands(server, "MAIL")
        self.assertRegex(mail, rb"^MAIL FROM:<alice@example\.org> BODY=8BITMIME SMTPUTF8( SIZE=\d+)?$")
        self.assertEqual(self.commands(server, "RCPT"), [b"RCPT TO:<bob@" + IDN.encode() + b">"])
        [got] = server.messages
        self.assertEqual(got.data, UTF8_MESSAGE)

    async def test_utf8_header_to_a_server_without_smtputf8(self) -> None:
        """RFC 6531 §3.2: a server without SMTPUTF8 never gets it: permanent 5.6.9, nothing sent."""
        server = self.idn_server("8BITMIME")
        result = await self.send(("bob@bücher.test", "carol@bücher.test"), UTF8_MESSAGE, smtputf8=True)
        for outcome in result.outcomes:
            self.assertEqual(outcome.status, Status.PERMANENT, outcome)
            self.assertTrue(outcome.message.startswith("5.6.9 "), outcome.message)
            self.assertIn("SMTPUTF8", outcome.message)
        self.assertEqual(self.commands(server, "MAIL"), [])
        self.assertEqual(server.messages, [])

    async def test_ascii_message_needs_no_smtputf8(self) -> None:
        """
        RFC 6531 §3.4: submitted with SMTPUTF8, but nothing in it needs it
        (ASCII data, A-labels on the wire): sent without the parameter, also
        to a server that does not offer it.
        """
        server = self.idn_server()
        result = await self.send(("bob@bücher.test",), ASCII_MESSAGE, smtputf8=True)
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        [mail] = self.commands(server, "MAIL")
        self.assertNotIn(b"SMTPUTF8", mail)

    async def test_8bit_without_the_flag_needs_only_8bitmime(self) -> None:
        """Without the flag, 8-bit data is 8BITMIME's business alone (as before)."""
        server = self.idn_server("8BITMIME")
        result = await self.send(("bob@bücher.test",), UTF8_MESSAGE, smtputf8=False)
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        [mail] = self.commands(server, "MAIL")
        self.assertNotIn(b"SMTPUTF8", mail)

    async def test_utf8_local_part_to_a_server_without_smtputf8(self) -> None:
        """A UTF-8 local part at a server without SMTPUTF8: that recipient is permanent 5.6.7."""
        server = self.idn_server("8BITMIME")
        result = await self.send(("jörg@bücher.test", "bob@bücher.test"), ASCII_MESSAGE, smtputf8=True)
        self.assertEqual(result.outcome("jörg@bücher.test").status, Status.PERMANENT)
        self.assertTrue(result.outcome("jörg@bücher.test").message.startswith("5.6.7 "))
        self.assertEqual(result.outcome("bob@bücher.test").status, Status.DELIVERED)
        self.assertEqual(server.messages[0].recipients, ("bob@" + IDN,))

    async def test_quoted_local_part(self) -> None:
        """Issue 17.4: a quoted local part is delivered, RCPT carrying it quoted."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        result = await self.send(('"a b"@example.com', BOB), ASCII_MESSAGE, smtputf8=False,
                                 sender='"john smith"@example.org')
        self.assertEqual([o.status for o in result.outcomes], [Status.DELIVERED] * 2, result.outcomes)
        self.assertEqual(self.commands(server, "RCPT"), [b'RCPT TO:<"a b"@example.com>', b"RCPT TO:<bob@example.com>"])
        self.assertTrue(self.commands(server, "MAIL")[0].startswith(b'MAIL FROM:<"john smith"@example.org>'))
        [got] = server.messages
        self.assertEqual(got.recipients, ('"a b"@example.com', BOB))
        self.assertEqual(got.mail_from, '"john smith"@example.org')
