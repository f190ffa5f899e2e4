"""
Name resolution for Twisted's endpoints through our nameservers:
L{DNSHostnameResolver}, an C{IHostnameResolver} over an
L{mtasts_twisted.interfaces.IDNSResolver}, and L{reactor_with_resolver},
which wraps a reactor so that C{HostnameEndpoint} (and so treq's C{Agent}
and the SMTP client) resolve names with it, never through the system's
C{getaddrinfo}.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence, TypeVar

from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from mtasts_twisted.dns.errors import DNSError
from mtasts_twisted.dns.names import _ip_literal, _is_ipv6
from mtasts_twisted.interfaces import IDNSResolver
from mtasts_twisted.policy import DomainError

__all__ = ["DNSHostnameResolver", "reactor_with_resolver"]

# The namespace of the module this room was cut from, so log lines read as before.
log = Logger(namespace="mtasts_twisted.dns")

_ReactorT = TypeVar("_ReactorT")


@implementer(IHostResolution)
class _HostResolution:
    """One name resolution in progress; C{cancel} stops it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lookup: Deferred[Any] | None = None

    def cancel(self) -> None:
        if self._lookup is not None:
            self._lookup.cancel()


@implementer(IHostnameResolver)
class DNSHostnameResolver:
    """
    An L{IHostnameResolver} that resolves names through an L{IDNSResolver}
    (so through the configured nameservers, not the system's
    C{getaddrinfo}). IP literals are resolved without DNS.

    Install it with L{reactor_with_resolver} so that L{HostnameEndpoint},
    treq's C{Agent} and the SMTP client use it.
    """

    def __init__(self, resolver: IDNSResolver) -> None:
        """
        @param resolver: the L{IDNSResolver} whose C{lookup_addresses}
            answers.
        """
        self._resolver = resolver

    @property
    def resolver(self) -> IDNSResolver:
        """The L{IDNSResolver} this resolves through."""
        return self._resolver

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """
        Resolve C{hostName}; see L{IHostnameResolver.resolveHostName}.

        Calls C{resolutionBegan} at once, then C{addressResolved} for each
        address (IPv6 first) of the families in C{addressTypes} (both when
        L{None}), then C{resolutionComplete} exactly once, also on failure
        (with no addresses; the failure is logged) and on cancellation.

        @return: the L{IHostResolution}.
        """
        if isinstance(hostName, bytes):
            hostName = hostName.decode("ascii", errors="replace")
        resolution = _HostResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        want6 = addressTypes is None or IPv6Address in addressTypes
        want4 = addressTypes is None or IPv4Address in addressTypes

        def deliver(addresses: Iterable[str]) -> None:
            for address in addresses:
                if _is_ipv6(address):
                    if want6:
                        resolutionReceiver.addressResolved(
                            IPv6Address(transportSemantics, address, portNumber)  # type: ignore[arg-type]
                        )
                elif want4:
                    resolutionReceiver.addressResolved(
                        IPv4Address(transportSemantics, address, portNumber)  # type: ignore[arg-type]
                    )

        literal = _ip_literal(hostName)
        if literal is not None:
            deliver([str(literal)])
            resolutionReceiver.resolutionComplete()
            return resolution

        def failed(failure: Failure) -> None:
            if failure.check(defer.CancelledError):
                log.debug("resolution of {name} cancelled", name=hostName)
            elif failure.check(DNSError, DomainError):
                log.info("cannot resolve {name}: {error}", name=hostName, error=failure.getErrorMessage())
            else:
                log.failure("resolving {name}", failure, name=hostName)

        lookup = self._resolver.lookup_addresses(hostName)
        resolution._lookup = lookup
        lookup.addCallback(lambda answer: deliver(answer.addresses))
        lookup.addErrback(failed)
        lookup.addCallback(lambda _: resolutionReceiver.resolutionComplete())
        lookup.addErrback(lambda f: log.failure("resolution receiver failed for {name}", f, name=hostName))
        return resolution


@implementer(IReactorPluggableNameResolver)
class _ReactorWithResolver:
    """
    A reactor proxy: everything is the wrapped reactor's, except
    C{nameResolver} (and C{resolve}), which use our resolver.
    """

    def __init__(self, reactor: object, name_resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self._name_resolver = name_resolver
        directlyProvides(self, providedBy(reactor), IReactorPluggableNameResolver)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_reactor":
            raise AttributeError(name)
        return getattr(self._reactor, name)

    def __repr__(self) -> str:
        return f"<reactor {self._reactor!r} resolving with {self._name_resolver!r}>"

    @property
    def nameResolver(self) -> IHostnameResolver:
        """The L{IHostnameResolver} used by L{HostnameEndpoint}."""
        return self._name_resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        """Replace our name resolver (not the wrapped reactor's); return the old one."""
        old, self._name_resolver = self._name_resolver, resolver
        return old

    def resolve(self, name: str, timeout: Sequence[int] = (1, 3, 11, 45)) -> Deferred[str]:
        """C{IReactorCore.resolve}: the first IPv4 address of C{name}, via our resolver."""
        result: Deferred[str] = Deferred()
        found: list[str] = []

        @implementer(IResolutionReceiver)
        class Receiver:
            def resolutionBegan(self, resolution: IHostResolution) -> None:
                pass

            def addressResolved(self, address: IAddress) -> None:
                found.append(address.host)  # type: ignore[attr-defined]

            def resolutionComplete(self) -> None:
                if found:
                    result.callback(found[0])
                else:
                    result.errback(ierror.DNSLookupError(f"no IPv4 address for {name}"))

        self._name_resolver.resolveHostName(Receiver(), name, 0, [IPv4Address])
        return result


def reactor_with_resolver(reactor: _ReactorT, name_resolver: IHostnameResolver) -> _ReactorT:
    """
    Wrap C{reactor} so that its C{nameResolver} is C{name_resolver}.

    The proxy provides every interface C{reactor} provides, plus
    L{IReactorPluggableNameResolver}; everything else is delegated. Hand it
    to L{HostnameEndpoint}, treq's C{Agent} or the SMTP client so that they
    resolve through our nameservers. (C{connectTCP} with a host name still
    goes to the wrapped reactor's resolver: connect through endpoints.)

    @param reactor: the reactor to wrap.
    @param name_resolver: an L{IHostnameResolver}, e.g. a
        L{DNSHostnameResolver}.
    @return: the proxy (typed as C{reactor}: it stands for it, by interface
        and by attribute).
    """
    proxy: Any = _ReactorWithResolver(reactor, name_resolver)  # it stands for the reactor
    return proxy
