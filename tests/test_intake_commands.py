"""
The relay intake's commands and addresses over real loopback TCP with a raw
client (issue 17 items 4, 5 and 10; issue 18's SMTPUTF8): what it refuses
at EHLO/MAIL/RCPT with which reply (RFC 5321 §4.1.2, §4.5.3.1; RFC 6531
§3.5), what it queues for what it accepts, and the C{Received:} line it
writes.
"""

from __future__ import annotations

import email
import email.policy
import re
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mtasts_twisted.relay import Queue, RelaySettings, RelaySMTPFactory
from mtasts_twisted.testing.pki import PKI
from tests.clients import RawClient

_FINAL = re.compile(rb"(?m)^(\d{3}) ([^\r\n]*)\r\n")


class IntakeCase(TestCase):
    """A relay intake on 127.0.0.1 and raw clients that speak to it."""

    timeout = 30

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mtasts-intake-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clients: list[RawClient] = []

    def listen(self, **kw: Any) -> Queue:
        kw.setdefault("reporting_mta", "relay.test")
        tls_context = kw.pop("tls_context", None)
        settings = RelaySettings(**kw)
        self.queue = settings.make_queue(self.dir)
        self.queue.recover()
        self.factory = RelaySMTPFactory(self.queue, settings, reactor, tls_context=tls_context)
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = port.getHost().port
        self.addCleanup(self._close, port)
        return self.queue

    async def _close(self, port: Any) -> None:
        for client in self.clients:
            if client.transport is not None and not client.closed.called:
                client.transport.abortConnection()
            await client.closed
        await port.stopListening()
        await self.factory.wait_closed()

    async def connect(self, source: str | None = None) -> RawClient:
        client = RawClient()
        self.clients.append(client)
        connected: Deferred[None] = Deferred()
        client.connectionMade = lambda: connected.callback(None)  # type: ignore[method-assign]
        bind = (source, 0) if source is not None else None
        reactor.connectTCP("127.0.0.1", self.port, ClientFactory.forProtocol(lambda: client), timeout=5,
                           bindAddress=bind)
        await connected.addTimeout(5, reactor)
        await client.expect(rb"^\d{3} ")
        return client

    async def replies(self, client: RawClient, data: bytes, count: int = 1) -> list[tuple[int, bytes]]:
        """Send C{data}; wait for C{count} final reply lines after it; (code, text) each."""
        start = len(client.data)
        client.send(data)
        for _ in range(500):
            found = _FINAL.findall(client.data[start:])
            if len(found) >= count or client.closed.called:
                break
            await deferLater(reactor, 0.01)
        found = _FINAL.findall(client.data[start:])
        self.assertGreaterEqual(len(found), count, client.data[start:])
        return [(int(code), text) for code, text in found[:count]]

    async def reply(self, client: RawClient, line: bytes) -> tuple[int, bytes]:
        [answer] = await self.replies(client, line + b"\r\n")
        return answer

    async def greeted(self, name: bytes = b"client.test") -> RawClient:
        client = await self.connect()
        code, text = await self.reply(client, b"EHLO " + name)
        self.assertEqual(code, 250, text)
        return client

    async def submit(self, client: RawClient, sender: bytes, recipients: list[bytes],
                     body: bytes = b"Subject: t\r\n\r\nHi.\r\n", params: bytes = b"") -> list[tuple[int, bytes]]:
        """One transaction, pipelined; the replies to MAIL, each RCPT, DATA (and the dot if 354)."""
        lines = b"MAIL FROM:<" + sender + b">" + params + b"\r\n"
        lines += b"".join(b"RCPT TO:<" + r + b">\r\n" for r in recipients)
        answers = await self.replies(client, lines + b"DATA\r\n", 2 + len(recipients))
        if answers[-1][0] == 354:
            answers += await self.replies(client, body + b".\r\n")
        return answers


class SequenceTests(IntakeCase):
    """RFC 5321 §4.1.4: the order of commands."""

    async def test_mail_before_ehlo(self) -> None:
        """MAIL before EHLO/HELO: C{503 5.5.1}; after EHLO the same MAIL is accepted."""
        self.listen()
        client = await self.connect()
        code, text = await self.reply(client, b"MAIL FROM:<a@example.org>")
        self.assertEqual((code, text[:5]), (503, b"5.5.1"), text)
        self.assertEqual((await self.reply(client, b"RCPT TO:<b@example.com>"))[0], 503)
        self.assertEqual((await self.reply(client, b"HELO client.test"))[0], 250)
        self.assertEqual((await self.reply(client, b"MAIL FROM:<a@example.org>"))[0], 250)

    async def test_rcpt_and_data_out_of_sequence(self) -> None:
        """RCPT before MAIL and DATA without a recipient: C{503 5.5.1}."""
        self.listen()
        client = await self.greeted()
        code, text = await self.reply(client, b"RCPT TO:<b@example.com>")
        self.assertEqual((code, text[:5]), (503, b"5.5.1"), text)
        self.assertEqual((await self.reply(client, b"MAIL FROM:<a@example.org>"))[0], 250)
        code, text = await self.reply(client, b"DATA")
        self.assertEqual((code, text[:5]), (503, b"5.5.1"), text)

    async def test_ehlo_needs_a_name(self) -> None:
        """EHLO without its domain argument (RFC 5321 §4.1.1.1): C{501}, not a greeting."""
        self.listen()
        client = await self.connect()
        code, text = await self.reply(client, b"EHLO")
        self.assertEqual((code, text[:5]), (501, b"5.5.4"), text)
        self.assertEqual((await self.reply(client, b"MAIL FROM:<a@example.org>"))[0], 503)


class StartTLSTests(IntakeCase):
    """RFC 3207 §4.2: after STARTTLS the session starts afresh."""

    async def test_ehlo_again_and_no_plaintext_after_starttls(self) -> None:
        """
        After the handshake MAIL needs a new EHLO (C{503 5.5.1}); a command
        pipelined in plaintext behind STARTTLS is dropped, never run as if
        it had come under TLS (RFC 3207 §5).
        """
        pki = PKI()
        self.listen(tls_context=pki.valid("relay.test").server_options())
        client = await self.connect()
        await self.replies(client, b"EHLO client.test\r\n")
        self.assertRegex(client.data, rb"(?m)^250[ -]STARTTLS\r$")
        self.assertEqual((await self.reply(client, b"MAIL FROM:<a@example.org>"))[0], 250)
        [(code, _)] = await self.replies(client, b"STARTTLS\r\nNOOP\r\n")
        self.assertEqual(code, 220)
        client.transport.startTLS(optionsForClientTLS("relay.test", Certificate.loadPEM(pki.ca_pem)))
        code, text = await self.reply(client, b"MAIL FROM:<a@example.org>")
        self.assertEqual((code, text[:5]), (503, b"5.5.1"), client.data)
        self.assertEqual((await self.reply(client, b"EHLO client.test"))[0], 250)
        self.assertEqual((await self.reply(client, b"MAIL FROM:<a@example.org>"))[0], 250)
        after = client.data.split(b"\r\n220 ", 1)[1]
        self.assertEqual([int(c) for c, _ in _FINAL.findall(after)], [503, 250, 250], after)


class InjectionTests(IntakeCase):
    """Issue 17.5: no command argument carries a line break or control character."""

    async def test_bare_line_ends_and_controls_in_every_command(self) -> None:
        """Bare LF, bare CR, NUL, ESC, DEL in any command's argument: C{501 5.5.2}; nothing queued."""
        queue = self.listen()
        client = await self.connect()
        for verb in (b"EHLO evil.test", b"HELO evil.test"):
            for bad in (b"\nX-Injected: yes", b"\rX-Injected: yes", b"\x00", b"\x1b[1m", b"\x7f"):
                code, text = await self.reply(client, verb + bad)
                self.assertEqual((code, text[:5]), (501, b"5.5.2"), (verb, bad, text))
        self.assertEqual((await self.reply(client, b"MAIL FROM:<a@example.org>"))[0], 503)
        await self.reply(client, b"EHLO client.test")
        for line in (b"MAIL FROM:<a@example.org>\n X-Injected: yes", b"MAIL FROM:<a@exa\x00mple.org>",
                     b"MAIL FROM:<a@example.org> SIZE=1\r0", b"VRFY bob\nX-Injected: yes", b"NOOP \x07"):
            code, text = await self.reply(client, line)
            self.assertEqual((code, text[:5]), (501, b"5.5.2"), (line, text))
        self.assertEqual((await self.reply(client, b"MAIL FROM:<a@example.org>"))[0], 250)
        for rcpt in (b'RCPT TO:<"b\nBcc: y"@x.test>', b"RCPT TO:<b\r@example.com>", b"RCPT TO:<b@example.com>\t",
                     b'RCPT TO:<"b\x01"@example.com>'):
            code, text = await self.reply(client, rcpt)
            self.assertEqual((code, text[:5]), (501, b"5.5.2"), (rcpt, text))
        self.assertEqual((await self.reply(client, b"DATA"))[0], 503)
        self.assertEqual(queue.list(), [])

    async def test_received_built_from_validated_values(self) -> None:
        """
        A HELO name that is no domain (but printable) is accepted, and the
        C{Received:} line names the client by its address instead: one
        header field, the message's own fields after it, no other.
        """
        queue = self.listen()
        client = await self.greeted(b"bad;name(x)")
        answers = await self.submit(client, b"a@example.org", [b"b@example.com"],
                                    b"From: a@example.org\r\nSubject: t\r\n\r\nHi.\r\n")
        self.assertEqual([c for c, _ in answers], [250, 250, 354, 250], answers)
        [message] = queue.list()
        with queue.open_body(message.id) as f:
            data = f.read()
        header = data.split(b"\r\n\r\n", 1)[0]
        self.assertRegex(header, rb"\AReceived: from \[127\.0\.0\.1\] \(\[127\.0\.0\.1\]\)\r\n"
                                 rb"\tby relay\.test with ESMTP \(mtasts-twisted\);\r\n\t[^\r\n]+\r\n")
        parsed = email.message_from_bytes(data, policy=email.policy.compat32)
        self.assertEqual(parsed.keys(), ["Received", "From", "Subject"])
        self.assertNotIn(b"bad;name", data)

    async def test_received_names_valid_helo(self) -> None:
        """A valid EHLO domain (or address literal) is the C{from} of C{Received:}."""
        queue = self.listen()
        for name in (b"client.example", b"[127.0.0.1]", b"[IPv6:::1]"):
            client = await self.greeted(name)
            answers = await self.submit(client, b"a@example.org", [b"b@example.com"])
            self.assertEqual(answers[-1][0], 250, answers)
        bodies = []
        for message in queue.list():
            with queue.open_body(message.id) as f:
                bodies.append(f.read().split(b"\r\n", 1)[0])
        self.assertEqual(sorted(bodies), sorted(
            b"Received: from " + name + b" ([127.0.0.1])"
            for name in (b"client.example", b"[127.0.0.1]", b"[IPv6:::1]")))


class AddressTests(IntakeCase):
    """Issue 17.4 and 17.10: RFC 5321 §4.1.2 syntax and §4.5.3.1 sizes at MAIL and RCPT."""

    async def test_quoted_local_part_accepted_as_written(self) -> None:
        """A legal quoted local part is accepted and queued in its (minimally quoted) form."""
        queue = self.listen()
        client = await self.greeted()
        answers = await self.submit(client, b'"john smith"@example.org',
                                    [b'"a b"@example.com', b'"plain"@example.com', b'"x\\"y"@example.com'])
        self.assertEqual([c for c, _ in answers], [250, 250, 250, 250, 354, 250], answers)
        [message] = queue.list()
        self.assertEqual(message.sender, '"john smith"@example.org')
        self.assertEqual([r.address for r in message.recipients],
                         ['"a b"@example.com', "plain@example.com", '"x\\"y"@example.com'])

    async def test_malformed_recipients(self) -> None:
        """What is no RFC 5321 mailbox, or one we cannot deliver to: a 5xx at RCPT, nothing queued."""
        queue = self.listen()
        client = await self.greeted()
        self.assertEqual((await self.reply(client, b"MAIL FROM:<a@example.org>"))[0], 250)
        cases = {
            b"<a..b@example.com>": (501, b"5.1.3"),
            b"<.a@example.com>": (501, b"5.1.3"),
            b"<a b@example.com>": (501, b"5.1.3"),
            b'<"unterminated@example.com>': (501, b"5.1.3"),
            b"<a@b@example.com>": (501, b"5.1.3"),
            b"<a@-bad-.example>": (501, b"5.1.3"),
            b"<a@exa_mple.com>": (501, b"5.1.3"),
            b"<a@example..com>": (501, b"5.1.3"),
            b"<a@>": (501, b"5.1.3"),
            b"<@example.com>": (501, b"5.1.3"),
            b"<a@example.com": (501, b"5.1.3"),
            b"<>": (501, b"5.1.3"),
            b"<a>": (501, b"5.1.3"),
            b"<a@[192.0.2.1]>": (553, b"5.1.2"),
            b"<a@192.0.2.1>": (553, b"5.1.2"),
            b"<a@example.com> NOTIFY=NEVER": (555, b"5.5.4"),
        }
        for path, expected in cases.items():
            code, text = await self.reply(client, b"RCPT TO:" + path)
            self.assertEqual((code, text[:5]), expected, (path, text))
        self.assertEqual((await self.reply(client, b"DATA"))[0], 503)
        self.assertEqual(queue.list(), [])

    async def test_malformed_senders_and_parameters(self) -> None:
        """MAIL: a bad reverse-path is C{501 5.1.7}; parameters are checked (RFC 5321 §4.1.1.11)."""
        self.listen()
        client = await self.greeted()
        cases = {
            b"MAIL FROM:<a..b@example.org>": (501, b"5.1.7"),
            b"MAIL FROM:<a@>": (501, b"5.1.7"),
            b"MAIL FROM:a@example.org>": (501, b"5.1.7"),
            b"MAIL FROM <a@example.org>": (501, b"5.5.4"),
            b"MAIL FROM:<a@example.org> RET=HDRS": (555, b"5.5.4"),
            b"MAIL FROM:<a@example.org> SIZE=lots": (501, b"5.5.4"),
            b"MAIL FROM:<a@example.org> BODY=BINARYMIME": (501, b"5.5.4"),
            b"MAIL FROM:<a@example.org> SMTPUTF8=yes": (501, b"5.5.4"),
            b"MAIL FROM:<a@example.org> SIZE=1 SIZE=2": (501, b"5.5.4"),
        }
        for line, expected in cases.items():
            code, text = await self.reply(client, line)
            self.assertEqual((code, text[:5]), expected, (line, text))
        for good in (b"MAIL FROM:<> BODY=8BITMIME SIZE=100", b"MAIL FROM:<@relay.example:a@example.org>",
                     b"MAIL FROM:<a@[127.0.0.1]> body=7bit"):
            code, text = await self.reply(client, good)
            self.assertEqual(code, 250, (good, text))
            self.assertEqual((await self.reply(client, b"RSET"))[0], 250)

    async def test_lengths(self) -> None:
        """
        RFC 5321 §4.5.3.1.1 and §4.5.3.1.3: a local part of 64 octets and a
        path of 256 are accepted; one more octet is C{501}.  So is a 2,000
        character local part.
        """
        queue = self.listen()
        client = await self.greeted()
        domain = b"d" * 60 + b"." + b"e" * 60 + b"." + b"f" * 60 + b"." + b"g" * 57  # 240 octets
        self.assertEqual((await self.reply(client, b"MAIL FROM:<" + b"s" * 64 + b"@example.org>"))[0], 250)
        code, text = await self.reply(client, b"RCPT TO:<" + b"a" * 65 + b"@example.com>")
        self.assertEqual((code, text[:5]), (501, b"5.1.3"), text)
        code, text = await self.reply(client, b"RCPT TO:<" + b"a" * 2000 + b"@example.com>")
        self.assertEqual((code, text[:5]), (501, b"5.1.3"), text)
        code, text = await self.reply(client, b"RCPT TO:<" + b"a..b" * 50 + b"@example.com>")
        self.assertEqual((code, text[:5]), (501, b"5.1.3"), text)
        self.assertLess(len(text), 200)  # what is echoed is cut (RFC 5321 §4.5.3.1.5: 512 octets a reply line)
        code, text = await self.reply(client, b"RCPT TO:<" + b"b" * 13 + b"@" + domain + b">")  # 256 with <>
        self.assertEqual(code, 250, text)
        code, text = await self.reply(client, b"RCPT TO:<" + b"b" * 14 + b"@" + domain + b">")
        self.assertEqual((code, text[:5]), (501, b"5.1.3"), text)
        code, text = await self.reply(client, b"RCPT TO:<" + b"a" * 64 + b"@example.com>")
        self.assertEqual(code, 250, text)
        answers = await self.replies(client, b"DATA\r\nSubject: t\r\n\r\nHi.\r\n.\r\n", 2)
        self.assertEqual([c for c, _ in answers], [354, 250], answers)
        [message] = queue.list()
        self.assertEqual([len(r.address) for r in message.recipients], [13 + 1 + 240, 64 + 12])
        code, text = await self.reply(client, b"MAIL FROM:<" + b"s" * 65 + b"@example.org>")
        self.assertEqual((code, text[:5]), (501, b"5.1.7"), text)


class SMTPUTF8Tests(IntakeCase):
    """Issue 18 and 17.10: SMTPUTF8 (RFC 6531) at the intake."""

    async def test_advertised(self) -> None:
        self.listen()
        client = await self.connect()
        await self.replies(client, b"EHLO client.test\r\n")
        self.assertRegex(client.data, rb"(?m)^250[ -]SMTPUTF8\r$")
        self.assertRegex(client.data, rb"(?m)^250[ -]8BITMIME\r$")  # RFC 6531 §3.1 item 8

    async def test_utf8_addresses_need_the_parameter(self) -> None:
        """
        RFC 6531 §3.5: a UTF-8 address without the SMTPUTF8 parameter is
        C{550 5.6.7} at MAIL and C{553 5.6.7} at RCPT; bytes that are not
        UTF-8 are a syntax error.
        """
        self.listen()
        client = await self.greeted()
        code, text = await self.reply(client, "MAIL FROM:<jörg@example.org>".encode())
        self.assertEqual((code, text[:5]), (550, b"5.6.7"), text)
        self.assertEqual((await self.reply(client, b"MAIL FROM:<a@example.org>"))[0], 250)
        code, text = await self.reply(client, "RCPT TO:<bob@bücher.test>".encode())
        self.assertEqual((code, text[:5]), (553, b"5.6.7"), text)
        self.assertEqual((await self.reply(client, b"RSET"))[0], 250)
        self.assertEqual((await self.reply(client, b"MAIL FROM:<a@example.org> SMTPUTF8"))[0], 250)
        code, text = await self.reply(client, b"RCPT TO:<bob@b\xfccher.test>")  # Latin-1, not UTF-8
        self.assertEqual((code, text[:5]), (501, b"5.1.3"), text)
        code, text = await self.reply(client, "RCPT TO:<bob@bü_cher.test>".encode())
        self.assertEqual((code, text[:5]), (501, b"5.1.3"), text)
        code, text = await self.reply(client, "EHLO bücher.test".encode())  # RFC 6531 §3.7.1
        self.assertEqual((code, text[:5]), (501, b"5.5.4"), text)

    async def test_utf8_accepted_with_the_parameter(self) -> None:
        """With C{SMTPUTF8} on MAIL, UTF-8 addresses are queued as written, the flag with them."""
        queue = self.listen()
        client = await self.greeted()
        answers = await self.submit(client, "jörg@example.org".encode(),
                                    ["bob@bücher.test".encode(), "δοκιμή@παράδειγμα.δοκιμή".encode()],
                                    "To: bob@bücher.test\r\nSubject: t\r\n\r\nHi.\r\n".encode(),
                                    params=b" SMTPUTF8 BODY=8BITMIME")
        self.assertEqual([c for c, _ in answers], [250, 250, 250, 354, 250], answers)
        answers = await self.submit(client, b"a@example.org", [b"b@example.com"])
        self.assertEqual(answers[-1][0], 250, answers)
        first, second = queue.list()
        self.assertEqual(first.sender, "jörg@example.org")
        self.assertEqual([r.address for r in first.recipients], ["bob@bücher.test", "δοκιμή@παράδειγμα.δοκιμή"])
        self.assertTrue(first.smtputf8)
        self.assertFalse(second.smtputf8)
        with queue.open_body(first.id) as f:
            self.assertIn(b"with UTF8SMTP (mtasts-twisted)", f.read())  # RFC 6531 §4.3
