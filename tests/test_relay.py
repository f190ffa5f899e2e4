"""
Tests for L{mtasts_twisted.relay}: the SMTP intake over real loopback TCP
with twisted.mail's client, and the delivery workers with a fake
deliverer on a L{Clock}.
"""

from __future__ import annotations

import email
import io
import ipaddress
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from typing import Any, BinaryIO

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.mail.smtp import ESMTPSenderFactory, SMTPClientError, SMTPDeliveryError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtasts_twisted.delivery import DeliveryResult, RecipientOutcome, Status
from mtasts_twisted.relay import Queue, RecipientStatus
from mtasts_twisted.relay import RelayService, RelaySettings, RelaySMTPFactory

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: test\r\n\r\nHello.\r\n.dotted line\r\n"


def settings(**kw: Any) -> RelaySettings:
    kw.setdefault("reporting_mta", "relay.test")
    return RelaySettings(**kw)


class IntakeTests(TestCase):
    """Submission over a real loopback TCP port."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mtasts-relay-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def listen(self, **kw: Any) -> Queue:
        s = settings(**kw)
        queue = s.make_queue(self.dir)
        queue.recover()
        self.received: list[Any] = []
        factory = RelaySMTPFactory(queue, s, reactor, on_message=self.received.append)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.settle, factory)
        return queue

    async def settle(self, factory: RelaySMTPFactory) -> None:
        await factory.wait_closed()
        await deferLater(reactor, 0.01)

    def send(self, sender: str, recipients: list[str], body: bytes) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        factory = ESMTPSenderFactory(
            # twisted's client wants LF line ends and sends CRLF
            None,
            None,
            sender,
            recipients,
            io.BytesIO(body.replace(b"\r\n", b"\n")),
            d,
            retries=0,
            requireAuthentication=False,
            requireTransportSecurity=False,
        )
        reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory)
        return d

    async def test_submit_queues_real_bytes(self) -> None:
        queue = self.listen()
        count, _ = await self.send(
            "alice@example.org", ["bob@example.com", "carol@example.com"], MESSAGE
        )
        self.assertEqual(count, 2)
        [m] = queue.list()
        self.assertEqual(self.received, [m])
        self.assertEqual(m.sender, "alice@example.org")
        self.assertEqual(
            [r.address for r in m.recipients], ["bob@example.com", "carol@example.com"]
        )
        with queue.open_body(m.id) as f:
            data = f.read()
        self.assertTrue(data.startswith(b"Received: from "))
        self.assertTrue(data.endswith(MESSAGE), data)  # dot-unstuffed, CRLF
        self.assertEqual(m.size, len(data))
        self.assertEqual(email.message_from_bytes(data)["Subject"], "test")

    async def test_null_sender_accepted(self) -> None:
        queue = self.listen()
        await self.send("", ["bob@example.com"], MESSAGE)
        [m] = queue.list()
        self.assertEqual(m.sender, "")

    async def test_refused_outside_allowed_networks(self) -> None:
        queue = self.listen(allowed_networks=(ipaddress.ip_network("192.0.2.0/24"),))
        try:
            await self.send("alice@example.org", ["bob@example.com"], MESSAGE)
        except SMTPClientError as e:
            self.assertEqual(e.code, 554)
            self.assertIn(b"relay access denied", e.resp)
        else:
            self.fail("accepted from a non-allowed network")
        self.assertEqual(queue.list(), [])

    async def test_queue_full_452(self) -> None:
        queue = self.listen(max_queue_messages=1)
        await self.send("alice@example.org", ["bob@example.com"], MESSAGE)
        try:
            await self.send("alice@example.org", ["bob@example.com"], MESSAGE)
        except SMTPDeliveryError as e:
            self.assertEqual(e.code, 452)
        else:
            self.fail("accepted into a full queue")
        self.assertEqual(len(queue.list()), 1)

    async def test_too_large_552(self) -> None:
        queue = self.listen(max_message_size=200)
        try:
            await self.send(
                "alice@example.org", ["bob@example.com"], MESSAGE + b"x" * 300 + b"\r\n"
            )
        except SMTPDeliveryError as e:
            self.assertEqual(e.code, 552)
        else:
            self.fail("accepted a message over the limit")
        self.assertEqual(queue.list(), [])
        self.assertEqual(len(__import__("os").listdir(self.dir)), 0)

    async def test_too_many_recipients(self) -> None:
        queue = self.listen(max_recipients=2)
        # twisted's client sends to the accepted recipients and reports the rest
        count, results = await self.send(
            "a@example.org", [f"r{i}@example.com" for i in range(3)], MESSAGE
        )
        self.assertEqual(count, 2)
        self.assertEqual([code for _, code, _ in results], [250, 250, 452])
        self.assertEqual(len(queue.list()[0].recipients), 2)


class FakeDeliverer:
    """Records deliver() calls; the test fires their Deferreds."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], bytes, Deferred[DeliveryResult]]] = []
        #: The smtputf8 argument of each call.
        self.smtputf8: list[bool] = []

    def deliver(
        self, sender: str, recipients: Sequence[str], message: BinaryIO, smtputf8: bool = False
    ) -> Deferred[DeliveryResult]:
        d: Deferred[DeliveryResult] = Deferred()
        self.calls.append((sender, list(recipients), message.read(), d))
        self.smtputf8.append(smtputf8)
        return d

    def fire(
        self,
        index: int,
        status: Status,
        code: int | None = 250,
        text: str = "2.0.0 ok",
        **per: Status,
    ) -> None:
        _, recipients, _, d = self.calls[index]
        outcomes = tuple(
            RecipientOutcome(
                r,
                per.get(r.split("@")[0], status),
                code,
                text,
                "mx.example.com",
                "TLSv1.3",
                True,
            )
            for r in recipients
        )
        d.callback(DeliveryResult(recipients[0].split("@")[1], None, outcomes, ()))


class _ServiceTestCase(SynchronousTestCase):
    """A RelayService over a queue in a temp directory, a fake clock and a FakeDeliverer."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mtasts-relay-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.deliverer = FakeDeliverer()

    def start(self, **kw: Any) -> RelayService:
        kw.setdefault("poll_interval", 10)
        s = settings(**kw)
        self.queue = s.make_queue(self.dir, clock=self.clock)
        self.service = RelayService(self.queue, self.deliverer, s, self.clock)
        self.addCleanup(self.service.stopService)
        return self.service


class WorkerTests(_ServiceTestCase):
    def go(self) -> None:
        self.service.startService()

    def test_delivered_removed(self) -> None:
        self.start()
        m = self.queue.enqueue("alice@example.org", ["bob@example.com"], MESSAGE)
        self.go()
        [(sender, rcpts, body, _)] = self.deliverer.calls
        self.assertEqual(
            (sender, rcpts, body), ("alice@example.org", ["bob@example.com"], MESSAGE)
        )
        self.assertEqual(self.service.in_flight, {(m.id, "example.com")})
        self.clock.advance(20)  # polls do not pick it twice
        self.assertEqual(len(self.deliverer.calls), 1)
        self.deliverer.fire(0, Status.DELIVERED)
        self.assertEqual(self.queue.list(), [])
        self.assertEqual(self.service.stats["deliveries"]["delivered"], 1)

    def test_grouping_per_domain(self) -> None:
        self.start()
        self.queue.enqueue(
            "a@example.org",
            ["b@example.com", "c@EXAMPLE.com", "d@example.net"],
            MESSAGE,
        )
        self.go()
        self.assertEqual(
            sorted(c[1] for c in self.deliverer.calls),
            [["b@example.com", "c@EXAMPLE.com"], ["d@example.net"]],
        )
        self.deliverer.fire(0, Status.DELIVERED)
        self.assertEqual(len(self.queue.list()), 1)  # other domain pending
        self.deliverer.fire(1, Status.DELIVERED)
        self.assertEqual(self.queue.list(), [])

    def test_undeliverable_arguments_fail_permanently(self) -> None:
        """
        A deliverer's ValueError (IDeliverer: arguments it can never send,
        e.g. an address queued before the intake checked addresses) fails
        the recipients permanently (5.1.3) with a DSN, instead of retrying
        for days.
        """
        self.start()
        m = self.queue.enqueue("a@example.org", ['"b\nBcc: y"@example.com'], MESSAGE)
        self.go()
        [(_, _, _, d)] = self.deliverer.calls
        d.errback(ValueError("invalid address '\"b\\nBcc: y\"@example.com'"))
        [dsn] = self.queue.list()  # the original is gone, its DSN is queued
        self.assertNotEqual(dsn.id, m.id)
        self.assertEqual(dsn.sender, "")
        self.assertEqual([r.address for r in dsn.recipients], ["a@example.org"])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_transient_backoff(self) -> None:
        self.start(retry_base=300, retry_max=3600)
        m = self.queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        self.go()
        delays = []
        for i in range(6):
            self.assertEqual(len(self.deliverer.calls), i + 1)
            t0 = self.clock.seconds()
            self.deliverer.fire(i, Status.TRANSIENT, 421, "4.7.0 try later")
            r = self.queue.get(m.id).recipients[0]
            self.assertEqual(r.state, RecipientStatus.PENDING)
            self.assertEqual(r.status_code, "4.7.0")
            delays.append(r.next_attempt - t0)
            self.clock.advance(r.next_attempt - t0 - 1)
            self.assertEqual(len(self.deliverer.calls), i + 1)
            self.clock.pump([1, 10])
        self.assertEqual(delays, [300, 600, 1200, 2400, 3600, 3600])
        self.assertEqual(self.queue.get(m.id).recipients[0].attempts, 6)

    def test_permanent_dsn(self) -> None:
        self.start()
        m = self.queue.enqueue(
            "alice@example.org", ["bob@example.com", "carol@example.com"], MESSAGE
        )
        self.go()
        self.deliverer.fire(
            0,
            Status.DELIVERED,
            bob=Status.PERMANENT,
            code=550,
            text="5.1.1 no such user",
        )
        messages = self.queue.list()
        self.assertNotIn(m.id, [x.id for x in messages])
        [dsn] = messages
        self.assertEqual(dsn.sender, "")
        self.assertEqual([r.address for r in dsn.recipients], ["alice@example.org"])
        with self.queue.open_body(dsn.id) as f:
            parsed = email.message_from_bytes(f.read())
        block = parsed.get_payload()[1].get_payload()[1]
        self.assertEqual(block["Final-Recipient"], "rfc822; bob@example.com")
        self.assertEqual(block["Status"], "5.1.1")
        self.assertEqual(block["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        self.assertIn("Subject: test", parsed.get_payload()[2].get_payload())
        self.assertEqual(self.service.stats["dsn_queued"], 1)

    def test_null_sender_no_dsn(self) -> None:
        self.start()
        self.queue.enqueue("", ["bob@example.com"], MESSAGE)
        self.go()
        self.deliverer.fire(0, Status.PERMANENT, 550, "5.1.1 no such user")
        self.assertEqual(self.queue.list(), [])
        self.assertEqual(self.service.stats["dsn_queued"], 0)

    def test_expiry_dsn(self) -> None:
        self.start(expiry=3000, retry_base=1000, retry_max=1000)
        m = self.queue.enqueue("alice@example.org", ["bob@example.com"], MESSAGE)
        self.go()
        for i in range(3):
            self.deliverer.fire(i, Status.TRANSIENT, None, "4.4.1 connection refused")
            self.clock.advance(1000)
        # The attempt at t=3000 is not made: the message has expired, and
        # the 4th delivery is its DSN, from the null sender to the sender.
        self.assertEqual(
            [c[:2] for c in self.deliverer.calls[3:]], [("", ["alice@example.org"])]
        )
        [dsn] = self.queue.list()
        self.assertNotEqual(dsn.id, m.id)
        with self.queue.open_body(dsn.id) as f:
            block = email.message_from_bytes(f.read()).get_payload()[1].get_payload()[1]
        self.assertEqual(block["Status"], "4.4.7")
        self.assertEqual(block["Action"], "failed")
        self.assertIn("4.4.1 connection refused", block["Diagnostic-Code"])

    def test_concurrency_limits(self) -> None:
        self.start(concurrency=3, concurrency_per_domain=2)
        for i in range(3):
            self.queue.enqueue("a@example.org", [f"r{i}@example.com"], MESSAGE)
        for i in range(2):
            self.queue.enqueue("a@example.org", [f"r{i}@example.net"], MESSAGE)
        self.go()

        def in_flight_per_domain() -> Counter[str]:
            return Counter(domain for _, domain in self.service.in_flight)

        self.assertEqual(len(self.deliverer.calls), 3)
        self.assertLessEqual(max(in_flight_per_domain().values()), 2)
        self.deliverer.fire(0, Status.DELIVERED)
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.calls), 4)
        self.assertEqual(len(self.service.in_flight), 3)
        self.assertLessEqual(max(in_flight_per_domain().values()), 2)
        self.clock.advance(60)
        self.assertEqual(len(self.deliverer.calls), 4)

    def test_deliverer_error_is_transient(self) -> None:
        self.start()
        m = self.queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        self.go()
        self.deliverer.calls[0][3].errback(RuntimeError("boom"))
        r = self.queue.get(m.id).recipients[0]
        self.assertEqual((r.state, r.attempts), (RecipientStatus.PENDING, 1))
        self.flushLoggedErrors(RuntimeError)

    def test_stop_closes_deliverer(self) -> None:
        """
        stopService closes a deliverer that has C{close} (its parked SMTP
        sessions) and returns that L{Deferred}, so twistd waits for the QUITs.
        """
        closing: Deferred[None] = Deferred()
        calls = []
        self.deliverer.close = lambda: calls.append(1) or closing  # type: ignore[attr-defined]
        self.start()
        self.go()
        d = self.service.stopService()
        self.assertEqual(calls, [1])
        self.assertNoResult(d)
        closing.callback(None)
        self.assertIsNone(self.successResultOf(d))

    def test_stop_without_close(self) -> None:
        """A deliverer without C{close}: stopService is synchronous, as before."""
        self.start()
        self.go()
        self.assertIsNone(self.service.stopService())

    def test_restart_retries_in_flight(self) -> None:
        """A crash with a delivery in flight: the next start delivers it again."""
        self.start()
        m = self.queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        self.go()
        self.service.stopService()
        service2 = RelayService(
            Queue(self.dir, clock=self.clock), self.deliverer, settings(), self.clock
        )
        service2.startService()
        self.addCleanup(service2.stopService)
        self.assertEqual(len(self.deliverer.calls), 2)
        self.deliverer.fire(1, Status.DELIVERED)
        self.assertRaises(KeyError, service2.queue.get, m.id)


class SMTPUTF8FlagTests(_ServiceTestCase):
    """Issue 18: the intake's SMTPUTF8 flag is kept in the envelope and given to the deliverer."""

    def test_flag_survives_restart_and_reaches_the_deliverer(self) -> None:
        self.start()
        writer = self.queue.begin("jörg@example.org", ["bob@bücher.test"])
        writer.smtputf8 = True
        writer.write(MESSAGE)
        flagged = writer.commit()
        plain = self.queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        fresh = Queue(self.dir)  # as after a restart
        self.assertTrue(fresh.get(flagged.id).smtputf8)
        self.assertFalse(fresh.get(plain.id).smtputf8)
        self.service.startService()
        by_recipient = {c[1][0]: flag for c, flag in zip(self.deliverer.calls, self.deliverer.smtputf8)}
        self.assertEqual(by_recipient, {"bob@bücher.test": True, "b@example.com": False})

    def test_envelopes_without_the_flag(self) -> None:
        """Envelopes written before the flag existed read as without it; a non-boolean is corrupt."""
        from mtasts_twisted.relay.envelope import decode_envelope, encode_envelope

        self.start()
        message = self.queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        data = json.loads(encode_envelope(message))
        self.assertIs(data.pop("smtputf8"), False)
        self.assertFalse(decode_envelope(json.dumps(data).encode()).smtputf8)
        data["smtputf8"] = "yes"
        self.assertRaises(TypeError, decode_envelope, json.dumps(data).encode())


class ScheduleTests(_ServiceTestCase):
    """
    The due-time schedule: a wake-up costs O(started deliveries), not
    O(backlog), and keeps the limits, order, expiry and the poll.
    """

    def count_considered(self) -> list[str]:
        seen: list[str] = []
        real = self.service._consider

        def consider(message: Any, now: float, due: float) -> None:
            seen.append(message.id)
            real(message, now, due)

        self.service._consider = consider  # type: ignore[method-assign]
        return seen

    def test_wake_does_not_scan_backlog(self) -> None:
        """
        With 300 messages waiting for one domain's slot, a finished delivery
        looks at one waiting message, and never lists the queue directory.
        """
        self.start(concurrency_per_domain=1)
        ids = [
            self.queue.enqueue("a@example.org", [f"r{i}@example.com"], MESSAGE).id
            for i in range(300)
        ]
        self.service.startService()
        self.assertEqual(len(self.deliverer.calls), 1)
        seen = self.count_considered()
        listings: list[bool] = []
        real_list = self.queue.list
        self.queue.list = lambda fresh=True: listings.append(fresh) or real_list(fresh)  # type: ignore[method-assign]
        for i in range(5):
            self.deliverer.fire(i, Status.DELIVERED)
            self.clock.advance(0)
        self.assertEqual(listings, [])
        self.assertEqual(seen, sorted(ids)[1:6])  # queue (id) order, one per slot
        self.assertEqual(len(self.deliverer.calls), 6)
        self.assertEqual(self.service.stats["queue_messages"], 295)

    def test_new_mail_looks_at_new_mail_only(self) -> None:
        self.start(concurrency_per_domain=1)
        for i in range(50):
            self.queue.enqueue("a@example.org", [f"r{i}@example.com"], MESSAGE)
        self.service.startService()
        seen = self.count_considered()
        m = self.queue.enqueue("a@example.org", ["x@example.net"], MESSAGE)
        self.clock.advance(0)
        self.assertEqual(seen, [m.id])
        self.assertEqual(self.deliverer.calls[-1][1], ["x@example.net"])

    def test_retry_time_respected_without_poll(self) -> None:
        """A transient failure is retried at its time, not before, by the schedule."""
        self.start(retry_base=30, poll_interval=1000)
        self.queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        self.service.startService()
        self.deliverer.fire(0, Status.TRANSIENT, 421, "4.7.0 later")
        seen = self.count_considered()
        self.clock.advance(29)
        self.service.wake()
        self.clock.advance(0)
        self.assertEqual((seen, len(self.deliverer.calls)), ([], 1))
        self.clock.advance(1)
        self.service.wake()
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.calls), 2)

    def test_waiting_message_expires(self) -> None:
        """A message waiting for a domain slot still expires on time."""
        self.start(concurrency_per_domain=1, expiry=100)
        first = self.queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        second = self.queue.enqueue("a@example.org", ["c@example.com"], MESSAGE)
        self.service.startService()
        self.assertEqual(len(self.deliverer.calls), 1)
        # Ids of one instant order by their random part: either may go first.
        waiting = second if self.deliverer.calls[0][1] == ["b@example.com"] else first
        self.clock.advance(100)
        # the other one expired while waiting: its DSN went out instead
        self.assertNotIn(waiting.id, [m.id for m in self.queue.list()])
        self.assertEqual(
            [c[:2] for c in self.deliverer.calls[1:]], [("", ["a@example.org"])]
        )

    def test_other_process_retry_and_delete(self) -> None:
        """
        The periodic poll sees C{mtasts-twisted queue retry} and C{delete}
        made through another L{Queue} object (another process).
        """
        from mtasts_twisted.cli.queue import queue_delete, queue_retry

        self.start(retry_base=3600, poll_interval=5, concurrency_per_domain=1)
        m = self.queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        self.clock.advance(1)
        gone = self.queue.enqueue("a@example.org", ["c@example.com"], MESSAGE)
        self.service.startService()
        self.deliverer.fire(0, Status.TRANSIENT, 421, "4.7.0 later")
        self.clock.advance(0)
        self.assertEqual(self.deliverer.calls[1][1], ["c@example.com"])
        other = Queue(self.dir, clock=self.clock)
        queue_retry(other, m.id)
        self.clock.advance(5)
        self.assertEqual(len(self.deliverer.calls), 2)  # domain slot taken
        queue_delete(other, gone.id)
        self.deliverer.fire(1, Status.DELIVERED)  # its outcome finds it gone
        self.clock.advance(0)
        self.assertEqual(self.deliverer.calls[2][1], ["b@example.com"])
        self.clock.advance(5)
        self.assertEqual(self.service.stats["queue_messages"], 1)
        self.assertEqual(len(self.deliverer.calls), 3)

    def test_dsn_failure_at_expiry_not_busy(self) -> None:
        """An expired message whose DSN cannot be queued is tried again later, not at once."""
        self.start(expiry=100, retry_base=50, max_queue_messages=1)
        m = self.queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        self.service.startService()
        self.deliverer.fire(0, Status.TRANSIENT, 421, "4.7.0 later")
        seen = self.count_considered()
        self.clock.advance(100)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(seen, [m.id])  # the DSN found the queue full
        self.assertEqual(self.queue.get(m.id).pending[0].next_attempt, self.clock.seconds() + 50)
        self.flushLoggedErrors()


#: One pipelined envelope (RFC 2920): MAIL, RCPT and DATA in one write.
ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"


class _RecordingClient(Protocol):
    """Keeps everything the intake sends."""

    data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def final_codes(data: bytes) -> list[bytes]:
    """The codes of the final reply lines in C{data}, in order."""
    return [line[:3] for line in data.split(b"\r\n") if line[3:4] == b" "]


class PipelinedCommitTests(TestCase):
    """
    The intake with the commit's fsyncs in a thread pool: replies keep
    their order for a pipelining client (RFC 2920) and 250 comes only once
    the commit is done.
    """

    def setUp(self) -> None:
        from tests.test_queue import _Threads

        self.dir = tempfile.mkdtemp(prefix="mtasts-relay-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.threads = _Threads()
        s = settings()
        self.queue = Queue(self.dir, threads=self.threads)
        self.queue.recover()
        factory = RelaySMTPFactory(self.queue, s, reactor)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.factory = factory

    async def wait_for(self, predicate: Any) -> None:
        for _ in range(500):
            if predicate():
                return
            await deferLater(reactor, 0.01)
        self.fail("timed out")

    async def at_first_data(self) -> _RecordingClient:
        """A client that said EHLO and one pipelined envelope, and got its 354."""
        client = _RecordingClient()
        reactor.connectTCP("127.0.0.1", self.port.getHost().port, ClientFactory.forProtocol(lambda: client))
        await self.wait_for(lambda: b"220 " in client.data)
        client.transport.write(b"EHLO client.test\r\n" + ENVELOPE)
        await self.wait_for(lambda: b"354 " in client.data)
        return client

    async def finish(self, client: _RecordingClient, data: bytes) -> list[bytes]:
        """Send the rest of the last message and QUIT, let its commit run; the final reply codes."""
        client.transport.write(data)
        await self.wait_for(lambda: self.threads.pool.work)
        self.threads.pool.run()
        await self.wait_for(lambda: b"221 " in client.data)
        return final_codes(client.data)

    async def test_replies_in_order(self) -> None:
        client = await self.at_first_data()
        client.transport.write(b"Subject: one\r\n\r\nHi.\r\n.\r\n" + ENVELOPE)
        await self.wait_for(lambda: self.threads.pool.work)
        await deferLater(reactor, 0.1)
        # The dot is being committed: no reply after the 354 yet.
        self.assertTrue(client.data.split(b"\r\n")[-2].startswith(b"354 "), client.data)
        self.assertEqual(self.queue.list(), [])
        self.threads.pool.run()
        await self.wait_for(lambda: client.data.count(b"354 ") == 2)
        codes = await self.finish(client, b"Subject: two\r\n\r\nHi.\r\n.\r\nQUIT\r\n")
        self.assertEqual(
            codes,
            [b"220", b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250", b"221"],
        )
        self.assertEqual(len(self.queue.list()), 2)
        await self.factory.wait_closed()

    async def test_reading_goes_on_until_too_much_is_held(self) -> None:
        """
        While a dot is committed the connection keeps reading (no epoll
        change per message); past HELD_INPUT_MAX of held input it stops,
        and after the commit everything held is processed in order.
        """
        from mtasts_twisted.relay.session import HELD_INPUT_MAX

        client = await self.at_first_data()
        client.transport.write(b"Subject: one\r\n\r\nHi.\r\n.\r\n" + ENVELOPE)
        await self.wait_for(lambda: self.threads.pool.work)
        [session] = list(self.factory.protocols)
        await self.wait_for(lambda: session._held is not None and len(session._held) == 3)
        self.assertIn(session.transport, reactor.getReaders())  # still reading
        self.assertFalse(session._held_paused)
        line = b"x" * 70 + b"\r\n"
        filler = line * (HELD_INPUT_MAX // len(line) + 10)
        client.transport.write(filler)
        await self.wait_for(lambda: session._held_paused)
        self.assertNotIn(session.transport, reactor.getReaders())
        self.assertTrue(client.data.split(b"\r\n")[-2].startswith(b"354 "), client.data[-200:])
        self.threads.pool.run()
        await self.wait_for(lambda: client.data.count(b"354 ") == 2)
        self.assertIn(session.transport, reactor.getReaders())  # reading again
        codes = await self.finish(client, b".\r\nQUIT\r\n")
        self.assertEqual(
            codes,
            [b"220", b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250", b"221"],
        )
        sizes = sorted(m.size for m in self.queue.list())
        self.assertEqual(len(sizes), 2)
        self.assertGreaterEqual(sizes[1], len(filler))  # every held line reached the message
        await self.factory.wait_closed()

    async def test_held_input_with_a_whole_message(self) -> None:
        """
        A whole second message (and a third's commands) arrives while the
        first commits: its dot is held again with the rest behind it, and
        every reply comes in order.
        """
        client = await self.at_first_data()
        client.transport.write(
            b"Subject: one\r\n\r\n1\r\n.\r\n" + ENVELOPE + b"Subject: two\r\n\r\n2\r\n.\r\n" + ENVELOPE
        )
        [session] = list(self.factory.protocols)
        await self.wait_for(lambda: self.threads.pool.work and session._held is not None and len(session._held) == 10)
        self.threads.pool.run()  # the first dot: the second message is read from what was held
        await self.wait_for(lambda: self.threads.pool.work)
        self.assertEqual(len(session._held), 3)  # the third's commands, held behind the second dot
        self.threads.pool.run()
        await self.wait_for(lambda: client.data.count(b"354 ") == 3)
        codes = await self.finish(client, b"Subject: three\r\n\r\n3\r\n.\r\nQUIT\r\n")
        self.assertEqual(codes, [b"220", b"250"] + [b"250", b"250", b"354", b"250"] * 3 + [b"221"])
        bodies = sorted(m.size for m in self.queue.list())
        self.assertEqual(len(bodies), 3)
        await self.factory.wait_closed()

