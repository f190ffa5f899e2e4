"""
The connection of one policy fetch: TCP to the policy host through our
resolver, then TLS with the package's recording verify callback
(L{mtasts_twisted.pkix.RecordingConnectionCreator}), tracked so that the
fetch can abort it and wait until it is gone.

L{PolicyFetcher} makes its one request (L{mtasts_twisted.fetch.onerequest})
through L{PolicyHostEndpoint}, which connects to the addresses the fetch looked up
already (no second resolution) or else resolves through the fetcher's name
resolver.  L{Attempt} holds what one fetch needs to classify a failure (the
creator's verify records) and to close everything at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import BaseProtocol, ClientFactory, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer

from mtasts_twisted.dns import reactor_with_resolver
from mtasts_twisted.fetch.errors import FetchTimeoutError
from mtasts_twisted.pkix import RecordingConnectionCreator

__all__ = ["Attempt", "ClientReactor", "PolicyHostEndpoint"]


class ClientReactor(Protocol):
    """
    What an HTTPS client of the package needs of its reactor:
    C{IReactorTime} (its timer, the TLS layer's clock) and C{IReactorTCP}
    (connecting, through Twisted's endpoints).  Name resolution goes through
    our resolver (L{mtasts_twisted.dns.reactor_with_resolver}), or the
    reactor's C{IReactorPluggableNameResolver}.
    """

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kwargs: object
    ) -> IDelayedCall:
        """C{IReactorTime.callLater}."""

    def seconds(self) -> float:
        """C{IReactorTime.seconds}."""

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        """C{IReactorTime.getDelayedCalls}."""

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = 30,
        bindAddress: tuple[str, int] | None = None,
    ) -> IConnector:
        """C{IReactorTCP.connectTCP}."""


class _TrackedConnection(ProtocolWrapper):
    """Sits between TCP and TLS so that an attempt can abort it and see it go."""

    factory: _TrackingFactory

    def makeConnection(self, transport: ITransport) -> None:
        """As L{ProtocolWrapper.makeConnection}, declaring fewer interfaces."""
        # ProtocolWrapper declares every interface of the TCP transport,
        # and the TLS layer above re-declares each of ours one at a time
        # (TLSMemoryBIOProtocol.makeConnection): with a TCP connection's
        # dozen interfaces, 4 % of a cold lookup's CPU in zope.interface.
        # TLS and the attempt use a TCP transport's methods only.
        directlyProvides(self, ITCPTransport)
        BaseProtocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(cast(ITransport, self))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.attempt.lost(self)


class _TrackingFactory(WrappingFactory):
    protocol = _TrackedConnection
    noisy = False

    def __init__(self, wrappedFactory: IProtocolFactory, attempt: Attempt) -> None:
        super().__init__(wrappedFactory)
        self.attempt = attempt

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)
        self.attempt.live.add(cast(_TrackedConnection, p))


class Attempt:
    """One fetch: its URL, TLS connection creator and live TCP connections."""

    def __init__(self, creator: RecordingConnectionCreator, host: str, url: str, timeout: float) -> None:
        """
        @param creator: makes the fetch's TLS connections and keeps their
            verify records.
        @param host: the policy host.
        @param url: the policy URL.
        @param timeout: the fetch's timeout, in seconds (for messages).
        """
        self.creator = creator
        self.host = host
        self.url = url
        self.timeout = timeout
        self.timed_out = False
        self.live: set[_TrackedConnection] = set()
        self._waiting: list[Deferred[None]] = []

    def timeout_error(self) -> FetchTimeoutError:
        """The error for a fetch that ran out of time."""
        return FetchTimeoutError(self.url, f"no complete answer within {self.timeout:g} s")

    def lost(self, connection: _TrackedConnection) -> None:
        """A connection of this attempt is closed."""
        self.live.discard(connection)
        if not self.live:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def abort(self) -> None:
        """Abort every live connection of this attempt."""
        for connection in list(self.live):
            cast(ITCPTransport, connection.transport).abortConnection()

    def when_closed(self) -> Deferred[None]:
        """Fire when no connection of this attempt is open."""
        d: Deferred[None] = Deferred()
        if self.live:
            self._waiting.append(d)
        else:
            d.callback(None)
        return d


@implementer(IHostResolution)
class _Resolution:
    """A resolution that is over as soon as it begins."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """Nothing to stop."""


@implementer(IHostnameResolver)
class _KnownAddresses:
    """
    Resolves the policy host to the addresses its fetch looked up a moment
    ago, so that L{HostnameEndpoint} does not look them up a second time.
    """

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self._addresses = addresses

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """Deliver the known addresses of the families asked for."""
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self._addresses:
            family = IPv6Address if ":" in address else IPv4Address
            if addressTypes is None or family in addressTypes:
                semantics = cast(Literal["TCP", "UDP"], transportSemantics)
                resolutionReceiver.addressResolved(family(semantics, address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IStreamClientEndpoint)
class PolicyHostEndpoint:
    """
    TCP to the policy host, then TLS: to the addresses the fetch looked up
    already (one: directly; several: through L{HostnameEndpoint}, RFC 8305
    connection attempts in turn), else through L{HostnameEndpoint} and the
    reactor's name resolver.
    """

    def __init__(
        self,
        reactor: ClientReactor,
        clock: ClientReactor,
        host: str,
        port: int,
        attempt: Attempt,
        addresses: tuple[str, ...] | None = None,
    ) -> None:
        """
        @param reactor: connects (its name resolver resolves C{host}).
        @param clock: the clock of the TLS layer and of
            L{HostnameEndpoint}'s attempts.
        @param host: the policy host.
        @param port: the TCP port.
        @param attempt: the fetch; its creator makes the TLS connection.
        @param addresses: the policy host's addresses, when looked up.
        """
        self._reactor = reactor
        self._clock = clock
        self._host = host
        self._port = port
        self._attempt = attempt
        self._addresses = addresses

    def _tcp_endpoint(self) -> IStreamClientEndpoint:
        addresses = self._addresses
        if not addresses:
            return HostnameEndpoint(self._reactor, self._host, self._port)
        if len(addresses) > 1:
            # A dual-stack (or multi-homed) host: HostnameEndpoint's
            # attempts over the addresses found, without resolving again.
            known = reactor_with_resolver(self._clock, _KnownAddresses(addresses))
            return HostnameEndpoint(known, self._host, self._port)
        # The address the fetch resolved (and so checked) a moment ago: no
        # second resolution, and none of HostnameEndpoint's per-connect
        # machinery for a single address.
        (address,) = addresses
        if ":" in address:
            return TCP6ClientEndpoint(self._reactor, address, self._port)
        return TCP4ClientEndpoint(self._reactor, address, self._port)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Connect, and give the HTTP protocol that C{protocolFactory} built."""
        # One "Starting factory" log per fetch is noise.
        protocolFactory.noisy = False  # type: ignore[attr-defined]
        tls = TLSMemoryBIOFactory(
            # The clock is an IReactorTime (ClientReactor is that, structurally).
            self._attempt.creator, True, protocolFactory, clock=cast(IReactorTime, self._clock)
        )
        tls.noisy = False
        tracking = _TrackingFactory(tls, self._attempt)
        d = self._tcp_endpoint().connect(tracking)

        def unwrap(tracked: IProtocol) -> IProtocol:
            # tracked connection → TLS protocol → the HTTP protocol the fetch uses
            return cast(ProtocolWrapper, cast(ProtocolWrapper, tracked).wrappedProtocol).wrappedProtocol

        return d.addCallback(unwrap)
