"""
Tests for L{mtasts_twisted.dns} and L{mtasts_twisted.testing.dns}.

Outcomes are tested over real loopback sockets against the test DNS server;
timeout, budget and cache-expiry logic with a L{task.Clock}-based fake
reactor.
"""

from __future__ import annotations

import os
import tempfile

import attrs
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from twisted.internet import defer, error, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtasts_twisted.dns import (
    AddressAnswer,
    DNSError,
    DNSHostnameResolver,
    DNSNoRecordError,
    DNSResolver,
    DNSTemporaryError,
    MXAnswer,
    MXHost,
    TXTAnswer,
    format_nameserver,
    parse_nameserver,
    reactor_with_resolver,
    system_nameservers,
)
from mtasts_twisted.interfaces import IDNSResolver
from mtasts_twisted.policy import DomainError, MTASTSError
from mtasts_twisted.testing.dns import ANY_NAME, Behaviour, DNSTestServer

FAST = dict(timeout=0.2, budget=2.0, attempts=1)


# --- nameserver parsing ---------------------------------------------------


class ParseNameserverTests(unittest.TestCase):
    def test_valid(self) -> None:
        cases = {
            "192.0.2.1": ("192.0.2.1", 53),
            " 192.0.2.1:5353 ": ("192.0.2.1", 5353),
            "::1": ("::1", 53),
            "2001:DB8:0:0::1": ("2001:db8::1", 53),
            "[::1]": ("::1", 53),
            "[2001:db8::1]:5300": ("2001:db8::1", 5300),
            "127.0.0.1:65535": ("127.0.0.1", 65535),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_nameserver(text), expected, text)

    def test_invalid(self) -> None:
        for text in [
            "",
            "   ",
            "ns.example.com",
            "ns.example.com:53",
            "192.0.2.1:",
            "192.0.2.1:0",
            "192.0.2.1:65536",
            "192.0.2.1:dns",
            "192.0.2.1:+53",
            "192.0.2.256",
            "[::1",
            "[::1]53",
            "[::1]:",
            "[ns.example]:53",
            "1.2.3.4:53:53x",
        ]:
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_nameserver(text)
            self.assertIn("nameserver", str(caught.exception))

    def test_not_text(self) -> None:
        with self.assertRaises(ValueError):
            parse_nameserver(None)  # type: ignore[arg-type]

    def test_format_round_trip(self) -> None:
        for text in ["192.0.2.1:53", "[::1]:5353", "[2001:db8::1]:53"]:
            self.assertEqual(format_nameserver(parse_nameserver(text)), text)

    def test_system_nameservers(self) -> None:
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.unlink, path)
        with os.fdopen(fd, "w") as f:
            f.write("# comment\nsearch example\nnameserver 192.0.2.7\nnameserver bogus\nnameserver 2001:db8::53\n")
        self.assertEqual(system_nameservers(path), (("192.0.2.7", 53), ("2001:db8::53", 53)))

    def test_system_nameservers_default(self) -> None:
        fd, path = tempfile.mkstemp()
        os.close(fd)
        self.addCleanup(os.unlink, path)
        self.assertEqual(system_nameservers(path), (("127.0.0.1", 53),))
        self.assertEqual(system_nameservers(path + ".missing"), (("127.0.0.1", 53),))

    def test_resolver_arguments(self) -> None:
        clock = task.Clock()
        self.assertEqual(DNSResolver(clock).nameservers, system_nameservers())
        resolver = DNSResolver(clock, ["127.0.0.1:5300", ("::1", 53)])
        self.assertEqual(resolver.nameservers, (("127.0.0.1", 5300), ("::1", 53)))
        for kwargs in [
            dict(nameservers=[]),
            dict(nameservers=["ns.example"]),
            dict(nameservers=["127.0.0.1"], timeout=0),
            dict(nameservers=["127.0.0.1"], budget=-1),
            dict(nameservers=["127.0.0.1"], attempts=0),
        ]:
            self.assertRaises(ValueError, DNSResolver, clock, **kwargs)

    def test_error_classes(self) -> None:
        self.assertTrue(issubclass(DNSError, MTASTSError))
        self.assertEqual(DNSNoRecordError("x").reason, "dns-no-record")
        self.assertEqual(DNSTemporaryError("x").reason, "dns-lookup")


# --- unit tests on a fake reactor -----------------------------------------


class FakeUDPPort:
    """A UDP port that records what is sent and never touches the network."""

    def __init__(self, protocol: DatagramProtocol, port: int, interface: str) -> None:
        self.protocol = protocol
        self.requested_port = port
        self.interface = interface
        self.peer: tuple[str, int] | None = None
        self.sent: list[bytes] = []
        self.listening = True

    def connect(self, host: str, port: int) -> None:
        self.peer = (host, port)

    def write(self, data: bytes, addr: object = None) -> None:
        self.sent.append(data)

    def stopListening(self) -> None:
        self.listening = False
        self.protocol.doStop()

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "0.0.0.0", 40000)


class FakeReactor(task.Clock):
    """A Clock with C{listenUDP}."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakeUDPPort] = []

    def listenUDP(self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192):
        fake = FakeUDPPort(protocol, port, interface)
        self.ports.append(fake)
        protocol.makeConnection(fake)
        return fake

    def query(self, index: int = -1) -> dns.message.Message:
        return dns.message.from_wire(self.ports[index].sent[-1])

    def reply(
        self,
        index: int = -1,
        rcode: int = dns.rcode.NOERROR,
        answer: tuple[str, ...] = (),
        soa: str | None = None,
        source: tuple[str, int] | None = None,
        flags: int = 0,
    ) -> None:
        """Answer the query on port C{index}; C{answer} in zone-file lines."""
        port = self.ports[index]
        query = self.query(index)
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        response.flags |= flags
        for line in answer:
            owner, ttl, rdtype, rdata = line.split(None, 3)
            response.answer.append(dns.rrset.from_text(owner, int(ttl), "IN", rdtype, rdata))
        if soa is not None:
            owner, ttl, rdata = soa.split(None, 2)
            response.authority.append(dns.rrset.from_text(owner, int(ttl), "IN", "SOA", rdata))
        port.protocol.datagramReceived(response.to_wire(), source or port.peer)


class ClockTests(unittest.TestCase):
    """Timeouts, budget, cache expiry and reply checks with a fake clock."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()

    def resolver(self, **kwargs) -> DNSResolver:
        kwargs.setdefault("nameservers", ["127.0.0.1:5301"])
        return DNSResolver(self.reactor, **kwargs)

    def test_query_shape(self) -> None:
        """Fresh port 0 socket per query, RD+AD flags, EDNS, connected to the server."""
        resolver = self.resolver()
        d = resolver.lookup_txt("_mta-sts.Example.COM")
        port = self.reactor.ports[0]
        self.assertEqual(port.requested_port, 0)
        self.assertEqual(port.peer, ("127.0.0.1", 5301))
        query = self.reactor.query()
        self.assertEqual(query.question[0].name.to_text(), "_mta-sts.example.com.")
        self.assertEqual(query.question[0].rdtype, dns.rdatatype.TXT)
        self.assertTrue(query.flags & dns.flags.RD and query.flags & dns.flags.AD)
        self.assertEqual(query.edns, 0)
        self.assertNoResult(d)
        self.reactor.reply(answer=('_mta-sts.example.com. 30 TXT "v=STSv1; id=1"',))
        self.assertEqual(self.successResultOf(d).strings, ("v=STSv1; id=1",))
        self.assertFalse(port.listening)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_random_ids(self) -> None:
        resolver = self.resolver(cache_size=0)
        for i in range(8):
            resolver.lookup_txt(f"n{i}.example")
        ids = {dns.message.from_wire(p.sent[0]).id for p in self.reactor.ports}
        self.assertGreater(len(ids), 1)

    def test_timeout_then_next_server(self) -> None:
        resolver = self.resolver(nameservers=["127.0.0.1:5301", "127.0.0.1:5302"], timeout=2, budget=10)
        d = resolver.lookup_txt("example.com")
        self.reactor.advance(1.9)
        self.assertEqual(len(self.reactor.ports), 1)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.reactor.ports), 2)
        self.assertFalse(self.reactor.ports[0].listening)
        self.assertEqual(self.reactor.ports[1].peer, ("127.0.0.1", 5302))
        self.reactor.reply(answer=('example.com. 60 TXT "ok"',))
        self.assertEqual(self.successResultOf(d).strings, ("ok",))

    def test_all_time_out(self) -> None:
        resolver = self.resolver(nameservers=["127.0.0.1:5301", "127.0.0.1:5302"], timeout=2, attempts=2)
        d = resolver.lookup_txt("example.com")
        for _ in range(4):
            self.reactor.advance(2)
        failure = self.failureResultOf(d, DNSTemporaryError)
        self.assertEqual(len(self.reactor.ports), 4)
        self.assertIn("timeout after 2s waiting for 127.0.0.1:5301", failure.value.detail)
        self.assertIn("127.0.0.1:5302", failure.value.detail)
        self.assertIn("example.com", str(failure.value))
        self.assertIn("TXT", str(failure.value))

    def test_budget(self) -> None:
        """The budget bounds the whole lookup; the last try is shortened."""
        resolver = self.resolver(timeout=2, budget=5, attempts=10)
        d = resolver.lookup_txt("example.com")
        self.reactor.advance(2)
        self.reactor.advance(2)
        self.assertEqual(len(self.reactor.ports), 3)
        self.reactor.advance(0.99)
        self.assertNoResult(d)
        self.reactor.advance(0.01)
        failure = self.failureResultOf(d, DNSTemporaryError)
        self.assertEqual(len(self.reactor.ports), 3)
        self.assertIn("timeout after 1s", failure.value.detail)
        self.assertIn("time budget of 5s exhausted", failure.value.detail)

    def test_cancel(self) -> None:
        resolver = self.resolver()
        d = resolver.lookup_txt("example.com")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertFalse(self.reactor.ports[0].listening)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_wrong_source_ignored(self) -> None:
        resolver = self.resolver()
        d = resolver.lookup_txt("example.com")
        self.reactor.reply(rcode=dns.rcode.NXDOMAIN, source=("127.0.0.9", 5301))
        self.reactor.reply(rcode=dns.rcode.NXDOMAIN, source=("127.0.0.1", 5399))
        self.assertNoResult(d)
        self.reactor.reply(answer=('example.com. 60 TXT "real"',))
        self.assertEqual(self.successResultOf(d).strings, ("real",))

    def test_cache_honours_ttl(self) -> None:
        resolver = self.resolver()
        d = resolver.lookup_txt("example.com")
        self.reactor.reply(answer=('example.com. 30 TXT "a"',))
        self.assertEqual(self.successResultOf(d).ttl, 30)
        self.reactor.advance(10)
        cached = self.successResultOf(resolver.lookup_txt("EXAMPLE.com."))
        self.assertEqual((cached.strings, cached.ttl), (("a",), 20))
        self.assertEqual(len(self.reactor.ports), 1)
        self.reactor.advance(20)
        d = resolver.lookup_txt("example.com")
        self.assertEqual(len(self.reactor.ports), 2)
        self.reactor.reply(answer=('example.com. 30 TXT "b"',))
        self.assertEqual(self.successResultOf(d).strings, ("b",))

    def test_cache_lru(self) -> None:
        resolver = self.resolver(cache_size=2)
        for name in ["a.example", "b.example", "c.example"]:
            d = resolver.lookup_txt(name)
            self.reactor.reply(answer=(f'{name}. 300 TXT "{name}"',))
            self.successResultOf(d)
        self.successResultOf(resolver.lookup_txt("c.example"))
        self.assertEqual(len(self.reactor.ports), 3)
        d = resolver.lookup_txt("a.example")
        self.assertEqual(len(self.reactor.ports), 4)
        self.reactor.reply(answer=('a.example. 300 TXT "again"',))
        self.assertEqual(self.successResultOf(d).strings, ("again",))

    def test_negative_cache_capped(self) -> None:
        """NXDOMAIN is cached for min(SOA TTL, MINIMUM), at most 60 s."""
        resolver = self.resolver()
        d = resolver.lookup_txt("nx.example")
        self.reactor.reply(rcode=dns.rcode.NXDOMAIN, soa=". 3600 ns. host. 1 2 3 4 3600")
        self.assertTrue(self.failureResultOf(d, DNSNoRecordError).value.nxdomain)
        self.reactor.advance(59)
        self.assertTrue(self.failureResultOf(resolver.lookup_txt("nx.example"), DNSNoRecordError).value.nxdomain)
        self.assertEqual(len(self.reactor.ports), 1)
        self.reactor.advance(1)
        resolver.lookup_txt("nx.example")
        self.assertEqual(len(self.reactor.ports), 2)

    def test_negative_cache_soa_minimum(self) -> None:
        resolver = self.resolver()
        d = resolver.lookup_txt("nodata.example")
        self.reactor.reply(soa=". 3600 ns. host. 1 2 3 4 5")
        self.assertFalse(self.failureResultOf(d, DNSNoRecordError).value.nxdomain)
        self.reactor.advance(4)
        self.failureResultOf(resolver.lookup_txt("nodata.example"), DNSNoRecordError)
        self.assertEqual(len(self.reactor.ports), 1)
        self.reactor.advance(1)
        resolver.lookup_txt("nodata.example")
        self.assertEqual(len(self.reactor.ports), 2)

    def test_negative_without_soa_not_cached(self) -> None:
        resolver = self.resolver()
        d = resolver.lookup_txt("nx.example")
        self.reactor.reply(rcode=dns.rcode.NXDOMAIN)
        self.failureResultOf(d, DNSNoRecordError)
        resolver.lookup_txt("nx.example")
        self.assertEqual(len(self.reactor.ports), 2)

    def test_temporary_failure_not_cached(self) -> None:
        resolver = self.resolver(attempts=1)
        d = resolver.lookup_txt("example.com")
        self.reactor.reply(rcode=dns.rcode.SERVFAIL)
        self.failureResultOf(d, DNSTemporaryError)
        resolver.lookup_txt("example.com")
        self.assertEqual(len(self.reactor.ports), 2)

    def test_cname_ttl(self) -> None:
        """The answer's TTL is the smallest along the CNAME chain."""
        resolver = self.resolver()
        d = resolver.lookup_txt("alias.example")
        self.reactor.reply(answer=("alias.example. 20 CNAME target.example.", 'target.example. 300 TXT "t"'))
        answer = self.successResultOf(d)
        self.assertEqual((answer.name, answer.strings, answer.ttl), ("alias.example", ("t",), 20))

    def test_cname_chain_bound(self) -> None:
        resolver = self.resolver()
        d = resolver.lookup_txt("c0.example")
        chain = tuple(f"c{i}.example. 60 CNAME c{i + 1}.example." for i in range(10))
        self.reactor.reply(answer=chain)
        failure = self.failureResultOf(d, DNSTemporaryError)
        self.assertIn("CNAME chain longer than 8", failure.value.detail)


# --- loopback tests against the test server -------------------------------


class LoopbackTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.server = self.start_server()
        self.resolver = DNSResolver(reactor, [self.server.nameserver], **FAST)

    def start_server(self, interface: str = "127.0.0.1") -> DNSTestServer:
        server = DNSTestServer()
        server.start(reactor, interface)
        self.addCleanup(server.stop)
        return server


class TXTTests(LoopbackTestCase):
    async def test_strings_concatenated(self) -> None:
        """RFC 8461 §3.1: the strings of one RR are joined without separator."""
        self.server.add_txt("_mta-sts.example.com", "v=STSv1; ", "id=20240101")
        answer = await self.resolver.lookup_txt("_mta-sts.example.com")
        self.assertEqual(answer, TXTAnswer("_mta-sts.example.com", ("v=STSv1; id=20240101",), 300, False))

    async def test_several_rrs(self) -> None:
        self.server.add_txt("_mta-sts.example.com", "v=STSv1; id=1", ttl=100)
        self.server.add_txt("_mta-sts.example.com", "v=spf1 -all", ttl=100)
        answer = await self.resolver.lookup_txt("_mta-sts.example.com")
        self.assertEqual(sorted(answer.strings), ["v=STSv1; id=1", "v=spf1 -all"])
        self.assertEqual(answer.ttl, 100)

    async def test_long_string_split_and_joined(self) -> None:
        self.server.add_txt("long.example", "a" * 600)
        answer = await self.resolver.lookup_txt("long.example")
        self.assertEqual(answer.strings, ("a" * 600,))

    async def test_invalid_utf8_replaced(self) -> None:
        self.server.add_txt("bytes.example", b"v=STSv1; id=\xff")
        answer = await self.resolver.lookup_txt("bytes.example")
        self.assertEqual(answer.strings, ("v=STSv1; id=\ufffd",))

    async def test_name_normalised(self) -> None:
        self.server.add_txt("xn--bcher-kva.example", "idn")
        answer = await self.resolver.lookup_txt("BÜCHER.example.")
        self.assertEqual((answer.name, answer.strings), ("xn--bcher-kva.example", ("idn",)))

    async def test_invalid_name(self) -> None:
        for name in ["a..b", "", "x" * 64 + ".example", "bad\u2028.example"]:
            await self.assertFailure(self.resolver.lookup_txt(name), DomainError)
        self.assertEqual(self.server.count(), 0)

    async def test_cname_followed(self) -> None:
        self.server.add_cname("_mta-sts.example.com", "_mta-sts.provider.example", ttl=50)
        self.server.add_txt("_mta-sts.provider.example", "v=STSv1; id=2")
        answer = await self.resolver.lookup_txt("_mta-sts.example.com")
        self.assertEqual((answer.name, answer.strings, answer.ttl), ("_mta-sts.example.com", ("v=STSv1; id=2",), 50))
        self.assertEqual(self.server.count(rdtype="TXT"), 1)

    async def test_cname_followed_by_new_query(self) -> None:
        """A CNAME without the target's records: the target is asked for."""
        self.server.chase_cnames = False
        self.server.add_cname("a.example", "b.example")
        self.server.add_cname("b.example", "c.example")
        self.server.add_txt("c.example", "end")
        answer = await self.resolver.lookup_txt("a.example")
        self.assertEqual(answer.strings, ("end",))
        self.assertEqual([self.server.count(n, "TXT") for n in ["a.example", "b.example", "c.example"]], [1, 1, 1])

    async def test_cname_to_nxdomain(self) -> None:
        self.server.add_cname("a.example", "gone.example")
        e = await self.assertFailure(self.resolver.lookup_txt("a.example"), DNSNoRecordError)
        self.assertTrue(e.nxdomain)
        self.assertIn("via CNAME to gone.example", str(e))

    async def test_cname_loop(self) -> None:
        """
        A CNAME loop is a broken zone its owner can fix, and recursive
        resolvers answer SERVFAIL for it: temporary, never "no record"
        (which would let a sender drop a policy).
        """
        for chase in (True, False):
            self.server.chase_cnames = chase
            self.server.add_cname("a.example", "b.example")
            self.server.add_cname("b.example", "a.example")
            e = await self.assertFailure(self.resolver.lookup_txt("a.example"), DNSTemporaryError)
            self.assertIn("CNAME loop: a.example -> b.example -> a.example", e.detail)
            self.assertEqual(e.reason, "dns-lookup")

    async def test_nxdomain(self) -> None:
        e = await self.assertFailure(self.resolver.lookup_txt("_mta-sts.nowhere.example"), DNSNoRecordError)
        self.assertTrue(e.nxdomain)
        self.assertEqual(e.reason, "dns-no-record")
        self.assertEqual((e.name, e.rdtype, e.server), ("_mta-sts.nowhere.example", "TXT", self.server.nameserver))
        self.assertIn("_mta-sts.nowhere.example does not exist", str(e))
        self.assertIn(self.server.nameserver, str(e))

    async def test_nodata(self) -> None:
        self.server.add_a("example.com", "127.0.0.1")
        self.server.add_a("x._mta-sts.example.org", "127.0.0.1")
        for name in ["example.com", "_mta-sts.example.org"]:  # the second is an empty non-terminal
            e = await self.assertFailure(self.resolver.lookup_txt(name), DNSNoRecordError)
            self.assertFalse(e.nxdomain)
            self.assertIn(f"{name} has no TXT records", str(e))

    async def test_servfail(self) -> None:
        self.server.add_txt("example.com", "x")
        self.server.set_behaviour("example.com", Behaviour.SERVFAIL)
        e = await self.assertFailure(self.resolver.lookup_txt("example.com"), DNSTemporaryError)
        self.assertEqual(e.detail, f"SERVFAIL from {self.server.nameserver}")
        self.assertIn("TXT lookup of example.com failed temporarily", str(e))
        self.assertEqual(self.server.count("example.com", "TXT"), 1)

    async def test_refused(self) -> None:
        self.server.set_behaviour(ANY_NAME, Behaviour.REFUSED)
        e = await self.assertFailure(self.resolver.lookup_txt("example.com"), DNSTemporaryError)
        self.assertEqual(e.detail, f"REFUSED from {self.server.nameserver}")

    async def test_timeout(self) -> None:
        self.server.add_txt("example.com", "x")
        self.server.set_behaviour("example.com", Behaviour.DROP)
        start = reactor.seconds()
        e = await self.assertFailure(self.resolver.lookup_txt("example.com"), DNSTemporaryError)
        self.assertIn(f"timeout after 0.2s waiting for {self.server.nameserver} (UDP)", e.detail)
        self.assertLess(reactor.seconds() - start, 1.5)

    async def test_malformed_reply(self) -> None:
        self.server.set_behaviour("example.com", Behaviour.MALFORMED)
        e = await self.assertFailure(self.resolver.lookup_txt("example.com"), DNSTemporaryError)
        self.assertIn(f"malformed reply from {self.server.nameserver}", e.detail)

    async def test_mismatching_replies_ignored(self) -> None:
        """Spoofed NXDOMAIN replies (wrong ID, question or source) are ignored."""
        self.server.add_txt("example.com", "real")
        for behaviour in (Behaviour.WRONG_ID, Behaviour.WRONG_QUESTION, Behaviour.WRONG_SOURCE):
            self.server.set_behaviour("example.com", behaviour)
            self.resolver.clear_cache()
            answer = await self.resolver.lookup_txt("example.com")
            self.assertEqual(answer.strings, ("real",), behaviour)

    async def test_mismatching_replies_ignored_over_tcp(self) -> None:
        self.server.add_txt("example.com", "real")
        self.server.set_behaviour("example.com", Behaviour.TRUNCATE, Behaviour.WRONG_ID, Behaviour.WRONG_QUESTION)
        answer = await self.resolver.lookup_txt("example.com")
        self.assertEqual(answer.strings, ("real",))
        self.assertEqual(self.server.count("example.com", "TXT", "tcp"), 1)

    async def test_fallback_after_timeout(self) -> None:
        first, second = self.server, self.start_server()
        first.set_behaviour(ANY_NAME, Behaviour.DROP)
        second.add_txt("example.com", "from second")
        resolver = DNSResolver(reactor, [first.nameserver, second.nameserver], **FAST)
        answer = await resolver.lookup_txt("example.com")
        self.assertEqual(answer.strings, ("from second",))
        self.assertEqual((first.count(), second.count()), (1, 1))

    async def test_fallback_after_servfail(self) -> None:
        first, second = self.server, self.start_server()
        first.set_behaviour(ANY_NAME, Behaviour.SERVFAIL)
        second.add_txt("example.com", "from second")
        resolver = DNSResolver(reactor, [first.nameserver, second.nameserver], **FAST)
        answer = await resolver.lookup_txt("example.com")
        self.assertEqual(answer.strings, ("from second",))

    async def test_nxdomain_is_final(self) -> None:
        """A definite answer from the first server is not second-guessed."""
        second = self.start_server()
        second.add_txt("example.com", "other")
        resolver = DNSResolver(reactor, [self.server.nameserver, second.nameserver], **FAST)
        await self.assertFailure(resolver.lookup_txt("example.com"), DNSNoRecordError)
        self.assertEqual(second.count(), 0)

    async def test_all_servers_fail(self) -> None:
        first, second = self.server, self.start_server()
        first.set_behaviour(ANY_NAME, Behaviour.SERVFAIL)
        second.set_behaviour(ANY_NAME, Behaviour.REFUSED)
        resolver = DNSResolver(reactor, [first.nameserver, second.nameserver], **dict(FAST, attempts=2))
        e = await self.assertFailure(resolver.lookup_txt("example.com"), DNSTemporaryError)
        self.assertEqual(e.detail, f"SERVFAIL from {first.nameserver}; REFUSED from {second.nameserver}")
        self.assertEqual((first.count(), second.count()), (2, 2))

    async def test_port_unreachable(self) -> None:
        """Nothing listening: ICMP port unreachable fails the try at once."""
        probe = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        port = probe.getHost().port
        await probe.stopListening()
        resolver = DNSResolver(reactor, [f"127.0.0.1:{port}"], timeout=5, budget=5, attempts=1)
        start = reactor.seconds()
        e = await self.assertFailure(resolver.lookup_txt("example.com"), DNSTemporaryError)
        self.assertIn(f"127.0.0.1:{port}", e.detail)
        self.assertLess(reactor.seconds() - start, 4)

    async def test_truncated_retried_over_tcp(self) -> None:
        self.server.add_txt("example.com", "over tcp")
        self.server.set_behaviour("example.com", Behaviour.TRUNCATE)
        answer = await self.resolver.lookup_txt("example.com")
        self.assertEqual(answer.strings, ("over tcp",))
        self.assertEqual(self.server.count("example.com", "TXT", "udp"), 1)
        self.assertEqual(self.server.count("example.com", "TXT", "tcp"), 1)

    async def test_too_big_for_udp(self) -> None:
        """A reply above the EDNS payload is truncated by the server; TCP gets it."""
        self.server.add_txt("big.example", "v" * 3000)
        answer = await self.resolver.lookup_txt("big.example")
        self.assertEqual(answer.strings, ("v" * 3000,))
        self.assertEqual(self.server.count("big.example", "TXT", "tcp"), 1)

    async def test_tcp_timeout(self) -> None:
        self.server.set_behaviour("example.com", Behaviour.TRUNCATE, Behaviour.DROP_TCP)
        e = await self.assertFailure(self.resolver.lookup_txt("example.com"), DNSTemporaryError)
        self.assertIn(f"waiting for {self.server.nameserver} (TCP)", e.detail)

    async def test_tcp_servfail(self) -> None:
        self.server.set_behaviour("example.com", Behaviour.TRUNCATE, Behaviour.SERVFAIL)
        e = await self.assertFailure(self.resolver.lookup_txt("example.com"), DNSTemporaryError)
        self.assertEqual(e.detail, f"SERVFAIL from {self.server.nameserver}")
        self.assertEqual(self.server.count(transport="tcp"), 1)

    async def test_authenticated(self) -> None:
        self.server.add_txt("signed.example", "s")
        self.server.add_txt("plain.example", "p")
        self.server.set_behaviour("signed.example", Behaviour.AUTHENTICATED)
        self.assertTrue((await self.resolver.lookup_txt("signed.example")).secure)
        self.assertFalse((await self.resolver.lookup_txt("plain.example")).secure)

    async def test_authenticated_needs_whole_chain(self) -> None:
        self.server.chase_cnames = False
        self.server.add_cname("alias.example", "signed.example")
        self.server.add_txt("signed.example", "s")
        self.server.set_behaviour("signed.example", Behaviour.AUTHENTICATED)
        self.assertFalse((await self.resolver.lookup_txt("alias.example")).secure)

    async def test_cache(self) -> None:
        self.server.add_txt("example.com", "cached")
        first = await self.resolver.lookup_txt("example.com")
        self.server.remove("example.com")
        second = await self.resolver.lookup_txt("example.com")
        self.assertEqual(second.strings, first.strings)
        self.assertEqual(self.server.count("example.com", "TXT"), 1)
        await self.assertFailure(self.resolver.lookup_txt("nx.example"), DNSNoRecordError)
        await self.assertFailure(self.resolver.lookup_txt("nx.example"), DNSNoRecordError)
        self.assertEqual(self.server.count("nx.example", "TXT"), 1)

    async def test_cache_disabled(self) -> None:
        resolver = DNSResolver(reactor, [self.server.nameserver], cache_size=0, **FAST)
        self.server.add_txt("example.com", "x")
        await resolver.lookup_txt("example.com")
        await resolver.lookup_txt("example.com")
        self.assertEqual(self.server.count("example.com", "TXT"), 2)

    async def test_ipv6_nameserver(self) -> None:
        try:
            server = self.start_server("::1")
        except error.CannotListenError as e:
            raise unittest.SkipTest(f"no IPv6 loopback: {e}")
        self.assertTrue(server.nameserver.startswith("[::1]:"))
        server.add_txt("example.com", "v6")
        server.set_behaviour("example.com", Behaviour.TRUNCATE)
        resolver = DNSResolver(reactor, [server.nameserver], **FAST)
        self.assertEqual((await resolver.lookup_txt("example.com")).strings, ("v6",))
        self.assertEqual(server.count(transport="tcp"), 1)

    def test_interface(self) -> None:
        verifyObject(IDNSResolver, self.resolver)
        self.assertIn(self.server.nameserver, repr(self.resolver))


class MXTests(LoopbackTestCase):
    async def test_sorted(self) -> None:
        self.server.add_mx("example.com", 20, "mx-b.example.com")
        self.server.add_mx("example.com", 10, "MX3.Example.COM")
        self.server.add_mx("example.com", 20, "mx-a.example.com")
        self.server.add_mx("example.com", 5, "mx0.example.net")
        answer = await self.resolver.lookup_mx("example.com")
        self.assertEqual(
            answer,
            MXAnswer(
                "example.com",
                (
                    MXHost(5, "mx0.example.net"),
                    MXHost(10, "mx3.example.com"),
                    MXHost(20, "mx-a.example.com"),
                    MXHost(20, "mx-b.example.com"),
                ),
                300,
            ),
        )

    async def test_implicit(self) -> None:
        """RFC 5321 §5.1: no MX but an address: the domain is its own MX."""
        self.server.add_aaaa("example.com", "::1", ttl=70)
        self.server.add_a("example.com", "127.0.0.1", ttl=80)
        answer = await self.resolver.lookup_mx("Example.COM")
        self.assertEqual(answer, MXAnswer("example.com", (MXHost(0, "example.com"),), 70, implicit=True))

    async def test_no_mx_no_address(self) -> None:
        self.server.add_txt("example.com", "only text")
        e = await self.assertFailure(self.resolver.lookup_mx("example.com"), DNSNoRecordError)
        self.assertFalse(e.nxdomain)
        self.assertIn("no MX records and no A/AAAA", str(e))

    async def test_nxdomain_no_implicit(self) -> None:
        e = await self.assertFailure(self.resolver.lookup_mx("nowhere.example"), DNSNoRecordError)
        self.assertTrue(e.nxdomain)
        self.assertEqual(self.server.count("nowhere.example", "A"), 0)

    async def test_implicit_temporary(self) -> None:
        self.server.add_txt("example.com", "t")
        self.server.set_behaviour("example.com", Behaviour.SERVFAIL, rdtype="A")
        self.server.set_behaviour("example.com", Behaviour.SERVFAIL, rdtype="AAAA")
        await self.assertFailure(self.resolver.lookup_mx("example.com"), DNSTemporaryError)

    async def test_null_mx(self) -> None:
        """RFC 7505: a single MX "." means the domain accepts no mail."""
        self.server.add_mx("example.com", 0, ".")
        answer = await self.resolver.lookup_mx("example.com")
        self.assertEqual(answer, MXAnswer("example.com", (), 300, null=True))

    async def test_null_mx_among_others_dropped(self) -> None:
        self.server.add_mx("example.com", 0, ".")
        self.server.add_mx("example.com", 10, "mx.example.com")
        answer = await self.resolver.lookup_mx("example.com")
        self.assertEqual((answer.null, answer.hosts), (False, (MXHost(10, "mx.example.com"),)))

    async def test_authenticated(self) -> None:
        self.server.add_mx("example.com", 10, "mx.example.com")
        self.server.set_behaviour("example.com", Behaviour.AUTHENTICATED)
        self.assertTrue((await self.resolver.lookup_mx("example.com")).secure)


class AddressTests(LoopbackTestCase):
    async def test_both_families(self) -> None:
        self.server.add_a("mx.example.com", "127.0.0.1", "127.0.0.2", ttl=90)
        self.server.add_aaaa("mx.example.com", "::1", ttl=60)
        answer = await self.resolver.lookup_addresses("MX.example.com")
        # IPv6 first; within a family, the server's order (round robin) is kept.
        self.assertEqual(answer.addresses[0], "::1")
        self.assertEqual(sorted(answer.addresses[1:]), ["127.0.0.1", "127.0.0.2"])
        self.assertEqual(attrs.evolve(answer, addresses=()), AddressAnswer("mx.example.com", (), 60))
        self.assertEqual(self.server.count("mx.example.com", "AAAA"), 1)
        self.assertEqual(self.server.count("mx.example.com", "A"), 1)

    async def test_one_family_fails_temporarily(self) -> None:
        self.server.add_a("mx.example.com", "127.0.0.1")
        self.server.set_behaviour("mx.example.com", Behaviour.SERVFAIL, rdtype="AAAA")
        answer = await self.resolver.lookup_addresses("mx.example.com")
        self.assertEqual(answer.addresses, ("127.0.0.1",))

    async def test_no_data_and_temporary(self) -> None:
        self.server.add_a("mx.example.com", "127.0.0.1")
        self.server.set_behaviour("mx.example.com", Behaviour.SERVFAIL, rdtype="A")
        e = await self.assertFailure(self.resolver.lookup_addresses("mx.example.com"), DNSTemporaryError)
        self.assertIn("SERVFAIL", e.detail)

    async def test_none(self) -> None:
        self.server.add_txt("mx.example.com", "no addresses")
        e = await self.assertFailure(self.resolver.lookup_addresses("mx.example.com"), DNSNoRecordError)
        self.assertFalse(e.nxdomain)
        self.assertIn("has no AAAA or A records", str(e))
        e = await self.assertFailure(self.resolver.lookup_addresses("nx.example.com"), DNSNoRecordError)
        self.assertTrue(e.nxdomain)

    async def test_literal(self) -> None:
        answer = await self.resolver.lookup_addresses("::0001")
        self.assertEqual(answer.addresses, ("::1",))
        answer = await self.resolver.lookup_addresses("127.0.0.1")
        self.assertEqual(answer.addresses, ("127.0.0.1",))
        answer = await self.resolver.lookup_addresses("[::1]")
        self.assertEqual((answer.host, answer.addresses), ("::1", ("::1",)))
        self.assertEqual(self.server.count(), 0)


# --- IHostnameResolver and the reactor proxy ------------------------------


@implementer(IResolutionReceiver)
class Receiver:
    def __init__(self) -> None:
        self.began: list[IHostResolution] = []
        self.addresses: list[object] = []
        self.completed = defer.Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self.began.append(resolution)

    def addressResolved(self, address: object) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.completed.callback(self.addresses)


class Recorder(Protocol):
    def __init__(self) -> None:
        self.lost = defer.Deferred()

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class HostnameResolverTests(LoopbackTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.name_resolver = DNSHostnameResolver(self.resolver)

    async def test_resolves_through_dns(self) -> None:
        self.server.add_a("mx.example.com", "127.0.0.1")
        self.server.add_aaaa("mx.example.com", "::1")
        receiver = Receiver()
        resolution = self.name_resolver.resolveHostName(receiver, "mx.example.com", 25)
        verifyObject(IHostResolution, resolution)
        self.assertEqual(receiver.began, [resolution])
        self.assertEqual(resolution.name, "mx.example.com")
        addresses = await receiver.completed
        self.assertEqual(addresses, [IPv6Address("TCP", "::1", 25), IPv4Address("TCP", "127.0.0.1", 25)])

    async def test_address_types(self) -> None:
        self.server.add_a("mx.example.com", "127.0.0.1")
        self.server.add_aaaa("mx.example.com", "::1")
        receiver = Receiver()
        self.name_resolver.resolveHostName(receiver, "mx.example.com", 53, [IPv4Address], "UDP")
        self.assertEqual(await receiver.completed, [IPv4Address("UDP", "127.0.0.1", 53)])

    async def test_failure_completes_empty(self) -> None:
        self.server.set_behaviour("mx.example.com", Behaviour.SERVFAIL)
        receiver = Receiver()
        self.name_resolver.resolveHostName(receiver, "mx.example.com", 25)
        self.assertEqual(await receiver.completed, [])

    def test_literal_without_dns(self) -> None:
        receiver = Receiver()
        self.name_resolver.resolveHostName(receiver, "127.0.0.1", 443)
        self.assertEqual(self.successResultOf(receiver.completed), [IPv4Address("TCP", "127.0.0.1", 443)])
        receiver = Receiver()
        self.name_resolver.resolveHostName(receiver, "::1", 443, [IPv4Address])
        self.assertEqual(self.successResultOf(receiver.completed), [])
        self.assertEqual(self.server.count(), 0)

    async def test_cancel(self) -> None:
        self.server.set_behaviour(ANY_NAME, Behaviour.DROP)
        resolver = DNSResolver(reactor, [self.server.nameserver], timeout=5, budget=5)
        receiver = Receiver()
        start = reactor.seconds()
        resolution = DNSHostnameResolver(resolver).resolveHostName(receiver, "mx.example.com", 25)
        resolution.cancel()
        self.assertEqual(await receiver.completed, [])
        self.assertLess(reactor.seconds() - start, 2)

    def test_interfaces(self) -> None:
        verifyObject(IHostnameResolver, self.name_resolver)
        proxy = reactor_with_resolver(reactor, self.name_resolver)
        verifyObject(IReactorPluggableNameResolver, proxy)
        self.assertTrue(IReactorTCP.providedBy(proxy))
        self.assertTrue(IReactorTime.providedBy(proxy))
        self.assertIs(proxy.nameResolver, self.name_resolver)
        self.assertIsNot(reactor.nameResolver, self.name_resolver)
        other = DNSHostnameResolver(self.resolver)
        self.assertIs(proxy.installNameResolver(other), self.name_resolver)
        self.assertIs(proxy.nameResolver, other)
        self.assertIsNot(reactor.nameResolver, other)

    async def test_proxy_resolve(self) -> None:
        self.server.add_a("mx.example.com", "127.0.0.3")
        proxy = reactor_with_resolver(reactor, self.name_resolver)
        self.assertEqual(await proxy.resolve("mx.example.com"), "127.0.0.3")
        await self.assertFailure(proxy.resolve("nx.example.com"), error.DNSLookupError)

    async def test_hostname_endpoint(self) -> None:
        """HostnameEndpoint on the proxy connects to what our DNS says."""
        accepted: list[Recorder] = []

        def build() -> Recorder:
            accepted.append(Recorder())
            return accepted[-1]

        listener = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        self.server.add_a("mta-sts.example", "127.0.0.1")
        proxy = reactor_with_resolver(reactor, self.name_resolver)
        endpoint = HostnameEndpoint(proxy, "mta-sts.example", listener.getHost().port)
        client = await endpoint.connect(Factory.forProtocol(Recorder))
        self.assertEqual(client.transport.getPeer().host, "127.0.0.1")
        self.assertEqual(self.server.count("mta-sts.example", "A"), 1)
        client.transport.loseConnection()
        await client.lost
        self.assertEqual(len(accepted), 1)
        await accepted[0].lost

    async def test_hostname_endpoint_unknown_name(self) -> None:
        proxy = reactor_with_resolver(reactor, self.name_resolver)
        endpoint = HostnameEndpoint(proxy, "unknown.example", 443)
        await self.assertFailure(endpoint.connect(Factory.forProtocol(Protocol)), error.DNSLookupError)
        self.assertEqual(self.server.count("unknown.example"), 2)



class _TakenTCP(FakeReactor):
    """A FakeReactor whose first C{refusals} TCP binds fail as "address in use"."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals
        self.tcp: list[int] = []

    def listenTCP(self, port: int, factory: object, backlog: int = 50, interface: str = "") -> object:
        from twisted.internet.error import CannotListenError

        if self.refusals:
            self.refusals -= 1
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        self.tcp.append(port)
        return object()


class ListenUDPAndTCPTests(unittest.SynchronousTestCase):
    """L{listen_udp_and_tcp} retries when the UDP port's number is taken for TCP."""

    def test_retries_and_closes_the_failed_udp_port(self) -> None:
        from mtasts_twisted.testing.dns import listen_udp_and_tcp

        reactor = _TakenTCP(refusals=1)
        udp, tcp, closing = listen_udp_and_tcp(reactor, DatagramProtocol, object(), tries=3)
        self.assertEqual(len(reactor.ports), 2)
        self.assertFalse(reactor.ports[0].listening)  # the failed try's UDP port is closed
        self.assertIs(udp, reactor.ports[1])
        self.assertEqual(reactor.tcp, [udp.getHost().port])
        self.assertEqual(len(closing), 1)

    def test_gives_up(self) -> None:
        from twisted.internet.error import CannotListenError

        from mtasts_twisted.testing.dns import listen_udp_and_tcp

        reactor = _TakenTCP(refusals=10)
        self.assertRaises(CannotListenError, listen_udp_and_tcp, reactor, DatagramProtocol, object(), tries=3)
        self.assertEqual([p.listening for p in reactor.ports], [False] * 3)


# --- the query wire and the reply check -----------------------------------


class QueryWireTests(unittest.SynchronousTestCase):
    """L{_Query}: the wire dnspython would build, and dnspython's response rules."""

    NAMES = ("_mta-sts.example.com", "mta-sts.xn--bcher-kva.example", "_smtp._tls.a.b.c.example", "x")

    def test_wire_is_make_query(self) -> None:
        from mtasts_twisted.dns.wire import EDNS_PAYLOAD, _Query

        for text in self.NAMES:
            qname = dns.name.from_text(text + ".")
            for rdtype in (
                dns.rdatatype.TXT, dns.rdatatype.MX, dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.TLSA,
                dns.rdatatype.CNAME,
            ):
                query = _Query.make(qname, rdtype)
                expected = dns.message.make_query(
                    qname,
                    rdtype,
                    use_edns=0,
                    payload=EDNS_PAYLOAD,
                    id=query.id,
                    flags=dns.flags.RD | dns.flags.AD,
                    want_dnssec=True,
                )
                self.assertEqual(query.wire, expected.to_wire(), (text, rdtype))
                parsed = dns.message.from_wire(query.wire)
                self.assertEqual((parsed.id, parsed.edns, parsed.payload), (query.id, 0, EDNS_PAYLOAD))
                # RFC 3225: DO set; RFC 6840 §5.7: AD set; CD clear (the
                # resolver must validate).
                self.assertTrue(parsed.ednsflags & dns.flags.DO)
                self.assertTrue(parsed.flags & dns.flags.AD)
                self.assertFalse(parsed.flags & dns.flags.CD)

    def test_random_ids(self) -> None:
        from mtasts_twisted.dns.wire import _Query

        qname = dns.name.from_text("example.com.")
        ids = {_Query.make(qname, dns.rdatatype.TXT).id for _ in range(64)}
        self.assertGreater(len(ids), 32)

    def test_is_response_as_dnspython(self) -> None:
        """Every variation is judged as dnspython's Message.is_response judges it."""
        from mtasts_twisted.dns.wire import _Query, _Reply

        qname = dns.name.from_text("_mta-sts.example.com.")
        query = _Query.make(qname, dns.rdatatype.TXT)
        reference = dns.message.from_wire(query.wire)

        def reply(**changes) -> dns.message.Message:
            message = dns.message.make_response(reference)
            for name, value in changes.items():
                if name == "rcode":
                    message.set_rcode(value)
                elif name == "opcode":
                    message.set_opcode(value)
                else:
                    setattr(message, name, value)
            return dns.message.from_wire(message.to_wire())

        def question(name: str, rdtype: int = dns.rdatatype.TXT, rdclass: int = dns.rdataclass.IN):
            return dns.rrset.RRset(dns.name.from_text(name), rdclass, rdtype)

        cases = {
            "answer": reply(),
            "other id": reply(id=(query.id + 1) % 65536),
            "not a response": reply(flags=dns.flags.RD),
            "other opcode": reply(opcode=dns.opcode.STATUS),
            "name in other case": reply(question=[question("_MTA-STS.Example.COM.")]),
            "other name": reply(question=[question("_mta-sts.example.net.")]),
            "other type": reply(question=[question("_mta-sts.example.com.", dns.rdatatype.A)]),
            "other class": reply(question=[question("_mta-sts.example.com.", rdclass=dns.rdataclass.CH)]),
            "ours and another": reply(question=[question("_mta-sts.example.com."), question("other.example.")]),
            "no question, NOERROR": reply(question=[]),
            "no question, NXDOMAIN": reply(question=[], rcode=dns.rcode.NXDOMAIN),
        }
        for rcode in (dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.FORMERR, dns.rcode.NOTIMP):
            cases[f"no question, {dns.rcode.to_text(rcode)}"] = reply(question=[], rcode=rcode)
        verdicts = {
            name: query.is_response(_Reply.from_message(message, dns.rdatatype.TXT))
            for name, message in cases.items()
        }
        # The same verdicts on the replies as read from the wire.
        self.assertEqual(
            verdicts,
            {name: query.is_response(_Reply.from_wire(message.to_wire(), query)) for name, message in cases.items()},
        )
        self.assertEqual(verdicts, {name: reference.is_response(message) for name, message in cases.items()})
        self.assertTrue(verdicts["answer"] and verdicts["name in other case"])
        self.assertFalse(verdicts["other id"] or verdicts["other name"] or verdicts["ours and another"])

    def test_name_text(self) -> None:
        """The text given with a name is what formatting the name gives."""
        from mtasts_twisted.dns.names import _name_text, _to_dns_name_and_text

        for name in ("Example.COM.", "_mta-sts.example.com", "bücher.example", "a b.example", 'q"uote.example'):
            qname, text = _to_dns_name_and_text(name)
            self.assertEqual(text, _name_text(qname), name)

    def test_ip_literal(self) -> None:
        from mtasts_twisted.dns.names import _ip_literal

        for literal in ("192.0.2.1", "::1", "[2001:db8::1]", " 10.0.0.1 "):
            self.assertIsNotNone(_ip_literal(literal), literal)
        for name in ("example.com", "host1", "1.2.3.4.example", "mta-sts.example", "[example]", ""):
            self.assertIsNone(_ip_literal(name), name)


class _Recorder(DatagramProtocol):
    """A nameserver that answers every query with one TXT record and notes where queries came from."""

    def __init__(self) -> None:
        self.sources: list[tuple[str, int]] = []

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sources.append(addr)
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(query.question[0].name, 0, "IN", "TXT", '"ok"'))
        self.transport.write(response.to_wire(), addr)


class UDPSocketTests(unittest.TestCase):
    """With a file-descriptor reactor, each query has a socket of its own, closed after."""

    def setUp(self) -> None:
        self.recorder = _Recorder()
        self.port = reactor.listenUDP(0, self.recorder, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.resolver = DNSResolver(reactor, [f"127.0.0.1:{self.port.getHost().port}"], cache_size=0, **FAST)

    async def test_fresh_port_per_query(self) -> None:
        """RFC 5452 §9.2: a new random source port per query; nothing left open."""
        from mtasts_twisted.dns.transport import _UDPSocket

        await self.resolver.lookup_txt("warm-up.example")  # the reactor's own descriptors
        fds = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
        self.recorder.sources.clear()
        for i in range(12):
            answer = await self.resolver.lookup_txt(f"n{i}.example")
            self.assertEqual(answer.strings, ("ok",))
        ports = [port for _, port in self.recorder.sources]
        self.assertEqual(len(ports), 12)
        self.assertGreater(len(set(ports)), 8)  # the kernel picks at random
        self.assertNotIn(self.port.getHost().port, ports)
        self.assertEqual([r for r in reactor.getReaders() if isinstance(r, _UDPSocket)], [])
        if fds is not None:
            self.assertEqual(set(os.listdir("/proc/self/fd")), fds)

    async def test_concurrent(self) -> None:
        names = [f"c{i}.example" for i in range(20)]
        answers = await defer.gatherResults([self.resolver.lookup_txt(n) for n in names])
        self.assertEqual([a.name for a in answers], names)
        self.assertEqual(len({port for _, port in self.recorder.sources}), 20)

    def test_no_listen_udp(self) -> None:
        """The real reactor's sockets are used directly, not through listenUDP."""
        self.assertTrue(self.resolver._fd_reactor)
        self.assertFalse(DNSResolver(FakeReactor(), ["127.0.0.1"])._fd_reactor)

    async def test_no_log_events(self) -> None:
        """A lookup logs nothing: no "UDP Port Opened/Closed", no debug events."""
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(2):
            await self.resolver.lookup_txt("quiet.example")
        self.assertEqual(events, [])

    async def test_error_on_socket(self) -> None:
        """An error the reactor reports (EPOLLERR) fails the try, naming the server."""
        from mtasts_twisted.dns.transport import _UDPExchange, _UDPSocket
        from mtasts_twisted.dns.wire import _Query

        exchange = _UDPExchange(_Query.make(dns.name.from_text("x."), 16), ("127.0.0.1", 9), "127.0.0.1:9")
        udp = _UDPSocket(reactor, ("127.0.0.1", 9), exchange)
        self.addCleanup(udp.close)
        udp.connectionLost(Failure(error.ConnectionLost()))
        failure = self.failureResultOf(exchange.reply)
        self.assertIn("127.0.0.1:9", failure.value.detail)
