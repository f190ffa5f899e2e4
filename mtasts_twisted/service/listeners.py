"""
The listeners of C{twistd mtasts}: bound while privileged, serving once
the service is ready.

L{ListenerService} listens on one endpoint in C{privilegedStartService}
(so C{twistd -u/-g} drops privileges after binding) and reports a failure
to listen as one line (L{StartupError}); L{LateFactory} accepts connections
from the start but hands them to the real factory only once the store is
open and the components run.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from mtasts_twisted.service.runtime import StartupError

__all__ = ["LateFactory", "ListenerService", "address"]


class LateFactory(Factory[Any]):  # builds no protocol of its own
    """
    Listens from the start (so binding happens while privileged) and hands
    connections to the real factory once the service is ready; until then
    connections are closed (Postfix treats that as a temporary failure).

    @ivar name: the option name of the listener.
    @ivar factory: the real factory once set, else L{None}.
    """

    noisy = False

    def __init__(self, name: str) -> None:
        """
        @param name: the option name of the listener, for its log lines.
        """
        self.name = name
        self.factory: Factory[Any] | None = None

    def logPrefix(self) -> str:
        """Name the listener in the port's log lines."""
        return f"mtasts {self.name}"

    def set(self, factory: Factory[Any]) -> None:
        """Start serving with C{factory}."""
        factory.doStart()
        self.factory = factory

    def buildProtocol(self, addr: IAddress | None) -> IProtocol | None:
        """The real factory's protocol, or L{None} (close) before it is set."""
        if self.factory is None:
            return None
        return self.factory.buildProtocol(addr)

    def stopFactory(self) -> None:
        """Stop the real factory too."""
        if self.factory is not None:
            self.factory.doStop()


class ListenerService(Service):
    """
    Listens on one endpoint; like C{StreamServerEndpointService}, but a
    failure to listen is reported through L{listening} rather than logged
    with a traceback, so the parent can say it in one line.

    @ivar name: the option name (C{socketmap}, C{smtp}, C{metrics}).
    @ivar description: the endpoint description.
    @ivar port: the C{IListeningPort} once listening.
    """

    def __init__(self, name: str, description: str, endpoint: IStreamServerEndpoint,
                 factory: IProtocolFactory) -> None:
        """
        @param name: the option name, for messages.
        @param description: the endpoint string, for messages.
        @param endpoint: an C{IStreamServerEndpoint}.
        @param factory: the protocol factory.
        """
        self.setName(name)
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._outcome: IListeningPort | Failure | None = None

    def privilegedStartService(self) -> None:
        """Listen now (before twistd drops privileges)."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        """Listen, unless L{privilegedStartService} already did."""
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        self._listening = self.endpoint.listen(self.factory)

        def done(result: IListeningPort | Failure) -> None:
            self._outcome = result
            if not isinstance(result, Failure):
                self.port = result

        self._listening.addBoth(done)

    def listening(self) -> Deferred[IListeningPort | None]:
        """
        @return: L{Deferred} firing with the listening port, or failing with
            L{StartupError} naming the endpoint and the reason.
        """
        return Deferred.fromCoroutine(self._wait())

    async def _wait(self) -> IListeningPort | None:
        if self._outcome is None and self._listening is not None:
            waiter: Deferred[None] = Deferred()

            def fired(result: object) -> object:
                waiter.callback(None)
                return result

            self._listening.addBoth(fired)
            await waiter
        if isinstance(self._outcome, Failure):
            error = self._outcome.value
            reason = getattr(error, "socketError", None) or error
            raise StartupError(f"cannot listen on --{self.name} {self.description}: {reason}")
        return self._outcome

    def stopService(self) -> Deferred[None] | None:
        """Stop listening."""
        super().stopService()
        port, self.port = self.port, None
        self._listening = None
        self._outcome = None
        if port is not None:
            return port.stopListening()
        return None


def address(port: IListeningPort | None) -> str:
    """C{HOST:PORT} of a listening port, for the log."""
    assert port is not None, "not listening"
    host = port.getHost()
    return f"{getattr(host, 'host', host)}:{getattr(host, 'port', '')}"
