"""
Loopback server plumbing shared by the test servers (HTTPS, SMTP, DNS):
the reactor they listen on (L{TCPServerReactor}), a port's number, aborting
a connection, connections tracked so a server can abort them all on stop
(L{ConnectionTracker}, L{stop_server}), and a fixed-table host name
resolver for clients (L{StaticHostnameResolver}).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, cast

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IListeningPort,
    IProtocol,
    IResolutionReceiver,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "ConnectionTracker",
    "StaticHostnameResolver",
    "TCPServerReactor",
    "TrackedConnection",
    "abort_connection",
    "port_number",
    "stop_server",
]


class TCPServerReactor(Protocol):
    """What a loopback test server needs of its reactor: C{IReactorTCP.listenTCP}."""

    # factory is any IProtocolFactory: Twisted annotates ServerFactory, which
    # the wrapping factories of these servers are not.
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> IListeningPort:
        """C{IReactorTCP.listenTCP}."""


def port_number(address: IAddress) -> int:
    """
    The port of a TCP or UDP address (what C{getHost()} of a listening
    port gives).

    @raise TypeError: for any other kind of address (e.g. a UNIX socket).
    """
    if not isinstance(address, (IPv4Address, IPv6Address)):
        raise TypeError(f"not an IP address: {address!r}")
    return address.port


def abort_connection(transport: ITransport | None) -> None:
    """
    Drop a server-side TCP (or TLS over TCP) connection at once, without
    a clean close: C{ITCPTransport.abortConnection}.
    """
    ITCPTransport(transport).abortConnection()


# --- host-name resolution --------------------------------------------------


@implementer(IHostResolution)
@attrs.define
class _Resolution:
    name: str

    def cancel(self) -> None:
        """Nothing to cancel: answers are given synchronously."""


@implementer(IHostnameResolver)
class StaticHostnameResolver:
    """
    An L{IHostnameResolver} answering from a fixed table, synchronously.

    A name missing from the table resolves to no addresses, which
    L{twisted.internet.endpoints.HostnameEndpoint} reports as
    L{twisted.internet.error.DNSLookupError} ("the name does not exist").

    @ivar lookups: every name asked for, in order (as given, not normalised).
    """

    def __init__(self, hosts: Mapping[str, str | Sequence[str]] | None = None) -> None:
        """
        @param hosts: host name → one IP address or a sequence of them.
        """
        self._hosts: dict[str, tuple[str, ...]] = {}
        self.lookups: list[str] = []
        for name, addresses in (hosts or {}).items():
            if isinstance(addresses, str):
                addresses = (addresses,)
            self.add(name, *addresses)

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".")

    def add(self, name: str, *addresses: str) -> None:
        """
        Make C{name} resolve to C{addresses} (replacing earlier ones).

        @raise ValueError: an address is not an IPv4 or IPv6 literal.
        """
        for address in addresses:
            ipaddress.ip_address(address)
        self._hosts[self._key(name)] = tuple(addresses)

    def remove(self, name: str) -> None:
        """Make C{name} resolve to nothing."""
        self._hosts.pop(self._key(name), None)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """
        Report the table's addresses for C{hostName} to C{resolutionReceiver}.

        See L{IHostnameResolver.resolveHostName}.
        """
        self.lookups.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        # Twisted's address types name the semantics "TCP" or "UDP".
        semantics = cast(Literal["TCP", "UDP"], transportSemantics)
        for address in self._hosts.get(self._key(hostName), ()):
            kind = IPv4Address if ipaddress.ip_address(address).version == 4 else IPv6Address
            if addressTypes is None or kind in addressTypes:
                resolutionReceiver.addressResolved(kind(semantics, address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


# --- routes ----------------------------------------------------------------


class TrackedConnection(ProtocolWrapper):
    """Wraps each TCP connection so a test server can abort it and see it go."""

    def __init__(self, factory: WrappingFactory[TrackedConnection], wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.closed.callback(None)


class ConnectionTracker(WrappingFactory[TrackedConnection]):
    """
    A wrapping factory whose connections are L{TrackedConnection}s (in
    C{protocols}), so test servers can abort them all on stop.
    """

    protocol = TrackedConnection

    def abort_all(self) -> Deferred[None]:
        """Abort every open connection; fire when all are gone."""
        waits = []
        for connection in list(self.protocols):
            waits.append(connection.closed)
            abort_connection(connection.transport)
        return gatherResults(waits).addCallback(lambda _: None)


def stop_server(listening: IListeningPort | None, tracker: ConnectionTracker | None) -> Deferred[None]:
    """
    Stop a test server: stop listening and abort every open connection.

    @return: a L{Deferred} that fires when the port is closed and every
        connection is gone.
    """
    waits: list[Deferred[Any]] = []
    if listening is not None:
        waits.append(maybeDeferred(listening.stopListening))
    if tracker is not None:
        waits.append(tracker.abort_all())
    return gatherResults(waits).addCallback(lambda _: None)
