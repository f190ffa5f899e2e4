"""
One Postfix socketmap connection: netstring requests in, answers out in
request order (requests may be pipelined), the idle timeout, and
L{ImmediateWriter}, which sends a small answer on the socket at once.

The connection asks a L{Responder} (the L{SocketmapFactory
<mtasts_twisted.socketmap.server.SocketmapFactory>}) for each answer.  A
malformed request gets a C{PERM} answer from the responder and the
connection goes on; only a broken netstring (bad length, missing comma,
longer than C{max_request}) closes it, after the requests before the
breakage are answered.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol as TypingProtocol
from typing import cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ISystemHandle,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from mtasts_twisted.socketmap.netstring import NetstringDecoder, NetstringError
from mtasts_twisted.socketmap.settings import SocketmapSettings

__all__ = ["ImmediateWriter", "Responder", "SocketmapProtocol"]


class Responder(TypingProtocol):
    """
    What a L{SocketmapProtocol} needs from its factory.

    @ivar settings: the L{SocketmapSettings} (C{max_request},
        C{idle_timeout}).
    @ivar clock: the C{IReactorTime} for the idle timeout.
    @ivar connections: connections open now, counted by each connection.
    @ivar counts: counters by name; a connection adds to C{broken} and
        C{idle}.
    """

    settings: SocketmapSettings
    clock: IReactorTime
    connections: int
    counts: dict[str, int]

    def respond(self, request: bytes) -> bytes | Deferred[bytes]:
        """The framed answer to one request payload, or a L{Deferred} firing with it (never failing)."""


class ImmediateWriter:
    """
    Writes to a connection's socket at once while nothing is buffered.

    Twisted's socket transports buffer every C{write} and send it on the
    next reactor turn: two C{epoll_ctl} calls and a second dispatch per
    answer, about half of the CPU of a cached lookup.  A socketmap answer is
    small and Postfix waits for it, so this writer calls the socket's
    C{send} directly (the socket comes from the public
    L{ISystemHandle.getHandle}).  The first time the kernel does not take a
    whole answer (a partial send, C{EAGAIN}, or an error such as a reset),
    the rest goes to C{transport.write} and so does every later write on
    this connection: the transport's buffer then keeps the bytes in order,
    and the transport notices and reports a dead connection as usual.

    Used only on plain TCP and UNIX socket transports
    (L{FileDescriptor}s whose handle is a socket, without TLS); any other
    transport (a TLS wrapper, a test transport) is written to normally.
    Everything written on the connection must go through this writer.
    """

    __slots__ = ("_send", "_transport")

    def __init__(self, transport: ITransport, send: Callable[[bytes], int] | None = None) -> None:
        """
        @param transport: the connection's transport.
        @param send: the socket's C{send} (default: found on C{transport} if
            it is a plain socket transport); tests pass their own.
        """
        self._transport = transport
        if send is None and (
            isinstance(transport, FileDescriptor)
            and ISystemHandle.providedBy(transport)
            and not ISSLTransport.providedBy(transport)
        ):
            handle = transport.getHandle()
            if isinstance(handle, socket.socket):
                send = handle.send
        self._send = send

    @property
    def direct(self) -> bool:
        """Do writes still go straight to the socket?"""
        return self._send is not None

    def write(self, data: bytes) -> None:
        """Send C{data} now if the socket takes all of it, else via the transport."""
        send = self._send
        if send is not None:
            try:
                sent = send(data)
            except OSError:
                # BlockingIOError, or a dead connection: the transport gets the
                # bytes and finds out about the connection itself.
                sent = 0
            if sent == len(data):
                return
            self._send = None  # from now on the transport's buffer keeps the order
            data = data[sent:]
        self._transport.write(data)


class SocketmapProtocol(Protocol):
    """
    One Postfix socketmap connection: netstring requests in, answers out in
    request order, even when an earlier answer waits for a lookup and a
    later one is immediate.

    @ivar factory: the L{Responder} (a L{SocketmapFactory
        <mtasts_twisted.socketmap.server.SocketmapFactory>}) that does the
        lookups.
    """

    def __init__(self, factory: Responder) -> None:
        """
        @param factory: the L{Responder} serving this connection.
        """
        self.factory = factory
        self._decoder = NetstringDecoder(factory.settings.max_request)
        self._queue: deque[list[bytes | None]] = deque()
        self._closing = False
        self._lost = False
        self._clock = factory.clock
        self._timeout = factory.settings.idle_timeout
        self._timer: IDelayedCall | None = None
        self._last = 0.0
        # Set by connectionMade: the connection's transport, and its writer.
        self._connection: ITransport
        self._write: Callable[[bytes], None]

    def connectionMade(self) -> None:
        """Count the connection and start the idle timer."""
        transport = self.transport
        assert transport is not None
        self._connection = transport
        self._write = ImmediateWriter(transport).write
        self.factory.connections += 1
        if self._timeout:
            self._last = self._clock.seconds()
            self._timer = self._clock.callLater(self._timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        """Answer every complete request in C{data}, in order."""
        if self._closing:
            return
        try:
            frames = self._decoder.feed(data)
        except NetstringError as e:
            # A broken netstring cannot be resynchronised: answer what came
            # before it, then close.
            frames = e.frames
            self._closing = True
            self.factory.counts["broken"] += 1
            # Socket transports are push producers: stop reading the rest.
            cast(IPushProducer, self._connection).pauseProducing()
        if self._timeout and (frames or not self._decoder.buffered):
            # Only complete requests are activity: a client trickling a
            # partial request (slowloris) is idle and closed on time.
            self._last = self._clock.seconds()
        respond = self.factory.respond
        queue = self._queue
        out: list[bytes] = []
        for frame in frames:
            answer = respond(frame)
            if isinstance(answer, bytes):
                if queue:
                    queue.append([answer])
                else:
                    out.append(answer)
            else:
                if out:
                    # Earlier answers go out first, should this one fire at once.
                    self._write(b"".join(out))
                    out = []
                slot: list[bytes | None] = [None]
                queue.append(slot)
                answer.addCallback(self._fill, slot)
        if out:
            self._write(out[0] if len(out) == 1 else b"".join(out))
        if self._closing and not queue:
            self._connection.loseConnection()

    def _fill(self, frame: bytes, slot: list[bytes | None]) -> None:
        slot[0] = frame
        if self._lost:
            return
        queue = self._queue
        out: list[bytes] = []
        while queue and queue[0][0] is not None:
            out.append(cast(bytes, queue.popleft()[0]))
        if out:
            if self._timeout:
                self._last = self._clock.seconds()
            self._write(b"".join(out))
        if self._closing and not queue:
            self._connection.loseConnection()

    def _check_idle(self) -> None:
        self._timer = None
        if self._lost:
            return
        timeout = self._timeout
        assert timeout
        idle = self._clock.seconds() - self._last
        if self._queue:
            idle = 0.0  # Postfix is waiting for an answer: not idle
        if idle >= timeout:
            self.factory.counts["idle"] += 1
            self._connection.loseConnection()
            return
        self._timer = self._clock.callLater(timeout - idle, self._check_idle)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Forget pending answers, stop the timer, uncount the connection."""
        self._lost = True
        self._closing = True
        self._queue.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.connections -= 1
