"""
Clients the tests share: a raw TCP client for our own listeners (SMTP
intake, socketmap), and twisted.mail's ESMTP sender that says when its
connection is gone.
"""

from __future__ import annotations

import re

from twisted.internet import reactor
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.mail import smtp
from twisted.python.failure import Failure


class RawClient(Protocol):
    """Collects what the server sends; writes what the test says."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for item in list(self._waiting):
            match = item[0].search(self.data)
            if match:
                self._waiting.remove(item)
                item[1].callback(match)

    def connectionLost(self, reason: Failure) -> None:
        for _, d in self._waiting:
            d.errback(AssertionError(f"closed before the expected reply; got {self.data!r}"))
        self._waiting = []
        self.closed.callback(None)

    def expect(self, pattern: bytes, timeout: float = 5) -> Deferred[re.Match[bytes]]:
        compiled = re.compile(pattern, re.MULTILINE)
        d: Deferred[re.Match[bytes]] = Deferred()
        match = compiled.search(self.data)
        if match:
            d.callback(match)
        else:
            self._waiting.append((compiled, d))
        return d.addTimeout(timeout, reactor)

    def send(self, data: bytes) -> None:
        self.transport.write(data)


class ClosingSenderFactory(smtp.ESMTPSenderFactory):
    """twisted.mail's C{ESMTPSenderFactory} that also says when its connection is gone."""

    domain = b"client.test"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed: Deferred[None] = Deferred()

    def clientConnectionLost(self, connector: Any, err: Failure) -> None:
        super().clientConnectionLost(connector, err)
        self.closed.callback(None)

    clientConnectionFailed = clientConnectionLost
