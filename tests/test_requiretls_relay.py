"""
Issue 16: REQUIRETLS (RFC 8689) in the relay: the intake offers and
accepts it only under TLS, the flag is kept in the queue's envelope across
restarts and reaches the deliverer, and the DSN of a REQUIRETLS message is
tagged REQUIRETLS and holds the header only (§5).
"""

from __future__ import annotations

import email
import email.policy
import json

from twisted.internet.ssl import Certificate, optionsForClientTLS

from mtasts_twisted.delivery import Status
from mtasts_twisted.relay import Queue
from mtasts_twisted.relay.commands import Refusal, parse_mail
from mtasts_twisted.relay.envelope import decode_envelope, encode_envelope
from mtasts_twisted.testing.pki import PKI
from tests.clients import RawClient
from tests.test_intake_commands import IntakeCase
from tests.test_relay import MESSAGE, _ServiceTestCase

_PKI = PKI()
SECRET_BODY = b"Subject: secret\r\nFrom: a@example.org\r\n\r\nThe launch codes are 0000.\r\n"


class RequireTLSCommandTests(_ServiceTestCase):
    """L{parse_mail}: the REQUIRETLS parameter (RFC 8689 §2)."""

    def test_parameter(self) -> None:
        self.assertTrue(parse_mail(b"FROM:<a@example.org> REQUIRETLS", 1000, tls=True).requiretls)
        self.assertTrue(parse_mail(b"FROM:<a@example.org> requiretls SIZE=10", 1000, tls=True).requiretls)
        self.assertFalse(parse_mail(b"FROM:<a@example.org>", 1000, tls=True).requiretls)
        with self.assertRaises(Refusal) as e:
            parse_mail(b"FROM:<a@example.org> REQUIRETLS", 1000, tls=False)
        self.assertEqual((e.exception.code, e.exception.text[:6]), (530, "5.7.10"))
        with self.assertRaises(Refusal) as e:
            parse_mail(b"FROM:<a@example.org> REQUIRETLS=YES", 1000, tls=True)
        self.assertEqual((e.exception.code, e.exception.text[:5]), (501, "5.5.4"))


class RequireTLSIntakeTests(IntakeCase):
    """The intake: REQUIRETLS offered and accepted only after STARTTLS."""

    def listen_tls(self) -> Queue:
        return self.listen(tls_context=_PKI.valid("relay.test").server_options())

    async def starttls(self, client: RawClient) -> None:
        [(code, _)] = await self.replies(client, b"STARTTLS\r\n")
        self.assertEqual(code, 220)
        client.transport.startTLS(optionsForClientTLS("relay.test", Certificate.loadPEM(_PKI.ca_pem)))

    async def test_refused_without_tls(self) -> None:
        """Plaintext session: REQUIRETLS is not advertised, and MAIL with it is C{530 5.7.10}; nothing queued."""
        queue = self.listen_tls()
        client = await self.connect()
        await self.replies(client, b"EHLO client.test\r\n")
        self.assertNotIn(b"REQUIRETLS", client.data)
        answers = await self.submit(client, b"a@example.org", [b"b@example.com"], params=b" REQUIRETLS")
        self.assertEqual((answers[0][0], answers[0][1][:6]), (530, b"5.7.10"), answers)
        self.assertEqual(queue.list(), [])

    async def test_accepted_over_starttls(self) -> None:
        """After STARTTLS and EHLO: REQUIRETLS advertised, accepted, and kept with the message."""
        queue = self.listen_tls()
        client = await self.greeted()
        await self.starttls(client)
        start = len(client.data)
        self.assertEqual((await self.reply(client, b"EHLO client.test"))[0], 250)
        self.assertRegex(client.data[start:], rb"(?m)^250[ -]REQUIRETLS\r$")
        answers = await self.submit(client, b"a@example.org", [b"b@example.com"], params=b" REQUIRETLS")
        self.assertEqual([c for c, _ in answers], [250, 250, 354, 250], answers)
        answers = await self.submit(client, b"a@example.org", [b"c@example.com"])
        self.assertEqual(answers[-1][0], 250, answers)
        tagged, plain = queue.list()
        self.assertTrue(tagged.requiretls)
        self.assertFalse(plain.requiretls)
        # Persisted: a fresh queue over the same directory (a restart, or
        # after kill -9: the envelope was fsynced before the 250).
        fresh = Queue(self.dir)
        self.assertTrue(fresh.get(tagged.id).requiretls)
        self.assertFalse(fresh.get(plain.id).requiretls)


class RequireTLSQueueTests(_ServiceTestCase):
    """The flag in the envelope, through a restart, to the deliverer; and the DSN (§5)."""

    def setUp(self) -> None:
        super().setUp()
        #: The requiretls argument of each deliver() call.
        self.flags: list[bool] = []
        real = self.deliverer.deliver

        def deliver(sender, recipients, message, smtputf8=False, requiretls=False):  # type: ignore[no-untyped-def]
            self.flags.append(requiretls)
            return real(sender, recipients, message, smtputf8)

        self.deliverer.deliver = deliver  # type: ignore[method-assign]

    def test_flag_survives_restart_and_reaches_the_deliverer(self) -> None:
        calls = self.flags
        self.start()
        writer = self.queue.begin("a@example.org", ["bob@example.com"])
        writer.requiretls = True
        writer.write(MESSAGE)
        tagged = writer.commit()
        plain = self.queue.enqueue("a@example.org", ["carol@example.com"], MESSAGE)
        fresh = Queue(self.dir)  # as after a restart
        self.assertTrue(fresh.get(tagged.id).requiretls)
        self.assertFalse(fresh.get(plain.id).requiretls)
        self.service.startService()
        by_recipient = {c[1][0]: flag for c, flag in zip(self.deliverer.calls, calls)}
        self.assertEqual(by_recipient, {"bob@example.com": True, "carol@example.com": False})

    def test_old_envelopes(self) -> None:
        """Envelopes written before the flag read as without it; a non-boolean is corrupt."""
        self.start()
        message = self.queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        data = json.loads(encode_envelope(message))
        self.assertIs(data.pop("requiretls"), False)
        self.assertFalse(decode_envelope(json.dumps(data).encode()).requiretls)
        data["requiretls"] = 1
        self.assertRaises(TypeError, decode_envelope, json.dumps(data).encode())

    def test_dsn_tagged_and_headers_only(self) -> None:
        """
        RFC 8689 §5: a REQUIRETLS message fails permanently (5.7.30): its
        DSN goes to the sender with the null reverse-path, is itself
        tagged REQUIRETLS, and holds the header but not the body.
        """
        self.start()
        writer = self.queue.begin("a@example.org", ["bob@example.com"])
        writer.requiretls = True
        writer.write(SECRET_BODY)
        tagged = writer.commit()
        self.service.startService()
        self.deliverer.fire(0, Status.PERMANENT, code=None,
                            text="5.7.30 REQUIRETLS: no MX host of example.com meets the sender's TLS requirements")
        [dsn] = [m for m in self.queue.list() if m.id != tagged.id]
        self.assertEqual(dsn.sender, "")
        self.assertEqual([r.address for r in dsn.recipients], ["a@example.org"])
        self.assertTrue(dsn.requiretls)
        with self.queue.open_body(dsn.id) as f:
            body = f.read()
        self.assertIn(b"Status: 5.7.30", body)
        self.assertIn(b"Subject: secret", body)
        self.assertNotIn(b"launch codes", body)
        parsed = email.message_from_bytes(body, policy=email.policy.default)
        self.assertEqual(parsed.get_content_type(), "multipart/report")

    def test_dsn_of_plain_message_untagged(self) -> None:
        self.start()
        self.queue.enqueue("a@example.org", ["bob@example.com"], MESSAGE)
        self.service.startService()
        self.deliverer.fire(0, Status.PERMANENT, code=550, text="5.1.1 no such user")
        [dsn] = self.queue.list()
        self.assertFalse(dsn.requiretls)
