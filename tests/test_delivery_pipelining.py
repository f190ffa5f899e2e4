"""
RFC 2920 pipelining in the delivery client: MAIL, every RCPT and DATA in
one write when the server offers PIPELINING, every reply checked in order,
the session kept in step whatever the replies; and the message content
with its final dot in one write up to ONE_WRITE_BODY.
"""

from __future__ import annotations

import io

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.delivery import Status
from mtasts_twisted.delivery.dialogue import ONE_WRITE_BODY, _end_unwanted_data
from mtasts_twisted.delivery.protocol import ClientProtocol, Reply as ClientReply
from mtasts_twisted.testing.smtp import Behaviour, Reply, Stage
from tests.test_delivery import _CERTS, BOB, SENDER
from tests.test_reuse import ReuseWorld, verbs

PIPELINING = ("PIPELINING",)
CAROL, DAVE = "carol@example.com", "dave@example.com"


class PipeliningTests(ReuseWorld):
    """Against twisted.mail's ESMTP server, offering PIPELINING or not."""

    def group(self, server, verb_list=("MAIL", "RCPT", "DATA")):
        """The reads in which the commands named came, per transaction."""
        commands = [c for s in server.sessions for c in s.commands if c.verb in verb_list]
        return [c.read for c in commands]

    async def test_one_write_per_transaction(self) -> None:
        """MAIL, both RCPTs and DATA arrive in one read; the outcomes are as without."""
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=PIPELINING))
        self.policy("enforce")
        result = await self.deliver(recipients=(BOB, CAROL))
        self.assertEqual([o.status for o in result.outcomes], [Status.DELIVERED, Status.DELIVERED])
        reads = self.group(server)
        self.assertEqual(len(reads), 4)
        self.assertEqual(len(set(reads)), 1, reads)
        self.assertEqual(server.messages[0].recipients, (BOB, CAROL))

    async def test_not_offered(self) -> None:
        """Without PIPELINING each command waits for the reply before it."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        result = await self.deliver(recipients=(BOB, CAROL))
        self.assertEqual([o.status for o in result.outcomes], [Status.DELIVERED, Status.DELIVERED])
        reads = self.group(server)
        self.assertEqual(len(set(reads)), 4, reads)

    async def test_mixed_recipients(self) -> None:
        """250, 450 and 550 to pipelined RCPTs: delivered, transient, permanent."""
        server = self.server(
            Behaviour(
                certificate=_CERTS["valid"],
                extensions=PIPELINING,
                recipient_replies={CAROL: Reply(450, "later"), DAVE: Reply(550, "no such user")},
            )
        )
        self.policy("enforce")
        result = await self.deliver(recipients=(BOB, CAROL, DAVE))
        self.assertEqual(
            [(o.recipient, o.status, o.code) for o in result.outcomes],
            [(BOB, Status.DELIVERED, 250), (CAROL, Status.TRANSIENT, 450), (DAVE, Status.PERMANENT, 550)],
        )
        [message] = server.messages
        self.assertEqual(message.recipients, (BOB,))

    async def test_mail_refused(self) -> None:
        """MAIL 550 decides every recipient, not the RCPTs' 503s after it."""
        server = self.server(
            Behaviour(certificate=_CERTS["valid"], extensions=PIPELINING, replies={Stage.MAIL: Reply(550, "go away")})
        )
        self.policy("enforce")
        result = await self.deliver(recipients=(BOB, CAROL))
        self.assertEqual([(o.status, o.code) for o in result.outcomes], [(Status.PERMANENT, 550)] * 2)
        self.assertIn("MAIL FROM refused", result.outcomes[0].message)
        self.assertEqual(server.messages, [])

    async def test_every_recipient_refused_keeps_the_session_in_step(self) -> None:
        """
        All RCPTs refused: DATA is refused too (503); the reused session's
        next transaction reads its own replies and is delivered.
        """
        server = self.server(
            Behaviour(certificate=_CERTS["valid"], extensions=PIPELINING,
                      recipient_replies={DAVE: Reply(550, "no such user")})
        )
        self.policy("enforce")
        deliverer = self.reusing()
        refused = await self.send(deliverer, DAVE)
        self.assertEqual([(o.status, o.code) for o in refused.outcomes], [(Status.PERMANENT, 550)])
        for _ in range(2):
            self.assertDelivered(await self.send(deliverer, BOB))
        self.assertEqual(len(server.sessions), 1)
        self.assertEqual([m.recipients for m in server.messages if m.accepted], [(BOB,), (BOB,)])
        self.assertEqual(verbs(server).count("STARTTLS"), 1)

    async def test_body_sizes_around_one_write(self) -> None:
        """Bodies below, at and above ONE_WRITE_BODY arrive intact, dots stuffed."""
        server = self.server(Behaviour(certificate=_CERTS["valid"], extensions=PIPELINING))
        self.policy("enforce")
        deliverer = self.reusing()
        lines = b"Subject: sizes\r\n\r\n" + (b"x" * 78 + b"\r\n") * (ONE_WRITE_BODY // 80 - 1)
        # Padded so that a line starting with a dot begins right at the
        # boundary of the first write.
        pad = ONE_WRITE_BODY - len(lines) - 2
        start = lines + b"p" * pad + b"\r\n" + b".dot line\r\n"
        self.assertEqual(start.index(b"\r\n.dot") + 2, ONE_WRITE_BODY)
        for size in (ONE_WRITE_BODY - 1, ONE_WRITE_BODY, ONE_WRITE_BODY + 1, 3 * ONE_WRITE_BODY):
            body = (start + (b"y" * 78 + b"\r\n") * (size // 80 + 1))[: size - 2]
            if body.endswith(b"\r"):
                body = body[:-1] + b"z"  # no bare CR at the cut
            body += b"\r\n"
            self.assertEqual(len(body), size)
            result = await deliverer.deliver(SENDER, [BOB], io.BytesIO(body))
            self.assertEqual(result.outcomes[0].status, Status.DELIVERED, size)
            self.assertEqual(server.messages[-1].data, body, size)


class EndUnwantedDataTests(SynchronousTestCase):
    """A DATA accepted after every recipient was refused is ended at once."""

    def connected(self) -> tuple[ClientProtocol, StringTransport]:
        proto = ClientProtocol(Clock())
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_354_is_ended_with_a_dot(self) -> None:
        proto, transport = self.connected()
        d = Deferred.fromCoroutine(_end_unwanted_data(proto, ClientReply(354, ("go ahead",)), 5))
        self.assertEqual(transport.value(), b".\r\n")
        self.assertNoResult(d)
        proto.dataReceived(b"554 no valid recipients\r\n")
        self.successResultOf(d)
        self.assertTrue(proto.idle)  # in step: nothing left unread

    def test_refused_data_needs_nothing(self) -> None:
        proto, transport = self.connected()
        for reply in (ClientReply(503, ("need RCPT",)), None):
            d = Deferred.fromCoroutine(_end_unwanted_data(proto, reply, 5))
            self.successResultOf(d)
        self.assertEqual(transport.value(), b"")

    def test_send_group_is_one_write(self) -> None:
        proto, transport = self.connected()
        writes = []
        transport.write = writes.append  # type: ignore[method-assign]
        proto.send_group([b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA"])
        self.assertEqual(writes, [b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"])
