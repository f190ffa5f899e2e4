"""
The relay intake's limits (L{RelaySettings}) over real loopback TCP with a
raw client: over-long lines, a declared C{SIZE=} over the limit,
connections per client (all of loopback is one) and in total, the idle timeout and the session time
limit (on a L{Clock}).  Too many recipients is covered by
C{test_relay.IntakeTests.test_too_many_recipients}.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from mtasts_twisted.relay import Queue
from tests.clients import RawClient
from mtasts_twisted.relay import RelaySettings, RelaySMTPFactory


class LimitTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mtasts-limits-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clients: list[RawClient] = []

    def listen(self, clock: Any = None, **kw: Any) -> Queue:
        kw.setdefault("reporting_mta", "relay.test")
        settings = RelaySettings(**kw)
        queue = settings.make_queue(self.dir)
        queue.recover()
        self.factory = RelaySMTPFactory(queue, settings, clock if clock is not None else reactor)
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = port.getHost().port
        self.addCleanup(self._close, port)
        return queue

    async def _close(self, port: Any) -> None:
        for client in self.clients:
            if client.transport is not None and not client.closed.called:
                client.transport.abortConnection()
            await client.closed
        await port.stopListening()
        await self.factory.wait_closed()

    async def connect(self, greeting: bytes = rb"^220 ", source: str | None = None) -> RawClient:
        client = RawClient()
        self.clients.append(client)
        factory = ClientFactory.forProtocol(lambda: client)
        connected: Deferred[None] = Deferred()
        client.connectionMade = lambda: connected.callback(None)  # type: ignore[method-assign]
        bind = (source, 0) if source is not None else None
        reactor.connectTCP("127.0.0.1", self.port, factory, timeout=5, bindAddress=bind)
        await connected.addTimeout(5, reactor)
        await client.expect(greeting)
        return client

    async def ehlo(self, client: RawClient) -> None:
        client.send(b"EHLO client.test\r\n")
        await client.expect(rb"^250 ")

    async def test_long_command_line(self) -> None:
        """A command line over C{max_line_length}: C{500 5.5.2} and close."""
        self.listen(max_line_length=100)
        client = await self.connect()
        await self.ehlo(client)
        client.send(b"MAIL FROM:<" + b"a" * 200 + b"@example.org>\r\n")
        await client.expect(rb"^500 5\.5\.2 Line too long")
        await client.closed.addTimeout(5, reactor)
        self.assertNotIn(b"\r\n250 2.1.0", client.data)

    async def test_long_data_line(self) -> None:
        """
        A line over the limit inside DATA: C{500 5.5.2}, the connection is
        closed, and nothing is queued (no partial message left behind).
        """
        queue = self.listen(max_line_length=100)
        client = await self.connect()
        await self.ehlo(client)
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        await client.expect(rb"^354 ")
        client.send(b"Subject: x\r\n\r\n" + b"y" * 300 + b"\r\n.\r\n")
        await client.expect(rb"^500 5\.5\.2 Line too long")
        await client.closed.addTimeout(5, reactor)
        self.assertNotIn(b"queued as", client.data)
        await deferLater(reactor, 0.05)
        self.assertEqual(queue.list(), [])
        self.assertEqual([n for n in os.listdir(self.dir) if n != "quarantine"], [])

    async def test_declared_size_too_big(self) -> None:
        """C{MAIL FROM:<..> SIZE=N} over the limit: C{552 5.3.4} at once; within it: 250."""
        queue = self.listen(max_message_size=1000)
        client = await self.connect()
        client.send(b"EHLO client.test\r\n")
        await client.expect(rb"^250[ -]SIZE 1000\r$")
        await client.expect(rb"^250 ")
        client.send(b"MAIL FROM:<a@example.org> SIZE=5000\r\n")
        await client.expect(rb"^552 5\.3\.4 ")
        client.send(b"MAIL FROM:<a@example.org> SIZE=500\r\n")
        await client.expect(rb"^250 ")
        client.send(b"RCPT TO:<b@example.com>\r\nDATA\r\n")
        await client.expect(rb"^354 ")
        client.send(b"Subject: small\r\n\r\nok\r\n.\r\n")
        await client.expect(rb"^250 2\.0\.0 Ok: queued as ")
        self.assertEqual(len(queue.list()), 1)

    async def test_connections_per_ip(self) -> None:
        """Beyond C{max_connections_per_ip}: C{421 4.7.0} and close; a freed slot is reused."""
        self.listen(max_connections_per_ip=2, max_connections=10)
        first = await self.connect()
        await self.connect()
        third = await self.connect(rb"^421 4\.7\.0 Too many connections from 127\.0\.0\.1")
        await third.closed.addTimeout(5, reactor)
        self.assertEqual(self.factory.per_ip["loopback"], 2)
        first.send(b"QUIT\r\n")
        await first.closed.addTimeout(5, reactor)
        fourth = await self.connect()
        self.assertTrue(fourth.data.startswith(b"220 "), fourth.data)

    async def test_loopback_is_one_client(self) -> None:
        """
        Issue 17.9: every address of 127.0.0.0/8 is the same local client,
        so binding ten of them does not multiply C{max_connections_per_ip}:
        connections beyond it get C{421 4.7.0} whatever their source.
        """
        self.listen(max_connections_per_ip=3, max_connections=50)
        sources = [f"127.0.0.{n}" for n in range(2, 12)]
        accepted = [await self.connect(source=source) for source in sources[:3]]
        for source in sources[3:]:
            refused = await self.connect(rb"^421 4\.7\.0 Too many connections from 127\.0\.0\.", source=source)
            await refused.closed.addTimeout(5, reactor)
        self.assertEqual(self.factory.connections, 3)
        self.assertEqual(dict(self.factory.per_ip), {"loopback": 3})
        self.assertEqual(sum(b"\r\n421 " in b"\r\n" + c.data for c in self.clients), 7)
        accepted[0].send(b"QUIT\r\n")
        await accepted[0].closed.addTimeout(5, reactor)
        again = await self.connect(source="127.0.0.99")
        self.assertTrue(again.data.startswith(b"220 "), again.data)

    async def test_connections_total(self) -> None:
        """Beyond C{max_connections} in total: C{421 4.7.0} and close."""
        self.listen(max_connections=2, max_connections_per_ip=10)
        await self.connect()
        await self.connect()
        third = await self.connect(rb"^421 4\.7\.0 Too many connections, try again later")
        await third.closed.addTimeout(5, reactor)
        self.assertEqual(self.factory.connections, 2)

    async def test_idle_timeout(self) -> None:
        """Silence for C{idle_timeout}: C{421} and close; activity resets the timer."""
        clock = Clock()
        self.listen(clock=clock, idle_timeout=300)
        client = await self.connect()
        clock.advance(299)
        client.send(b"NOOP\r\n")
        await client.expect(rb"^250 ")
        clock.advance(299)  # 598 s since connecting, 299 since the NOOP
        await deferLater(reactor, 0.05)
        self.assertFalse(client.closed.called)
        clock.advance(1)
        await client.expect(rb"^421 4\.4\.2 Idle timeout")
        await client.closed.addTimeout(5, reactor)
        self.assertEqual(self.factory.connections, 0)

    async def test_session_time_limit(self) -> None:
        """A busy session still ends at C{max_session_time}: C{421} and close."""
        clock = Clock()
        self.listen(clock=clock, idle_timeout=300, max_session_time=60)
        client = await self.connect()
        for i in range(5):
            clock.advance(11)
            client.send(b"NOOP\r\n")
            await client.expect(rb"^250 .*\r\n" * (i + 1))
        self.assertFalse(client.closed.called)  # 55 s
        clock.advance(5)
        await client.expect(rb"^421 4\.4\.2 Session time limit exceeded")
        await client.closed.addTimeout(5, reactor)
        self.assertEqual(self.factory.connections, 0)

    async def test_noop_and_vrfy(self) -> None:
        """
        NOOP and VRFY, which RFC 5321 §4.5.1 requires of every server
        (twisted.mail's server answered them with 500), and they count
        as activity for the idle timer.
        """
        self.listen()
        client = await self.connect()
        client.send(b"NOOP\r\n")
        await client.expect(rb"^250 2\.0\.0 Ok\r$")
        client.send(b"VRFY bob\r\n")
        await client.expect(rb"^252 2\.5\.0 ")
        self.assertNotIn(b"\r\n500 ", client.data)
