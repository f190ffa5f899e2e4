"""
Tests for L{mtasts_twisted.testing.smtp}: each scripted behaviour, seen from
a raw SMTP line client over loopback.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import defer, endpoints, reactor, task
from twisted.protocols import basic
from twisted.python.failure import Failure
from twisted.trial import unittest

from mtasts_twisted.testing.pki import PKI
from mtasts_twisted.testing.smtp import (
    Behaviour,
    Reply,
    SMTPTestServer,
    Stage,
    StartTLS,
)
from mtasts_twisted.tls import MXConnectionCreator, VerifyMode

MX = "mx.example.com"
_PKI = PKI()


class LineClient(basic.LineReceiver):
    """
    A raw SMTP client: L{command} sends a line and fires with
    C{(code, [lines])} of the reply, or L{None} if the connection ended first.
    """

    delimiter = b"\r\n"

    def __init__(self) -> None:
        self._waiting: deque[defer.Deferred[Any]] = deque([defer.Deferred()])
        self.greeting = self._waiting[0]
        self._lines: list[bytes] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line[4:])
        if line[3:4] != b"-":
            reply, self._lines = (int(line[:3]), self._lines), []
            if self._waiting:
                self._waiting.popleft().callback(reply)

    def command(self, line: bytes) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting.append(d)
        self.sendLine(line)
        return d

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        while self._waiting:
            self._waiting.popleft().callback(None)
        self.lost.callback(None)


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds)


class FixtureTestsMixin:
    """Start a fixture server and connect raw clients to it."""

    timeout = 30

    def server(self, behaviour: Behaviour) -> SMTPTestServer:
        server = SMTPTestServer(behaviour, reactor=reactor)
        server.start()
        self.addCleanup(server.stop)  # type: ignore[attr-defined]
        return server

    async def connect(self, server: SMTPTestServer) -> LineClient:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, server.host, server.port)
        client = await endpoints.connectProtocol(endpoint, LineClient())

        def close() -> defer.Deferred[None]:
            if client.reason is None:
                client.transport.abortConnection()
            return client.lost

        self.addCleanup(close)  # type: ignore[attr-defined]
        return client

    async def send_message(self, client: LineClient, body: bytes = b"Subject: hi\r\n\r\nhello") -> Any:
        self.assertEqual((await client.command(b"MAIL FROM:<a@example.org>"))[0], 250)  # type: ignore[attr-defined]
        self.assertEqual((await client.command(b"RCPT TO:<b@example.com>"))[0], 250)  # type: ignore[attr-defined]
        self.assertEqual((await client.command(b"DATA"))[0], 354)  # type: ignore[attr-defined]
        client.transport.write(body + b"\r\n")
        return await client.command(b".")


class PlaintextTests(FixtureTestsMixin, unittest.TestCase):
    async def test_records_plaintext_session(self) -> None:
        """
        Without STARTTLS the server takes a message in plaintext and says so:
        the message, the session's commands and L{plaintext_transactions}.
        """
        server = self.server(Behaviour(starttls=StartTLS.NOT_OFFERED, extensions=("8BITMIME",)))
        client = await self.connect(server)
        code, _ = await client.greeting
        self.assertEqual(code, 220)
        code, lines = await client.command(b"EHLO client.example.org")
        self.assertEqual(code, 250)
        self.assertNotIn(b"STARTTLS", lines)
        self.assertIn(b"8BITMIME", lines)
        code, _ = await self.send_message(client, b"Subject: hi\r\n\r\n..dotted\r\nend")
        self.assertEqual(code, 250)
        [message] = server.messages
        self.assertEqual(message.mail_from, "a@example.org")
        self.assertEqual(message.recipients, ("b@example.com",))
        self.assertEqual(message.data, b"Subject: hi\r\n\r\n.dotted\r\nend\r\n")
        self.assertEqual((message.tls, message.tls_at_mail, message.complete, message.accepted), (False, False, True, True))
        self.assertEqual([c.verb for c in server.plaintext_transactions()], ["MAIL", "RCPT", "DATA"])
        self.assertEqual(server.sessions[0].peer, "127.0.0.1")

    async def test_starttls_refused(self) -> None:
        """C{StartTLS.REFUSE} advertises STARTTLS and answers 454."""
        server = self.server(Behaviour(certificate=_PKI.valid(MX), starttls=StartTLS.REFUSE))
        client = await self.connect(server)
        await client.greeting
        _, lines = await client.command(b"EHLO c")
        self.assertIn(b"STARTTLS", lines)
        code, _ = await client.command(b"STARTTLS")
        self.assertEqual(code, 454)
        self.assertFalse(server.sessions[0].tls)

    async def test_scripted_replies(self) -> None:
        """
        Replies scripted for MAIL, per recipient, DATA and the end of data
        replace the normal ones; a message rejected at the end is recorded
        as not accepted.
        """
        server = self.server(
            Behaviour(
                starttls=StartTLS.NOT_OFFERED,
                replies={Stage.DATA: Reply(451, "later")},
                recipient_replies={"Bad@Example.com": Reply(550, "no such user")},
            )
        )
        client = await self.connect(server)
        await client.greeting
        await client.command(b"EHLO c")
        await client.command(b"MAIL FROM:<a@example.org>")
        self.assertEqual((await client.command(b"RCPT TO:<bad@example.com>"))[0], 550)
        self.assertEqual((await client.command(b"RCPT TO:<good@example.com>"))[0], 250)
        self.assertEqual((await client.command(b"DATA"))[0], 451)
        self.assertEqual(server.messages, [])

        server.behaviour = Behaviour(replies={Stage.MAIL: Reply(452, "full")})
        client = await self.connect(server)
        await client.greeting
        await client.command(b"EHLO c")
        self.assertEqual(await client.command(b"MAIL FROM:<a@example.org>"), (452, [b"full"]))

        server.behaviour = Behaviour(replies={Stage.END_OF_DATA: Reply(554, "spam")})
        client = await self.connect(server)
        await client.greeting
        await client.command(b"EHLO c")
        self.assertEqual(await self.send_message(client), (554, [b"spam"]))
        [message] = server.messages
        self.assertEqual((message.complete, message.accepted), (True, False))

        server.behaviour = Behaviour(replies={Stage.EHLO: Reply(421, "go away")})
        client = await self.connect(server)
        await client.greeting
        self.assertEqual((await client.command(b"EHLO c"))[0], 421)

    async def test_greeting_reply_closes(self) -> None:
        """A scripted greeting is sent and the connection closed."""
        server = self.server(Behaviour(replies={Stage.GREETING: Reply(554, "no service")}))
        client = await self.connect(server)
        self.assertEqual(await client.greeting, (554, [b"no service"]))
        await client.lost

    async def test_drop_during_data(self) -> None:
        """C{drop_during_data} cuts the connection once data arrives."""
        server = self.server(Behaviour(drop_during_data=True))
        client = await self.connect(server)
        await client.greeting
        await client.command(b"EHLO c")
        reply = await self.send_message(client)
        self.assertIsNone(reply)
        await client.lost
        [message] = server.messages
        self.assertEqual((message.complete, message.accepted), (False, False))
        self.assertTrue(message.data.startswith(b"Subject: hi\r\n"))
        self.assertTrue(server.sessions[0].closed)

    async def test_stall(self) -> None:
        """
        C{stall_at} records the command but never answers; L{stop} closes
        the stalled connection.
        """
        server = self.server(Behaviour(stall_at=Stage.MAIL))
        client = await self.connect(server)
        await client.greeting
        await client.command(b"EHLO c")
        reply = client.command(b"MAIL FROM:<a@example.org>")
        await _sleep(0.2)
        self.assertNoResult(reply)
        self.assertEqual(server.sessions[0].commands[-1].verb, "MAIL")
        await server.stop()
        self.assertIsNone(await reply)
        await client.lost

    async def test_stall_greeting_and_end_of_data(self) -> None:
        """Stalls at the greeting and after the final dot."""
        server = self.server(Behaviour(stall_at=Stage.GREETING))
        client = await self.connect(server)
        await _sleep(0.1)
        self.assertNoResult(client.greeting)

        server.behaviour = Behaviour(stall_at=Stage.END_OF_DATA)
        client = await self.connect(server)
        await client.greeting
        await client.command(b"EHLO c")
        end = defer.ensureDeferred(self.send_message(client))
        await _sleep(0.2)
        self.assertNoResult(end)
        [message] = server.messages
        self.assertEqual((message.complete, message.accepted), (True, False))
        await server.stop()
        self.assertIsNone(await end)


class TLSTests(FixtureTestsMixin, unittest.TestCase):
    async def starttls(self, server: SMTPTestServer, creator: MXConnectionCreator) -> LineClient:
        client = await self.connect(server)
        await client.greeting
        _, lines = await client.command(b"EHLO c")
        self.assertIn(b"STARTTLS", lines)
        self.assertEqual((await client.command(b"STARTTLS"))[0], 220)
        client.transport.startTLS(creator)
        return client

    async def test_starttls_session(self) -> None:
        """
        After STARTTLS the server records the TLS version, the SNI name, and
        that the transaction came under TLS.
        """
        server = self.server(Behaviour(certificate=_PKI.valid(MX)))
        creator = MXConnectionCreator(MX, _PKI.ca_pem)
        client = await self.starttls(server, creator)
        code, lines = await client.command(b"EHLO c")
        self.assertEqual(code, 250)
        self.assertNotIn(b"STARTTLS", lines)
        self.assertEqual((await self.send_message(client))[0], 250)
        [message] = server.messages
        self.assertEqual((message.tls, message.tls_at_mail), (True, True))
        self.assertEqual(message.sni, MX)
        self.assertIn(message.tls_version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(server.plaintext_transactions(), [])
        self.assertEqual([c.tls for c in server.sessions[0].commands], [False, False, True, True, True, True])
        self.assertTrue(creator.outcome().verified)

    async def test_certificate_by_sni(self) -> None:
        """C{certificates_by_name} picks the certificate by SNI name."""
        server = self.server(
            Behaviour(
                certificate=_PKI.untrusted(MX),
                certificates_by_name={MX: _PKI.valid(MX)},
            )
        )
        chosen = MXConnectionCreator(MX, _PKI.ca_pem)
        client = await self.starttls(server, chosen)
        await client.command(b"EHLO c")
        self.assertTrue(chosen.outcome().verified)

        default = MXConnectionCreator("mx2.example.com", _PKI.ca_pem, mode=VerifyMode.RECORD_ONLY)
        client = await self.starttls(server, default)
        await client.command(b"EHLO c")
        self.assertEqual(server.sessions[1].sni, "mx2.example.com")
        self.assertIn(20, default.outcome().verify_errors)

    async def test_alert(self) -> None:
        """C{StartTLS.ALERT} answers 220, then the handshake fails with an alert."""
        server = self.server(Behaviour(certificate=_PKI.valid(MX), starttls=StartTLS.ALERT))
        creator = MXConnectionCreator(MX, _PKI.ca_pem)
        client = await self.starttls(server, creator)
        self.assertIsNone(await client.command(b"EHLO c"))
        await client.lost
        outcome = creator.outcome()
        self.assertFalse(outcome.handshake_completed)
        self.assertIn("received:protocol-version", outcome.alerts)
        self.assertTrue(server.sessions[0].closed)
        self.assertEqual(server.messages, [])
