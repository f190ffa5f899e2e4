"""
A loopback authoritative DNS server for tests, with in-memory zones that
tests edit while it runs.

It listens on UDP and TCP on the same port of 127.0.0.1 (or C{::1}), so a
resolver pointed at L{DNSTestServer.nameserver} can retry over TCP. Any name
can be served; a name is NXDOMAIN when neither it nor a name below it has
records, NODATA when it exists with other types. Behaviours per name (or for
every name with C{"*"}) make it misbehave: SERVFAIL, REFUSED, never answer,
truncate over UDP, set the AD bit, send a spoofed reply first, send a
malformed reply. It counts queries per (name, type, transport).

Usage in a trial test::

    from twisted.internet import reactor
    from mtasts_twisted.dns import DNSResolver
    from mtasts_twisted.testing.dns import Behaviour, DNSTestServer

    server = DNSTestServer()
    server.start(reactor)
    self.addCleanup(server.stop)
    server.add_txt("_mta-sts.example.com", "v=STSv1; id=1")
    server.set_behaviour("slow.example", Behaviour.DROP)
    resolver = DNSResolver(reactor, [server.nameserver], timeout=0.2)
    answer = await resolver.lookup_txt("_mta-sts.example.com")
    assert server.count("_mta-sts.example.com", "TXT") == 1

The server is dnspython messages on Twisted UDP/TCP protocols, which gives
precise control over flags and framing that C{twisted.names.server} does not.
"""

from __future__ import annotations

import collections
import enum
from typing import Any, Callable, Iterable, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, ITCPTransport
from twisted.internet.protocol import DatagramProtocol, ServerFactory
from twisted.python.failure import Failure
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver

__all__ = ["ANY_NAME", "Behaviour", "DNSTestServer"]

log = Logger()

#: Give this as the name to L{DNSTestServer.set_behaviour} for every name.
ANY_NAME = "*"

_IN = dns.rdataclass.IN
_MAX_CHASE = 16
_SPOOF_NAME = dns.name.from_text("spoofed.invalid.")


class DNSServerReactor(Protocol):
    """
    What a L{DNSTestServer} (and L{listen_udp_and_tcp}) needs of its
    reactor: C{IReactorUDP.listenUDP} and C{IReactorTCP.listenTCP}, with
    the defaults every reactor gives them.
    """

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> IListeningPort:
        """C{IReactorUDP.listenUDP}."""

    def listenTCP(self, port: int, factory: ServerFactory, backlog: int = 50, interface: str = "") -> IListeningPort:
        """C{IReactorTCP.listenTCP}."""


def _port_number(listening: IListeningPort) -> int:
    """The port number a listening port is bound to."""
    address = listening.getHost()
    assert isinstance(address, (IPv4Address, IPv6Address)), address
    return address.port


class Behaviour(enum.Enum):
    """How the server treats queries for a name."""

    #: Answer SERVFAIL.
    SERVFAIL = "servfail"
    #: Answer REFUSED.
    REFUSED = "refused"
    #: Never answer, over UDP or TCP.
    DROP = "drop"
    #: Never answer over TCP (accept, read, stay silent); UDP is normal.
    DROP_TCP = "drop-tcp"
    #: Over UDP, answer with the TC bit and empty sections (forces TCP).
    TRUNCATE = "truncate"
    #: Set the AD bit (as a validating resolver would).
    AUTHENTICATED = "authenticated"
    #: First send an NXDOMAIN reply with a different ID, then the real one.
    WRONG_ID = "wrong-id"
    #: First send an NXDOMAIN reply for another question, then the real one.
    WRONG_QUESTION = "wrong-question"
    #: First send an NXDOMAIN reply from another UDP port, then the real one.
    WRONG_SOURCE = "wrong-source"
    #: Send a reply with the right ID that does not parse.
    MALFORMED = "malformed"


def _name(name: str | dns.name.Name) -> dns.name.Name:
    if isinstance(name, dns.name.Name):
        return name.canonicalize()
    text = name if name.endswith(".") else name + "."
    return dns.name.from_text(text).canonicalize()


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _type(rdtype: str | int) -> dns.rdatatype.RdataType:
    return dns.rdatatype.RdataType.make(rdtype)


def _chunks(value: str | bytes) -> list[bytes]:
    """Split one TXT string into character-strings of at most 255 bytes."""
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if not data:
        return [b""]
    return [data[i : i + 255] for i in range(0, len(data), 255)]


class _UDPServer(DatagramProtocol):
    def __init__(self, server: DNSTestServer) -> None:
        self.server = server

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        for spoofed_source, wire in self.server._replies(data, "udp"):
            spare = self.server._spare_protocol.transport
            if spoofed_source and self.server._spare is not None and spare is not None:
                spare.write(wire, addr)
            else:
                assert self.transport is not None  # called only while listening
                self.transport.write(wire, addr)


class _TCPServer(Int16StringReceiver):
    MAX_LENGTH = 65535

    def __init__(self, server: DNSTestServer) -> None:
        self.server = server
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.server._connections.add(self)

    def stringReceived(self, data: bytes) -> None:
        for _, wire in self.server._replies(data, "tcp"):
            self.sendString(wire)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.server._connections.discard(self)
        self.closed.callback(None)


def listen_udp_and_tcp(
    reactor: DNSServerReactor,
    make_udp: Callable[[], DatagramProtocol],
    tcp_factory: ServerFactory,
    interface: str = "127.0.0.1",
    tries: int = 50,
) -> tuple[IListeningPort, IListeningPort, list[defer.Deferred[Any]]]:
    """
    Listen on UDP and TCP on the same ephemeral port number (a DNS server's
    shape), retrying when the port the kernel chose for UDP is taken for TCP.

    @param make_udp: makes a fresh UDP protocol for each try.
    @return: the UDP port, the TCP port, and the L{Deferred}s of the UDP
        ports closed after failed tries (wait for them when stopping).
    @raise error.CannotListenError: no port was free for both in C{tries}.
    """
    closing: list[defer.Deferred[Any]] = []
    last: Exception | None = None
    for _ in range(tries):
        udp = reactor.listenUDP(0, make_udp(), interface=interface)
        try:
            tcp = reactor.listenTCP(_port_number(udp), tcp_factory, interface=interface)
        except error.CannotListenError as e:
            last = e
            closing.append(defer.maybeDeferred(udp.stopListening))
            continue
        return udp, tcp, closing
    raise error.CannotListenError(interface, 0, last)


class DNSTestServer:
    """
    An in-process authoritative DNS server on loopback for tests.

    @ivar chase_cnames: follow CNAMEs to names this server knows, as a
        recursive resolver would (default); when C{False}, answer with the
        CNAME alone, as an authoritative server of another zone would.
    @ivar negative_ttl: TTL and MINIMUM of the SOA sent with negative
        answers (RFC 2308).
    @ivar queries: a L{collections.Counter} of C{(name, type, transport)},
        e.g. C{("example.com", "TXT", "udp")}.
    """

    def __init__(self, negative_ttl: int = 60, chase_cnames: bool = True) -> None:
        """
        @param negative_ttl: see L{negative_ttl}.
        @param chase_cnames: see L{chase_cnames}.
        """
        self.negative_ttl = negative_ttl
        self.chase_cnames = chase_cnames
        self.queries: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._zone: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self._behaviours: dict[tuple[str, int | None], set[Behaviour]] = {}
        self._udp: IListeningPort | None = None
        self._tcp: IListeningPort | None = None
        # A second UDP port: replies from a source the resolver did not ask.
        self._spare_protocol = DatagramProtocol()
        self._spare: IListeningPort | None = None
        self._interface = "127.0.0.1"
        self._connections: set[_TCPServer] = set()
        self._closing: list[defer.Deferred[Any]] = []

    # -- lifecycle --

    def start(self, reactor: DNSServerReactor, interface: str = "127.0.0.1") -> int:
        """
        Listen on UDP and TCP on one ephemeral port of C{interface}.

        @param reactor: a reactor providing C{IReactorUDP} and C{IReactorTCP}
            (see L{DNSServerReactor}).
        @param interface: C{"127.0.0.1"} or C{"::1"}.
        @return: the port number.
        @raise error.CannotListenError: when no port free for both UDP and
            TCP was found.
        """
        self._interface = interface
        tcp_factory: ServerFactory = ServerFactory()
        tcp_factory.noisy = False
        tcp_factory.protocol = lambda: _TCPServer(self)
        self._udp, self._tcp, closing = listen_udp_and_tcp(reactor, lambda: _UDPServer(self), tcp_factory, interface)
        self._closing.extend(closing)
        self._spare = reactor.listenUDP(0, self._spare_protocol, interface=interface)
        return _port_number(self._udp)

    def stop(self) -> defer.Deferred[Any]:
        """
        Close both ports, the spare port and every open TCP connection.

        @return: a L{Deferred} that fires when all are closed.
        """
        waits = list(self._closing)
        self._closing = []
        for listener in (self._udp, self._tcp, self._spare):
            if listener is not None:
                waits.append(defer.maybeDeferred(listener.stopListening))
        self._udp = self._tcp = self._spare = None
        for connection in list(self._connections):
            waits.append(connection.closed)
            ITCPTransport(connection.transport).abortConnection()
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    @property
    def port(self) -> int:
        """The UDP and TCP port number."""
        if self._udp is None:
            raise RuntimeError("the DNS test server is not listening")
        return _port_number(self._udp)

    @property
    def nameserver(self) -> str:
        """C{"127.0.0.1:PORT"} (or C{"[::1]:PORT"}), for the resolver."""
        if ":" in self._interface:
            return f"[{self._interface}]:{self.port}"
        return f"{self._interface}:{self.port}"

    # -- zone editing --

    def add_record(self, name: str, rdtype: str | int, text: str, ttl: int = 300) -> None:
        """
        Add one record given in zone-file syntax, e.g.
        C{add_record("example.com", "MX", "10 mx.example.com.")}.

        The TTL of the name's records of that type becomes C{ttl}.
        """
        rdtype = _type(rdtype)
        self._add(name, dns.rdata.from_text(_IN, rdtype, text), ttl)

    def _add(self, name: str, rdata: dns.rdata.Rdata, ttl: int) -> None:
        owner = _name(name)
        node = self._zone.setdefault(owner, {})
        rrset = node.get(rdata.rdtype)
        if rrset is None:
            rrset = node[rdata.rdtype] = dns.rrset.RRset(owner, _IN, rdata.rdtype)
        rrset.add(rdata)
        rrset.ttl = ttl

    def add_txt(self, name: str, *strings: str | bytes, ttl: int = 300) -> None:
        """
        Add ONE TXT record made of C{strings}, each a character-string;
        strings longer than 255 bytes are split into several.

        @param strings: text (UTF-8 encoded) or bytes.
        """
        chunks: list[bytes] = []
        for value in strings or ("",):
            chunks.extend(_chunks(value))
        self._add(name, dns.rdtypes.ANY.TXT.TXT(_IN, dns.rdatatype.TXT, chunks), ttl)

    def add_mx(self, name: str, preference: int, exchange: str, ttl: int = 300) -> None:
        """Add an MX record; C{exchange="."} makes a null MX (RFC 7505)."""
        target = exchange if exchange.endswith(".") else exchange + "."
        self.add_record(name, "MX", f"{preference} {target}", ttl)

    def add_a(self, name: str, *addresses: str, ttl: int = 300) -> None:
        """Add A records."""
        for address in addresses:
            self.add_record(name, "A", address, ttl)

    def add_aaaa(self, name: str, *addresses: str, ttl: int = 300) -> None:
        """Add AAAA records."""
        for address in addresses:
            self.add_record(name, "AAAA", address, ttl)

    def add_cname(self, name: str, target: str, ttl: int = 300) -> None:
        """Make C{name} a CNAME of C{target} (replacing any CNAME it had)."""
        self.remove(name, "CNAME")
        self.add_record(name, "CNAME", target if target.endswith(".") else target + ".", ttl)

    def remove(self, name: str, rdtype: str | int | None = None) -> None:
        """Remove the records of C{rdtype} at C{name}, or all its records."""
        owner = _name(name)
        if rdtype is None:
            self._zone.pop(owner, None)
            return
        node = self._zone.get(owner)
        if node is not None:
            node.pop(_type(rdtype), None)
            if not node:
                del self._zone[owner]

    def clear(self) -> None:
        """Remove every record and behaviour."""
        self._zone.clear()
        self._behaviours.clear()

    # -- behaviours and counts --

    def set_behaviour(self, name: str, *behaviours: Behaviour, rdtype: str | int | None = None) -> None:
        """
        Make queries for C{name} (C{"*"}: every name), of C{rdtype} or of
        any type, misbehave; no behaviours restores normal answers.
        """
        key = (name if name == ANY_NAME else _text(_name(name)), None if rdtype is None else _type(rdtype))
        if behaviours:
            self._behaviours[key] = set(behaviours)
        else:
            self._behaviours.pop(key, None)

    def _behaviours_for(self, qname: dns.name.Name, rdtype: int) -> set[Behaviour]:
        name = _text(qname)
        found: set[Behaviour] = set()
        for key in ((ANY_NAME, None), (ANY_NAME, rdtype), (name, None), (name, rdtype)):
            found |= self._behaviours.get(key, set())
        return found

    def count(self, name: str | None = None, rdtype: str | None = None, transport: str | None = None) -> int:
        """
        Count the queries received, all or those matching the given
        C{name}, C{rdtype} (C{"TXT"}) and C{transport} (C{"udp"}/C{"tcp"}).
        """
        wanted = None if name is None else _text(_name(name))
        wanted_type = None if rdtype is None else dns.rdatatype.to_text(_type(rdtype))
        return sum(
            n
            for (qname, qtype, qtransport), n in self.queries.items()
            if (wanted is None or qname == wanted)
            and (wanted_type is None or qtype == wanted_type)
            and (transport is None or qtransport == transport)
        )

    def reset_counts(self) -> None:
        """Forget the query counts."""
        self.queries.clear()

    # -- answering --

    def _exists(self, name: dns.name.Name) -> bool:
        # A name exists if it or a name below it has records (empty
        # non-terminals exist: RFC 8020).
        return any(owner.is_subdomain(name) for owner in self._zone)

    def _lookup(self, qname: dns.name.Name, rdtype: int) -> tuple[dns.rcode.Rcode, list[dns.rrset.RRset], bool]:
        """Return (rcode, answer rrsets, negative?)."""
        answer: list[dns.rrset.RRset] = []
        current = qname.canonicalize()
        seen = {current}
        for _ in range(_MAX_CHASE):
            node = self._zone.get(current, {})
            if rdtype in node:
                answer.append(node[rdtype])
                return dns.rcode.NOERROR, answer, False
            cname = node.get(dns.rdatatype.CNAME)
            if cname is not None and rdtype != dns.rdatatype.CNAME:
                answer.append(cname)
                target = cname[0].target.canonicalize()
                if not self.chase_cnames or target in seen:
                    return dns.rcode.NOERROR, answer, False
                seen.add(target)
                current = target
                continue
            if self._exists(current):
                return dns.rcode.NOERROR, answer, True
            return dns.rcode.NXDOMAIN, answer, True
        return dns.rcode.NOERROR, answer, False

    def _soa(self) -> dns.rrset.RRset:
        rrset = dns.rrset.from_text(
            dns.name.root,
            self.negative_ttl,
            _IN,
            dns.rdatatype.SOA,
            f"ns.test. hostmaster.test. 1 3600 600 86400 {self.negative_ttl}",
        )
        return rrset

    def _replies(self, data: bytes, transport: str) -> Iterable[tuple[bool, bytes]]:
        """Return the (from spare port?, wire) replies to one query."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return []
        if not query.question:
            return []
        question = query.question[0]
        qname, rdtype = question.name, question.rdtype
        self.queries[(_text(qname), dns.rdatatype.to_text(rdtype), transport)] += 1
        behaviours = self._behaviours_for(qname, rdtype)
        log.debug("test DNS server: {rdtype} {name} over {transport}", rdtype=rdtype, name=qname, transport=transport)

        if Behaviour.DROP in behaviours or (transport == "tcp" and Behaviour.DROP_TCP in behaviours):
            return []
        if Behaviour.MALFORMED in behaviours:
            return [(False, data[:2] + b"\x81\x80\x00\x01\xff")]
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        if Behaviour.AUTHENTICATED in behaviours:
            response.flags |= dns.flags.AD
        if Behaviour.SERVFAIL in behaviours:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif Behaviour.REFUSED in behaviours:
            response.set_rcode(dns.rcode.REFUSED)
        else:
            rcode, answer, negative = self._lookup(qname, rdtype)
            response.set_rcode(rcode)
            response.answer.extend(answer)
            if negative:
                response.authority.append(self._soa())

        out: list[tuple[bool, bytes]] = []
        spoofs = [b for b in (Behaviour.WRONG_ID, Behaviour.WRONG_QUESTION, Behaviour.WRONG_SOURCE) if b in behaviours]
        for spoof in spoofs:
            if spoof is Behaviour.WRONG_SOURCE and transport == "tcp":
                continue
            fake = dns.message.make_response(query)
            fake.set_rcode(dns.rcode.NXDOMAIN)
            if spoof is Behaviour.WRONG_ID:
                fake.id = (query.id + 1) % 65536
            elif spoof is Behaviour.WRONG_QUESTION:
                fake.question = [dns.rrset.RRset(_SPOOF_NAME, question.rdclass, rdtype)]
            out.append((spoof is Behaviour.WRONG_SOURCE, fake.to_wire()))

        if transport == "udp":
            # RFC 1035 §4.2.1 / RFC 6891 §6.2.5: fit the client's payload
            # size, else truncate.
            limit = max(512, query.payload) if query.edns >= 0 else 512
            wire = None
            if Behaviour.TRUNCATE not in behaviours:
                try:
                    wire = response.to_wire(max_size=limit)
                except dns.exception.TooBig:
                    wire = None
            if wire is None:
                response.answer.clear()
                response.authority.clear()
                response.additional.clear()
                response.flags |= dns.flags.TC
                wire = response.to_wire()
        else:
            wire = response.to_wire(max_size=65535)
        out.append((False, wire))
        return out
