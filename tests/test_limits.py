"""
Caps and timeouts on everything a peer controls (issue 9), each tested at
its boundary on real loopback sockets where it matters:

  - socketmap: request size, huge length prefixes, connections at once,
    idle and slowloris clients (a partial request does not keep a
    connection alive);
  - DNS: CNAME chain length, the answer cache size, the lookup budget;
  - policy fetch: body size while streaming (faults cover the timeout);
  - SMTP client: reply line length, lines per reply, the session timeout;
  - policy cache: concurrent lookups of one domain cost one DNS query and
    one fetch.

The table of limits with their defaults is in tests/RELIABILITY.md
(written by tests/make_reliability_report.py from the code's own values).
"""

from __future__ import annotations

import socket
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mtasts_twisted.cache import PolicyCache, PolicyLookupTemporaryError
from mtasts_twisted.delivery import _ClientProtocol, Status
from mtasts_twisted.dns import MAX_CNAME_CHAIN, DNSResolver, DNSTemporaryError
from mtasts_twisted.fetch import FetchedPolicy
from mtasts_twisted.policy import parse_policy
from mtasts_twisted.socketmap import MAX_REPLY, NetstringDecoder, SocketmapFactory, SocketmapSettings, encode_netstring
from mtasts_twisted.store import MemoryStore
from mtasts_twisted.testing.memory import FakeFetcher, FakeResolver
from mtasts_twisted.testing.smtp import Behaviour, Reply, Stage
from tests.test_faults import Harness, RawSMTP, policy_text, probe, tally
from tests.clients import RawClient
from twisted.trial import unittest

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmax_age: 86400\n"


async def _wait(condition, seconds: float = 3.0) -> bool:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return True
        await deferLater(reactor, 0.01, lambda: None)
    return condition()


def buffered(transport: object) -> int:
    """
    Bytes a Twisted socket transport holds, not yet sent: its send buffer
    (C{FileDescriptor}'s private C{dataBuffer}, C{offset} and C{_tempDataLen},
    read here so the test measures what Twisted really keeps).
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen  # type: ignore[attr-defined]


class NeverReads(Protocol):
    """Writes C{data} at once and never reads (its transport stops reading on connect)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.transport.write(self.data)

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(None)


class SocketmapLimitTests(TestCase):
    timeout = 20

    def serve(self, **settings: object) -> SocketmapFactory:
        resolver = self.resolver = FakeResolver()
        fetcher = self.fetcher = FakeFetcher()
        resolver.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
        resolver.mx["example.com"] = [(10, "mx1.example.com")]
        fetcher.policies["example.com"] = ENFORCE
        cache = PolicyCache(MemoryStore(), resolver, fetcher, reactor)
        factory = SocketmapFactory(cache, resolver, reactor, SocketmapSettings(**settings))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        self.factory = factory

        async def all_closed() -> None:  # runs after every client's cleanup
            self.assertTrue(await _wait(lambda: factory.connections == 0))

        self.addCleanup(lambda: Deferred.fromCoroutine(all_closed()))
        return factory

    async def connect(self) -> RawClient:
        client = await connectProtocol(self.endpoint, RawClient())

        async def close() -> None:
            if client.transport.connected:
                client.transport.loseConnection()
            await client.closed

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return client

    def instrument(self, sndbuf: int = 4096) -> list[dict[str, int]]:
        """
        Watch every connection the server accepts: shrink its kernel send
        buffer to C{sndbuf} (so a client that does not read fills it at once)
        and record the peak of the bytes the server holds for it: what its
        transport has not sent yet, plus what the protocol holds (C{held_bytes}:
        requests read but not answered, the partial request).
        """
        records: list[dict[str, int]] = []
        build = self.factory.buildProtocol

        def watched(addr: object) -> object:
            proto = build(addr)
            if proto is None:
                return None
            record = {"peak": 0, "writes": 0}
            records.append(record)
            made = proto.connectionMade

            def connectionMade() -> None:
                transport = proto.transport
                transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
                write = transport.write
                pause = transport.pauseProducing

                def measure() -> None:
                    held = buffered(transport) + getattr(proto, "held_bytes", 0)
                    record["peak"] = max(record["peak"], held)

                def measured_write(data: bytes) -> None:
                    write(data)
                    record["writes"] += 1
                    measure()

                def measured_pause() -> None:  # the protocol stops reading, holding requests
                    pause()
                    measure()

                transport.write = measured_write
                transport.pauseProducing = measured_pause
                made()

            proto.connectionMade = connectionMade
            return proto

        self.factory.buildProtocol = watched
        return records

    async def never_reading_client(self, data: bytes) -> NeverReads:
        """Connect a client with a small receive buffer that writes C{data} and never reads."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.connect(("127.0.0.1", self.port))
        sock.setblocking(False)
        client = NeverReads(data)
        transport = reactor.adoptStreamConnection(sock.fileno(), socket.AF_INET, Factory.forProtocol(lambda: client))
        sock.close()  # the reactor holds its own descriptor
        del transport

        def close() -> Deferred[None]:
            if client.transport.connected:
                client.transport.abortConnection()
            return client.closed

        self.addCleanup(close)
        return client

    async def test_never_reading_client_is_bounded_and_closed(self) -> None:
        """
        A client pipelining 100000 requests (2.3 MB) without ever reading:
        the server stops reading from it once its unsent answers pass the
        transport's bound, so it holds at most a few hundred KiB for it (not
        megabytes), answers only what it could send, and closes it at the
        idle timeout even though answers are still unsent.
        """
        requests = 100_000
        self.serve(idle_timeout=1.0)
        records = self.instrument()
        await self.never_reading_client(encode_netstring(b"postfix example.com") * requests)
        # Not a timing assertion: the bound only keeps a broken server from hanging the test.
        closed = await _wait(lambda: self.factory.counts["idle"] == 1 and self.factory.connections == 0, 15.0)
        [record] = records
        tally("limit_case")
        probe("socketmap_never_reading_buffered_bytes", record["peak"])
        self.assertLessEqual(record["peak"], 256 * 1024, record)
        self.assertLess(self.factory.counts["ok"], requests // 4)
        self.assertTrue(closed, (self.factory.counts, self.factory.connections))

    async def connect_from(self, host: str) -> RawClient:
        """Connect from the loopback address C{host} (any 127.0.0.0/8 address can be a source)."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=(host, 0))
        client = await connectProtocol(endpoint, RawClient())

        async def close() -> None:
            if client.transport.connected:
                client.transport.loseConnection()
            await client.closed

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return client

    async def test_held_connections_do_not_shut_out_postfix(self) -> None:
        """
        Issue 17 item 9: connections held open without requests, from
        several addresses, up to max_connections, no longer shut out a new
        client: Postfix's connection is accepted and answered, and the
        oldest held connection is closed to make room.
        """
        self.serve(max_connections=8, max_connections_per_client=4, idle_timeout=None)
        held = [await self.connect_from(f"127.0.0.{2 + i // 4}") for i in range(8)]
        self.assertTrue(await _wait(lambda: self.factory.connections == 8))
        postfix = await self.connect_from("127.0.0.1")
        postfix.transport.write(encode_netstring(b"postfix example.com"))
        self.assertTrue(await _wait(lambda: b"OK secure" in postfix.data))
        await held[0].closed
        self.assertEqual(sum(client.closed.called for client in held), 1)
        self.assertEqual((self.factory.counts["evicted"], self.factory.counts["refused"]), (1, 0))
        self.assertTrue(await _wait(lambda: self.factory.connections == 8))
        tally("limit_case")

    async def test_per_client_cap(self) -> None:
        """
        max_connections_per_client: one address opening more loses its own
        oldest connections; a client on another address keeps its own.
        """
        self.serve(max_connections_per_client=3, idle_timeout=None)
        postfix = await self.connect_from("127.0.0.1")
        postfix.transport.write(encode_netstring(b"postfix example.com"))
        self.assertTrue(await _wait(lambda: b"OK secure" in postfix.data))
        hog = [await self.connect_from("127.0.0.2") for _ in range(5)]
        await gatherResults([hog[0].closed, hog[1].closed])
        self.assertTrue(await _wait(lambda: self.factory.connections == 4))
        self.assertEqual([client.closed.called for client in hog], [True, True, False, False, False])
        self.assertEqual(self.factory.counts["evicted"], 2)
        postfix.transport.write(encode_netstring(b"postfix example.com"))
        self.assertTrue(await _wait(lambda: postfix.data.count(b"OK secure") == 2))
        tally("limit_case")

    async def test_request_size_boundary(self) -> None:
        """max_request (10000): a 10000-byte request is answered, 10001 closes the connection."""
        self.serve()
        client = await self.connect()
        client.transport.write(encode_netstring(b"postfix " + b"a" * 9992))
        self.assertTrue(await _wait(lambda: client.data))
        self.assertTrue(client.data.startswith(b"PERM ", client.data.index(b":") + 1))
        client.transport.write(encode_netstring(b"postfix " + b"a" * 9993))
        await client.closed
        self.assertEqual(self.factory.counts["broken"], 1)
        tally("limit_case")

    async def test_huge_length_prefix_closes_at_once(self) -> None:
        """A length prefix over the cap closes the connection before any payload is buffered."""
        self.serve()
        client = await self.connect()
        client.transport.write(b"99999999999999999999")
        await client.closed
        self.assertEqual(client.data, b"")
        tally("limit_case")

    async def test_max_connections(self) -> None:
        """
        max_connections: over the cap the oldest idle connection is closed
        to make room; when every connection waits for a lookup, the new one
        is closed on accept; once answered, they make room again.
        """
        self.serve(max_connections=3, idle_timeout=None)
        served = []
        build = self.factory.buildProtocol
        self.factory.buildProtocol = lambda addr: served.append(build(addr)) or served[-1]
        clients = [await self.connect() for _ in range(3)]
        self.assertTrue(await _wait(lambda: self.factory.connections == 3))
        extra = await self.connect()
        await clients[0].closed
        self.assertEqual((self.factory.counts["evicted"], self.factory.counts["refused"]), (1, 0))
        self.assertTrue(await _wait(lambda: self.factory.connections == 3))
        slow: Deferred[FetchedPolicy] = Deferred()
        self.resolver.txt["_mta-sts.slow.example"] = ["v=STSv1; id=1"]
        self.fetcher.policies["slow.example"] = slow
        waiting = clients[1:] + [extra]
        for client in waiting:
            client.transport.write(encode_netstring(b"postfix slow.example"))
        self.assertTrue(await _wait(lambda: sum(p.busy for p in served[1:]) == 3))
        refused = await self.connect()
        await refused.closed
        self.assertEqual((self.factory.counts["evicted"], self.factory.counts["refused"]), (1, 1))
        slow.callback(FetchedPolicy(policy=parse_policy(ENFORCE), text=ENFORCE))
        self.assertTrue(await _wait(lambda: all(b"OK secure" in c.data for c in waiting)))
        again = await self.connect()
        again.transport.write(encode_netstring(b"postfix example.com"))
        self.assertTrue(await _wait(lambda: b"OK secure" in again.data))
        await waiting[0].closed
        self.assertEqual((self.factory.counts["evicted"], self.factory.counts["refused"]), (2, 1))
        tally("limit_case")

    async def test_idle_client_closed(self) -> None:
        self.serve(idle_timeout=0.3)
        client = await self.connect()
        started = time.monotonic()
        await client.closed
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(self.factory.counts["idle"], 1)
        tally("limit_case")

    async def test_slowloris_partial_request_closed(self) -> None:
        """
        A client trickling one byte of a request every 0.1 s (under the idle
        timeout each time) is still closed once the idle timeout passes
        without a complete request: partial input is not activity.
        """
        self.serve(idle_timeout=0.5)
        client = await self.connect()
        request = encode_netstring(b"postfix example.com")
        started = time.monotonic()
        for byte in request[:-1]:  # bounded: never completes the request
            if not client.transport.connected:
                break
            client.transport.write(bytes([byte]))
            await deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(await _wait(lambda: client.closed.called, 2.0))
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertEqual(self.factory.counts["idle"], 1)
        tally("limit_case")

    async def test_slow_but_complete_requests_kept(self) -> None:
        """A client sending complete requests more often than the idle timeout stays connected."""
        self.serve(idle_timeout=0.4)
        client = await self.connect()
        for _ in range(4):
            client.transport.write(encode_netstring(b"postfix example.com"))
            await deferLater(reactor, 0.25, lambda: None)
        self.assertTrue(client.transport.connected)
        self.assertEqual(len(NetstringDecoder(MAX_REPLY).feed(client.data)), 4)
        tally("limit_case")


class DNSLimitTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        from mtasts_twisted.testing.dns import DNSTestServer

        self.server = DNSTestServer()
        self.server.start(reactor)
        self.addCleanup(self.server.stop)

    async def test_cname_chain_boundary(self) -> None:
        """MAX_CNAME_CHAIN (8): a chain of 8 CNAMEs resolves, 9 is a temporary failure."""
        self.server.chase_cnames = False  # one query per link: the resolver walks the chain
        for length, ok in ((MAX_CNAME_CHAIN, True), (MAX_CNAME_CHAIN + 1, False)):
            names = [f"c{i}.len{length}.test" for i in range(length + 1)]
            for a, b in zip(names, names[1:]):
                self.server.add_cname(a, b)
            self.server.add_txt(names[-1], "v=STSv1; id=1")
            resolver = DNSResolver(reactor, [self.server.nameserver], timeout=0.5)
            if ok:
                answer = await resolver.lookup_txt(names[0])
                self.assertEqual(answer.strings, ("v=STSv1; id=1",))
            else:
                with self.assertRaises(DNSTemporaryError) as caught:
                    await resolver.lookup_txt(names[0])
                self.assertIn("CNAME chain longer", str(caught.exception))
        tally("limit_case")

    async def test_answer_cache_bounded(self) -> None:
        """cache_size: the resolver's answer cache never holds more entries."""
        for i in range(40):
            self.server.add_txt(f"n{i}.test", "x")
        resolver = DNSResolver(reactor, [self.server.nameserver], timeout=0.5, cache_size=16)
        for i in range(40):
            await resolver.lookup_txt(f"n{i}.test")
        self.assertEqual(len(resolver._cache), 16)
        tally("limit_case")


class SMTPClientLimitTests(Harness, unittest.TestCase):
    """The SMTP client's caps, at their boundaries, against the loopback world."""

    async def deliver_with(self, behaviour: Behaviour | None = None, raw: RawSMTP | None = None,
                           **kwargs: object):
        self.world.publish("cap.test", policy_text("enforce", "mx.cap.test"))
        if raw is not None:
            self.ports["mx.cap.test"] = raw.port
            self.world.dns.add_a("mx.cap.test", "127.0.0.1")
            self.world.dns.add_mx("cap.test", 10, "mx.cap.test")
        else:
            self.smtp(behaviour, "mx.cap.test", "cap.test")
        result = await self.fault(lambda: self.deliver("bob@cap.test", **kwargs))
        tally("limit_case")
        return result.outcomes[0]

    def eod(self, text: str) -> Behaviour:
        return Behaviour(certificate=self.pki.valid("mx.cap.test"), replies={Stage.END_OF_DATA: Reply(250, text)})

    async def test_reply_line_at_cap(self) -> None:
        length = _ClientProtocol.MAX_LENGTH - len("250 ")
        outcome = await self.deliver_with(self.eod("x" * length))
        self.assertEqual(outcome.status, Status.DELIVERED)

    async def test_reply_line_over_cap(self) -> None:
        length = _ClientProtocol.MAX_LENGTH - len("250 ") + 1
        outcome = await self.deliver_with(self.eod("x" * length))
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertIn("reply line too long", outcome.message)

    async def test_reply_lines_at_cap(self) -> None:
        outcome = await self.deliver_with(self.eod("\n".join(["ok"] * _ClientProtocol.MAX_REPLY_LINES)))
        self.assertEqual(outcome.status, Status.DELIVERED)

    async def test_reply_lines_over_cap(self) -> None:
        outcome = await self.deliver_with(self.eod("\n".join(["ok"] * (_ClientProtocol.MAX_REPLY_LINES + 1))))
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertIn("too many lines", outcome.message)

    async def test_session_timeout_beats_slow_peer(self) -> None:
        """A peer that keeps every reply coming, slowly, is cut off by session_timeout."""
        raw = RawSMTP(lambda: (b"220-slow %d\r\n" % i for i in range(100)), interval=0.1, burst=1)
        self.addCleanup(raw.stop)
        started = time.monotonic()
        outcome = await self.deliver_with(raw=raw, reply_timeout=5.0, session_timeout=0.5)
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertIn("session timed out", outcome.message)
        self.assertLess(time.monotonic() - started, 4)


class CacheLimitTests(Harness, unittest.TestCase):
    async def test_concurrent_lookups_coalesced(self) -> None:
        """200 concurrent lookups of one domain: one TXT query and one policy fetch."""
        self.world.publish("busy.test", policy_text("enforce", "mx.busy.test"))
        self.world.dns.reset_counts()
        requests = len(self.world.https.requests)
        lookups = await gatherResults([self.cache.get("busy.test") for _ in range(200)])
        self.assertEqual({lookup.policy.mode.value for lookup in lookups}, {"enforce"})
        self.assertEqual(self.world.dns.count("_mta-sts.busy.test", "TXT"), 1)
        self.assertEqual(len(self.world.https.requests) - requests, 1)
        tally("limit_case")

    async def test_dns_budget(self) -> None:
        """budget: however many servers and attempts, a lookup gives up within its budget."""
        from mtasts_twisted.testing.dns import Behaviour as DNSBehaviour

        self.world.dns.set_behaviour("_mta-sts.slow.test", DNSBehaviour.DROP)
        resolver = DNSResolver(reactor, [self.world.dns.nameserver] * 4, timeout=0.25, attempts=5, budget=0.6)
        cache = PolicyCache(MemoryStore(), resolver, self.world.fetcher, reactor)
        started = time.monotonic()
        with self.assertRaises(PolicyLookupTemporaryError):
            await cache.get("slow.test")
        self.assertLess(time.monotonic() - started, 1.2)
        self.assertLessEqual(self.world.dns.count("_mta-sts.slow.test", "TXT"), 4)
        tally("limit_case")


class RelaySlowlorisTests(TestCase):
    """Slowloris clients on the relay's SMTP listener."""

    timeout = 20

    async def listen(self, **kw: object) -> object:
        try:
            from mtasts_twisted.relay import RelaySettings, RelaySMTPFactory
        except ImportError:
            raise unittest.SkipTest("mtasts_twisted.relay is not available")
        import shutil
        import tempfile

        directory = tempfile.mkdtemp(prefix="mtasts-limits-queue-")
        self.addCleanup(shutil.rmtree, directory, True)
        settings = RelaySettings(reporting_mta="relay.test", **kw)
        factory = RelaySMTPFactory(settings.make_queue(directory), settings, reactor)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        return factory

    async def test_trickled_command_line_closed(self) -> None:
        """One byte of a command every 0.1 s never completes a line: closed at the idle timeout."""
        factory = await self.listen(idle_timeout=0.5)
        client = await connectProtocol(self.endpoint, RawClient())
        started = time.monotonic()
        for byte in b"EHLO a-very-slow-client.test":  # bounded, never sends CRLF
            if client.closed.called:
                break
            client.transport.write(bytes([byte]))
            await deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(await _wait(lambda: client.closed.called, 2.0))
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertIn(b"421 ", client.data)
        await factory.wait_closed()
        tally("limit_case")

    async def test_many_slow_clients_capped_per_ip(self) -> None:
        """Slow clients cannot hold more than max_connections_per_ip connections."""
        factory = await self.listen(idle_timeout=5.0, max_connections_per_ip=3)
        clients = [await connectProtocol(self.endpoint, RawClient()) for _ in range(5)]
        self.assertTrue(await _wait(lambda: sum(c.closed.called for c in clients) == 2))
        self.assertEqual(factory.connections, 3)
        refused = [c for c in clients if c.closed.called]
        self.assertTrue(all(b"421 4.7.0" in c.data for c in refused))
        for client in clients:
            client.transport.loseConnection()
        await factory.wait_closed()
        tally("limit_case")
