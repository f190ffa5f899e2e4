"""
The metrics endpoint of C{twistd mtasts} (C{--metrics}) under abuse: real
sockets on loopback against the service's own listener, and unit tests of
the protocol with a fake transport and clock.

Every assertion is a bound on bytes or counts (a body never spooled, a
connection closed, buffered output bounded), never a timing.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.tcp import Server
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtasts_twisted import service
from mtasts_twisted.metrics import MetricsFactory, MetricsLimits, ServiceStats, make_registry
from mtasts_twisted.testing.dns import DNSTestServer

from .clients import RawClient
from .test_faults import probe

EPHEMERAL = "tcp:0:interface=127.0.0.1"
GET = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def settle(condition: Any, rounds: int = 2000) -> None:
    """Let the reactor run until C{condition()} is true (no assertion on time is made)."""
    for _ in range(rounds):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)


async def steady(figure: Any, rounds: int = 2000) -> None:
    """Let the reactor run until C{figure()} has not changed for 20 rounds."""
    last, same = object(), 0
    for _ in range(rounds):
        await task.deferLater(reactor, 0.01, lambda: None)
        value = figure()
        same = same + 1 if value == last else 0
        last = value
        if same >= 20:
            return


def server_transports(port: int) -> list[Server]:
    """The server side of every connection to our listening C{port}."""
    found = []
    for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):
        if isinstance(selectable, Server) and selectable.getHost().port == port:
            found.append(selectable)
    return found


def buffered(transport: Server) -> int:
    """Bytes the server has written that the kernel has not taken yet."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class MetricsEndpointTests(TestCase):
    """The service's C{--metrics} listener, over real loopback sockets."""

    timeout = 60

    def setUp(self) -> None:
        self.dns = DNSTestServer()
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)

    async def start(self) -> int:
        options = service.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--nameserver", self.dns.nameserver,
                              "--socketmap", "none", "--smtp", "none", "--metrics", EPHEMERAL, "--no-reports"])
        svc = service.makeService(options, reactor, fatal=lambda code: None)
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        self.assertTrue(await svc.ready)
        return svc.listeners["metrics"].port.getHost().port

    async def connect(self, port: int) -> RawClient:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: None if client.closed.called else (client.transport.abortConnection(),
                                                                    client.closed)[1])
        return client

    async def test_get_and_keep_alive(self) -> None:
        """GET serves the metrics; the connection stays open for the next request."""
        port = await self.start()
        client = await self.connect(port)
        client.send(GET)
        await client.expect(rb"mtasts_reports_total")
        client.send(GET.replace(b"GET", b"HEAD"))
        await client.expect(rb"(?s)HTTP/1\.1 200.*HTTP/1\.1 200 OK\r\n.*\r\n\r\n$")
        self.assertEqual(client.data.count(b"HTTP/1.1 200 OK"), 2)
        self.assertIn(b"Content-Type: text/plain; version=", client.data)
        self.assertFalse(client.closed.called)

    async def test_no_log_line_per_scrape(self) -> None:
        """A scrape logs nothing (no access log by default)."""
        port = await self.start()
        client = await self.connect(port)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(3):
            client.send(GET)
        await settle(lambda: client.data.count(b"HTTP/1.1 200") == 3)
        self.assertEqual(client.data.count(b"HTTP/1.1 200"), 3)
        self.assertEqual([formatEvent(e) for e in events if e.get("log_namespace", "").startswith(
            ("mtasts_twisted.metrics", "twisted"))], [])

    async def test_post_never_spooled(self) -> None:
        """
        A POST announcing a 5 GB body is answered 405 and closed without
        reading the body: no temporary file, the connection ends while the
        client still has the body to send.
        """
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        self.patch(tempfile, "tempdir", tmp)
        spooled: list[object] = []
        real_temporary_file = tempfile.TemporaryFile

        def temporary_file(*args: Any, **kwargs: Any) -> Any:
            spooled.append(args)
            return real_temporary_file(*args, **kwargs)

        self.patch(tempfile, "TemporaryFile", temporary_file)
        port = await self.start()
        client = await self.connect(port)
        client.send(b"POST /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000000000\r\n\r\n")
        client.send(b"x" * 65536)
        await settle(lambda: client.closed.called)
        self.assertTrue(client.closed.called, client.data)
        self.assertEqual(spooled, [])
        self.assertEqual(os.listdir(tmp), [])
        if client.data:  # the reply, unless the unread body made the close a reset
            self.assertTrue(client.data.startswith(b"HTTP/1.1 405 "), client.data)
            self.assertIn(b"Allow: GET, HEAD\r\n", client.data)

    async def test_methods_and_bodies_refused(self) -> None:
        """Only GET and HEAD are served; a request with a body is refused; both close."""
        port = await self.start()
        for request, status in [
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5000000000\r\n\r\n", b"405"),
            (b"PUT / HTTP/1.1\r\nHost: h\r\n\r\n", b"405"),
            (b"DELETE / HTTP/1.1\r\nHost: h\r\n\r\n", b"405"),
            (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n", b"413"),
            (b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", b"413"),
        ]:
            client = await self.connect(port)
            client.send(request)
            await settle(lambda: client.closed.called)
            self.assertTrue(client.closed.called, request)
            self.assertTrue(client.data.startswith(b"HTTP/1.1 " + status + b" "), (request, client.data))
            self.assertIn(b"Connection: close\r\n", client.data)

    async def test_connection_cap(self) -> None:
        """Connections beyond the cap are closed on accept; the others are served."""
        port = await self.start()
        cap = MetricsLimits().max_connections
        clients = [await self.connect(port) for _ in range(cap + 3)]
        await settle(lambda: sum(c.closed.called for c in clients) >= 3)
        self.assertEqual(sum(c.closed.called for c in clients), 3)
        self.assertEqual(len(server_transports(port)), cap)
        open_ = [c for c in clients if not c.closed.called]
        open_[0].send(GET)
        await open_[0].expect(rb"mtasts_reports_total")

    async def test_pipelined_never_read(self) -> None:
        """
        A client that pipelines many requests and never reads: the server
        stops reading while its responses are unsent, so what it buffers
        stays within one socket buffer and one response; once the client
        reads, every request is answered.
        """
        port = await self.start()
        client = await self.connect(port)
        await settle(lambda: len(server_transports(port)) == 1)
        (server,) = server_transports(port)
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transport.pauseProducing()  # never read
        requests = 2000
        client.send(GET * requests)
        await steady(lambda: (buffered(server), client.transport._tempDataLen + len(client.transport.dataBuffer)))
        response = len(make_registry_text()) + 200
        probe("metrics_never_reading_buffered_bytes", buffered(server))
        self.assertLessEqual(buffered(server), server.bufferSize + response)
        self.assertLess(client.data.count(b"HTTP/1.1 200 OK"), requests)
        client.transport.resumeProducing()
        await settle(lambda: client.data.count(b"HTTP/1.1 200 OK") == requests)
        self.assertEqual(client.data.count(b"HTTP/1.1 200 OK"), requests)


def make_registry_text() -> bytes:
    from prometheus_client.exposition import generate_latest

    return generate_latest(make_registry(ServiceStats()))


class MetricsProtocolTests(SynchronousTestCase):
    """The endpoint's protocol on a fake transport and clock."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.factory = MetricsFactory(make_registry(ServiceStats()), self.clock)
        self.factory.doStart()
        self.addCleanup(self.factory.doStop)

    def connect(self) -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_idle_timeout(self) -> None:
        """
        A connection with no complete request for 30 s is closed; bytes of
        a request that never completes do not count as activity.
        """
        limits = MetricsLimits()
        proto, transport = self.connect()
        proto.dataReceived(GET)
        self.assertIn(b"200 OK", transport.value())
        self.clock.advance(limits.idle_timeout - 1)
        proto.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.connections, 1)
        proto.connectionLost(None)
        self.assertEqual(self.factory.connections, 0)

    def test_oversized_head(self) -> None:
        """A request head over the cap: 431 and close, nothing more read."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\n" + b"X-Filler: " + b"a" * MetricsLimits().max_head)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(transport.disconnecting)

    def test_bad_request_line(self) -> None:
        for line in (b"GET\r\n\r\n", b"GET / SPDY/3\r\n\r\n", b"\x16\x03\x01\x02\x00\r\n\r\n"):
            proto, transport = self.connect()
            proto.dataReceived(line)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), line)
            self.assertTrue(transport.disconnecting)

    def test_http_10_and_connection_close(self) -> None:
        """HTTP/1.0, or C{Connection: close}: one response, then close."""
        for request in (b"GET / HTTP/1.0\r\n\r\n", b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"):
            proto, transport = self.connect()
            proto.dataReceived(request + GET)
            self.assertEqual(transport.value().count(b" 200 OK"), 1, request)
            self.assertTrue(transport.disconnecting)

    def test_pipelined_paused_while_unsent(self) -> None:
        """
        While the transport says its buffer is full, no further pipelined
        request is answered; on resume, the rest are.
        """
        proto, transport = self.connect()
        self.assertIs(transport.producer, proto)
        proto.pauseProducing()
        proto.dataReceived(GET * 5)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")
        proto.resumeProducing()
        self.assertEqual(transport.value().count(b"200 OK"), 5)
        self.assertEqual(transport.producerState, "producing")

    def test_byte_by_byte_and_empty_lines(self) -> None:
        """A request in single bytes, after empty lines, is answered once complete."""
        proto, transport = self.connect()
        for byte in b"\r\n\r\n" + GET:
            self.assertEqual(transport.value(), b"")
            proto.dataReceived(bytes([byte]))
        self.assertEqual(transport.value().count(b"200 OK"), 1)
        self.assertFalse(transport.disconnecting)

    def test_input_held_while_paused_is_capped(self) -> None:
        """A transport that keeps delivering input while paused: aborted past max_input."""
        proto, transport = self.connect()
        proto.pauseProducing()
        proto.dataReceived(GET * (MetricsLimits().max_input // len(GET)))
        self.assertFalse(transport.disconnecting)
        proto.resumeProducing()
        proto.pauseProducing()
        proto.dataReceived(GET * (MetricsLimits().max_input // len(GET) + 1))
        self.assertTrue(transport.disconnecting)

    def test_head_has_no_body(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"HEAD / HTTP/1.1\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertEqual(body, b"")
        self.assertIn(b"Content-Length: ", head)
        self.assertNotIn(b"Content-Length: 0\r\n", head + b"\r\n")
