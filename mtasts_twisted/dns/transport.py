"""
Carrying one query to one nameserver and its reply back: over UDP from a
fresh socket on a random port, and again over TCP when the UDP reply is
truncated (L{_Exchanger}).

A reply is checked against its query before it is believed (L{_parse_reply}):
datagrams that do not answer it are ignored, since anyone can send them
(RFC 5452 §9.1).  One try that fails in a way another server may not
raises L{_TryFailed}; the resolver then moves on to the next server.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import Any, Callable, Protocol, cast

import dns.flags
import dns.name
import dns.rcode
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IReactorFDSet,
    IReactorTime,
    IReadDescriptor,
    ITCPTransport,
)
from twisted.internet.protocol import DatagramProtocol, Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mtasts_twisted.dns.config import Nameserver, format_nameserver
from mtasts_twisted.dns.names import _is_ipv6
from mtasts_twisted.dns.wire import _Query, _Reply

__all__ = ["MAX_TCP_REPLY", "DNSReactor"]

# The namespace of the module this room was cut from, so log lines read as before.
log = Logger(namespace="mtasts_twisted.dns")

#: Largest reply accepted over TCP (the 2-byte length prefix allows no more).
MAX_TCP_REPLY = 65535

# rcodes that are a definite answer; everything else is worth another server.
_DEFINITE_RCODES = frozenset({dns.rcode.NOERROR, dns.rcode.NXDOMAIN})


class DNSReactor(Protocol):
    """
    What a L{mtasts_twisted.dns.DNSResolver} needs of its reactor:
    C{IReactorTime} (timeouts, and the answer cache's clock) and
    C{IReactorTCP} (retries of truncated replies).

    For UDP it also needs C{IReactorFDSet} (the usual reactors: epoll, poll,
    select, kqueue), or else C{IReactorUDP} (IOCP, test fakes): which one
    is decided at run time, so neither is part of this type.
    """

    def seconds(self) -> float:
        """C{IReactorTime.seconds}."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kw: object) -> IDelayedCall:
        """C{IReactorTime.callLater}."""

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = ..., bindAddress: Any = ...
    ) -> IConnector:
        """C{IReactorTCP.connectTCP}."""


class _UDPPort(Protocol):
    """What a UDP try uses of the port C{listenUDP} gives (an C{IUDPTransport})."""

    def connect(self, host: str, port: int) -> None:
        """Send to and receive from C{host}:C{port} only."""

    def write(self, packet: bytes, addr: Any = None) -> None:
        """Send a datagram to the connected address."""

    def stopListening(self) -> Deferred[None] | None:
        """Close the port."""


class _ListensUDP(Protocol):
    """C{IReactorUDP}, as a UDP try calls it (with C{listenUDP}'s defaults)."""

    def listenUDP(self, port: int, protocol: DatagramProtocol, interface: str = "") -> _UDPPort:
        """Listen on UDP C{port} (0: a random one)."""


class _TryFailed(Exception):
    """One try at one server failed in a way another server may not."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _reply_id(data: bytes) -> int | None:
    if len(data) < 2:
        return None
    return int.from_bytes(data[:2], "big")


def _parse_reply(query: _Query, data: bytes, server: str, transport: str) -> _Reply | None:
    """
    Parse a reply and check it against the question.

    The ID is checked before the (costly) parse; the source address before
    this is called.  No log event for an ignored datagram: a flood of
    forged replies must not turn into a flood of log lines.

    @return: the reply; L{None} when it does not answer our query (wrong ID
        or question, not a response): such datagrams are ignored and we keep
        waiting, since anyone can send them (RFC 5452 §9.1).
    @raise _TryFailed: when the reply carries our ID but cannot be parsed.
    """
    if _reply_id(data) != query.id:
        return None
    try:
        reply = _Reply.from_wire(data, query)
    except Exception as e:  # dnspython raises many exception types for bad wire data
        raise _TryFailed(f"malformed reply from {server} over {transport}: {e.__class__.__name__}: {e}") from None
    # Checks QR, ID, opcode and the question (name, type and class).
    if not query.is_response(reply):
        return None
    return reply


def _same_host(address: Any, host: str) -> bool:
    """Whether C{address} (as a socket reports it) is the IP text C{host}."""
    if address == host:
        return True
    try:
        return ipaddress.ip_address(address) == ipaddress.ip_address(host)
    except (ValueError, TypeError):
        return False


class _UDPExchange(DatagramProtocol):
    """
    Receives the reply to one query on one connected UDP socket: either a
    Twisted UDP port (L{IReactorUDP.listenUDP}) or a L{_UDPSocket}.
    """

    noisy = False  # no "starting/stopping protocol" log lines per query

    def __init__(self, query: _Query, server: Nameserver, label: str) -> None:
        self.query = query
        self.server = server
        self.label = label
        self.reply: Deferred[_Reply] = Deferred()
        #: Set before we close the socket ourselves, so that stopProtocol
        #: does not fail a reply the closing coroutine is still handling.
        self.closing = False

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.reply.called:
            return
        # The socket is connected, so the kernel filters sources already;
        # check anyway, in case the transport is not (RFC 5452 §9.1).
        try:
            same_source = addr[1] == self.server[1] and _same_host(addr[0], self.server[0])
        except (TypeError, IndexError):
            same_source = False
        if not same_source:
            return
        try:
            reply = _parse_reply(self.query, data, self.label, "UDP")
        except _TryFailed as e:
            self.reply.errback(e)
            return
        if reply is not None:
            self.reply.callback(reply)

    def time_out(self, timeout: float) -> None:
        """No reply came within C{timeout} seconds."""
        if not self.reply.called:
            self.reply.errback(_TryFailed(f"timeout after {timeout:g}s waiting for {self.label} (UDP)"))

    def connectionRefused(self) -> None:
        # ICMP port unreachable: nothing listens there.
        if not self.reply.called:
            self.reply.errback(_TryFailed(f"connection refused by {self.label} (UDP)"))

    def networkError(self, error: OSError) -> None:
        """The socket reported an error other than a refusal."""
        if not self.reply.called:
            self.reply.errback(_TryFailed(f"network error on UDP socket for {self.label}: {error}"))

    def stopProtocol(self) -> None:
        # The reactor closes the socket itself on a socket error (an ICMP
        # port unreachable reported as EPOLLERR, for one).
        if not self.reply.called and not self.closing:
            self.reply.errback(_TryFailed(f"UDP socket for {self.label} closed by a network error (unreachable?)"))


#: Datagrams read per readiness event: bounded, so that a flood of forged
#: datagrams cannot keep the reactor in one socket.
_MAX_READS = 16


@implementer(IReadDescriptor)
class _UDPSocket:
    """
    A connected, non-blocking UDP socket for one query, read by the
    reactor (L{IReactorFDSet}) directly.

    Why not C{listenUDP}: a Twisted UDP port per query costs a C{Port}
    object, an unconditional "UDP Port Opened/Closed" log event each way,
    and a close deferred to the next reactor turn; this costs the system
    calls only.  The port is still fresh and kernel-chosen at random per
    query (RFC 5452 §9.2): C{connect} on an unbound UDP socket binds it
    like C{bind} to port 0 does (Linux picks a random ephemeral port).
    """

    def __init__(self, reactor: IReactorFDSet, server: Nameserver, exchange: _UDPExchange) -> None:
        """
        @raise OSError: the socket cannot be made or connected.
        """
        host, port = server
        self._reactor = reactor
        self._exchange = exchange
        self._socket = socket.socket(socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._socket.setblocking(False)
            self._socket.connect((host, port))
        except OSError:
            self._socket.close()
            raise
        self._fileno = self._socket.fileno()
        self._reading = False

    def start(self, data: bytes) -> None:
        """
        Send C{data} and start reading.

        @raise OSError: sending failed.
        """
        self._reactor.addReader(self)
        self._reading = True
        self._socket.send(data)

    def close(self) -> None:
        """Stop reading and close the socket (idempotent)."""
        if self._reading:
            self._reading = False
            # Before close: a closed socket's number may be reused at once.
            self._reactor.removeReader(self)
        self._socket.close()

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "DNS-UDP"

    def doRead(self) -> None:
        exchange = self._exchange
        for _ in range(_MAX_READS):
            if exchange.reply.called:
                return
            try:
                data, addr = self._socket.recvfrom(MAX_TCP_REPLY)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                # ICMP port unreachable for an earlier datagram.
                exchange.connectionRefused()
                return
            except OSError as e:
                exchange.networkError(e)
                return
            exchange.datagramReceived(data, addr)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw an error condition (EPOLLERR: an ICMP error on the
        # connected socket) and stopped reading.
        self._reading = False
        error = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error == errno.ECONNREFUSED:
            self._exchange.connectionRefused()
        else:
            self._exchange.networkError(OSError(error, os.strerror(error)) if error else OSError(reason.getErrorMessage()))


class _TCPExchange(Int16StringReceiver):
    """
    Sends one query over TCP (RFC 1035 §4.2.2: 2-byte length prefix) and
    fires L{done} once the connection is closed after the reply.
    """

    MAX_LENGTH = MAX_TCP_REPLY

    def __init__(self, query: _Query, server: Nameserver) -> None:
        self.query = query
        self.label = format_nameserver(server)
        self.done: Deferred[_Reply] = Deferred(self._cancel)
        self._outcome: _Reply | _TryFailed | None = None

    @property
    def _tcp(self) -> ITCPTransport:
        """The transport, once connected: a TCP connection's."""
        return cast(ITCPTransport, self.transport)

    def _cancel(self, d: Deferred[_Reply]) -> None:
        if self.transport is not None:
            self._tcp.abortConnection()

    def connectionMade(self) -> None:
        self.sendString(self.query.wire)

    def stringReceived(self, data: bytes) -> None:
        if self._outcome is not None:
            return
        try:
            reply = _parse_reply(self.query, data, self.label, "TCP")
        except _TryFailed as e:
            self._outcome = e
        else:
            if reply is None:
                return
            self._outcome = reply
        self._tcp.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        self._outcome = _TryFailed(f"reply of {length} bytes from {self.label} over TCP exceeds {self.MAX_LENGTH}")
        self._tcp.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if isinstance(self._outcome, _Reply):
            self.done.callback(self._outcome)
        elif isinstance(self._outcome, _TryFailed):
            self.done.errback(self._outcome)
        else:
            self.done.errback(
                _TryFailed(f"TCP connection to {self.label} closed without a reply: {reason.getErrorMessage()}")
            )




class _OneShotFactory(Factory[_TCPExchange]):
    """C{connectProtocol}'s factory, without its "Starting factory" log line per connection."""

    noisy = False

    def __init__(self, protocol: _TCPExchange) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> _TCPExchange:
        return self._protocol

class _Exchanger:
    """
    Asks one nameserver one question: over UDP, then over TCP if the reply
    is truncated; the reply must be a definite answer (NOERROR or NXDOMAIN).

    @ivar fd_reactor: whether UDP goes over plain sockets read by the
        reactor (L{IReactorFDSet}) rather than C{listenUDP}.
    """

    def __init__(self, reactor: DNSReactor, timeout: float) -> None:
        """
        @param reactor: the reactor; see L{DNSReactor}.
        @param timeout: seconds to wait for one reply.
        """
        self._reactor = reactor
        self._timeout = timeout
        # Reactors with file descriptors (epoll, poll, select, kqueue) get
        # plain sockets; others (IOCP) and fakes get listenUDP.
        self.fd_reactor = IReactorFDSet.providedBy(reactor)
        #: The reactor as the L{IReactorFDSet} it is when C{fd_reactor}.
        self._fds = cast(IReactorFDSet, reactor)

    async def exchange(
        self, qname: dns.name.Name, rdtype: int, server: Nameserver, deadline: float
    ) -> _Reply:
        """One server: UDP, then TCP if the reply is truncated."""
        label = format_nameserver(server)
        query = _Query.make(qname, rdtype)
        timeout = min(self._timeout, deadline - self._reactor.seconds())
        # No log line per query or per cache hit: under twistd every debug
        # event is written, and these are on the lookup hot path.
        reply = await self._udp_try(query, server, label, timeout)
        if reply.flags & dns.flags.TC:
            # RFC 7766 §5 / RFC 1035 §4.2.1: truncated, so ask again over TCP.
            timeout = min(self._timeout, deadline - self._reactor.seconds())
            if timeout <= 0:
                raise _TryFailed(f"truncated reply from {label} and no time left for TCP")
            log.debug("truncated DNS reply from {server}; retrying over TCP", server=label)
            reply = await self._tcp_try(query, server, timeout)
        rcode = reply.rcode
        if rcode not in _DEFINITE_RCODES:
            raise _TryFailed(f"{dns.rcode.to_text(rcode)} from {label}")  # type: ignore[arg-type]  # any int will do
        return reply

    async def _udp_try(self, query: _Query, server: Nameserver, label: str, timeout: float) -> _Reply:
        exchange = _UDPExchange(query, server, label)
        if self.fd_reactor:
            return await self._socket_try(exchange, server, label, timeout)
        return await self._port_try(exchange, server, label, timeout)

    async def _socket_try(
        self, exchange: _UDPExchange, server: Nameserver, label: str, timeout: float
    ) -> _Reply:
        """A UDP try on a L{_UDPSocket} (reactors with L{IReactorFDSet})."""
        try:
            # RFC 5452 §9.2: a fresh socket, so a fresh random source port,
            # per query.
            udp = _UDPSocket(self._fds, server, exchange)
        except OSError as e:
            raise _TryFailed(f"cannot open a UDP socket for {label}: {e}") from None
        try:
            try:
                udp.start(exchange.query.wire)
            except OSError as e:
                raise _TryFailed(f"network error sending to {label}: {e}") from None
            return await self._wait(exchange, label, timeout)
        finally:
            exchange.closing = True
            udp.close()

    async def _port_try(
        self, exchange: _UDPExchange, server: Nameserver, label: str, timeout: float
    ) -> _Reply:
        """
        A UDP try on a Twisted UDP port, for reactors without
        L{IReactorFDSet} (the IOCP reactor; test fakes).
        """
        host, port_number = server
        try:
            # Port 0: a fresh, kernel-chosen random source port per query.
            port = cast(_ListensUDP, self._reactor).listenUDP(0, exchange, interface="::" if _is_ipv6(host) else "")
        except ierror.CannotListenError as e:
            raise _TryFailed(f"cannot open a UDP socket for {label}: {e}") from None
        try:
            try:
                port.connect(host, port_number)
                port.write(exchange.query.wire)
            except OSError as e:
                raise _TryFailed(f"network error sending to {label}: {e}") from None
            return await self._wait(exchange, label, timeout)
        finally:
            exchange.closing = True
            stopped = port.stopListening()
            if isinstance(stopped, Deferred):
                await stopped

    async def _wait(self, exchange: _UDPExchange, label: str, timeout: float) -> _Reply:
        # A plain timer that fails the reply itself: Deferred.addTimeout
        # costs a cancellation, a translation of its CancelledError and two
        # more callbacks per query, on the cold-lookup path.
        timer = self._reactor.callLater(timeout, exchange.time_out, timeout)
        try:
            return await exchange.reply
        finally:
            if timer.active():
                timer.cancel()

    async def _tcp_try(self, query: _Query, server: Nameserver, timeout: float) -> _Reply:
        host, port_number = server
        label = format_nameserver(server)
        endpoint_type = TCP6ClientEndpoint if _is_ipv6(host) else TCP4ClientEndpoint
        # The endpoint's own connect timeout is a backstop: addTimeout below
        # covers connect and reply together.
        endpoint = endpoint_type(self._reactor, host, port_number, timeout=max(1, int(timeout) + 1))
        exchange = _TCPExchange(query, server)
        waiting: Deferred[Any] = endpoint.connect(_OneShotFactory(exchange))
        waiting.addCallback(lambda _: exchange.done)
        waiting.addTimeout(timeout, cast(IReactorTime, self._reactor))
        try:
            return await waiting
        except defer.TimeoutError:
            raise _TryFailed(f"timeout after {timeout:g}s waiting for {label} (TCP)") from None
        except ierror.ConnectError as e:
            raise _TryFailed(f"TCP connection to {label} failed: {e}") from None

