"""
One Postfix socketmap connection: netstring requests in, answers out in
request order (requests may be pipelined), the idle timeouts, the bounds
on what is held for a client, and L{ImmediateWriter}, which sends a small
answer on the socket at once.

The connection asks a L{Responder} (the L{SocketmapFactory
<mtasts_twisted.socketmap.server.SocketmapFactory>}) for each answer.  A
malformed request gets a C{PERM} answer from the responder and the
connection goes on; only a broken netstring (bad length, missing comma,
longer than C{max_request}) closes it, after the requests before the
breakage are answered.

What a client can make us hold is bounded (issue 17: a client pipelining
requests without reading its answers grew the process by hundreds of MiB):

  - the connection is its transport's streaming producer: when more than
    the transport's buffer bound (64 KiB for Twisted's socket transports)
    waits to be sent, the transport pauses it and it stops reading; the
    requests already read are held and answered when the transport has sent
    everything and resumes it;
  - the answers of one read are written in chunks of at most
    L{WRITE_CHUNK} bytes, so one read of small requests with large answers
    cannot pass the bound by more than one chunk;
  - at most C{max_pipeline} answers wait for lookups; then reading stops
    until they have gone out;
  - the idle timeouts abort the connection (a close would wait for ever for
    answers a client does not read).

Answers of one read go out in one write (in L{WRITE_CHUNK} pieces if
larger), those that waited for lookups included (written when the last of
them arrives), and accepted TCP sockets
have C{TCP_NODELAY}: a second small segment is never held back by Nagle's
algorithm waiting for the client's delayed ACK (issue 17: 44 ms per
pipelined pair).
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol as TypingProtocol
from typing import cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from mtasts_twisted.socketmap.netstring import NetstringDecoder, NetstringError
from mtasts_twisted.socketmap.settings import SocketmapSettings

__all__ = ["WRITE_CHUNK", "ImmediateWriter", "Responder", "SocketmapProtocol"]

#: The most answer bytes a read's answers add to the transport's buffer in
#: one write; the transport then pauses the connection if its bound is passed.
WRITE_CHUNK = 16384


class Responder(TypingProtocol):
    """
    What a L{SocketmapProtocol} needs from its factory.

    @ivar settings: the L{SocketmapSettings} (C{max_request},
        C{idle_timeout}, C{first_request_timeout}, C{max_pipeline}).
    @ivar clock: the C{IReactorTime} for the idle timeouts.
    @ivar counts: counters by name; a connection adds to C{broken} and
        C{idle}.
    """

    settings: SocketmapSettings
    clock: IReactorTime
    counts: dict[str, int]

    def respond(self, request: bytes) -> bytes | Deferred[bytes]:
        """The framed answer to one request payload, or a L{Deferred} firing with it (never failing)."""

    def connection_opened(self, connection: SocketmapProtocol) -> None:
        """C{connection} is made."""

    def connection_active(self, connection: SocketmapProtocol) -> None:
        """C{connection} has sent its first complete request."""

    def connection_closed(self, connection: SocketmapProtocol) -> None:
        """C{connection} is lost."""


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


class _Batch:
    """
    The answers to the requests served in one pass (one read, or the
    requests held from one): written together once none is missing.

    @ivar parts: the framed answers in request order; C{b""} where an
        answer still waits for a lookup.
    @ivar missing: how many still wait.
    """

    __slots__ = ("missing", "parts")

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.missing = 0


@implementer(IPushProducer)
class SocketmapProtocol(Protocol):
    """
    One Postfix socketmap connection: netstring requests in, answers out in
    request order, even when an earlier answer waits for a lookup and a
    later one is immediate.

    It is its transport's streaming producer (L{IPushProducer}): the
    transport pauses it while too many answer bytes wait to be sent.

    @ivar factory: the L{Responder} (a L{SocketmapFactory
        <mtasts_twisted.socketmap.server.SocketmapFactory>}) that does the
        lookups.
    @ivar client: the client's key for the per-client cap (its IP
        address), or L{None}.
    """

    def __init__(self, factory: Responder, client: Hashable | None = None) -> None:
        """
        @param factory: the L{Responder} serving this connection.
        @param client: the client's IP address, if it has one.
        """
        self.factory = factory
        self.client = client
        settings = factory.settings
        self._decoder = NetstringDecoder(settings.max_request)
        # Batches waiting for a lookup, in order; the first one is incomplete.
        self._queue: deque[_Batch] = deque()
        self._waiting = 0  # answers in queued batches
        self._max_pipeline = settings.max_pipeline
        self._held: list[bytes] = []  # requests read and not served: reading is paused
        self._blocked = False  # the transport has paused us: its buffer is over its bound
        self._paused = False  # we have paused the transport's reading
        self._registered = False
        self._seen = False  # has a complete request arrived?
        self._closing = False
        self._aborted = False
        self._lost = False
        self._clock = factory.clock
        idle = settings.idle_timeout or None
        first = settings.first_request_timeout or None
        if first is None or (idle is not None and idle < first):
            first = idle  # the shorter one applies
        self._idle_timeout = idle
        self._first_timeout = first
        self._timed = first is not None
        self._timer: IDelayedCall | None = None
        self._last = 0.0
        # Set by connectionMade: the connection's transport, and its writer.
        self._connection: ITransport
        self._write: Callable[[bytes], None]

    @property
    def busy(self) -> bool:
        """Is a lookup in flight for this connection?"""
        return bool(self._queue)

    @property
    def closable(self) -> bool:
        """May it be closed to make room at a cap: no lookup in flight, and not closing already?"""
        return not (self._queue or self._aborted or self._lost)

    @property
    def held_bytes(self) -> int:
        """Bytes of requests read and not answered yet: the held requests and a partial one."""
        return sum(map(len, self._held)) + self._decoder.buffered

    def connectionMade(self) -> None:
        """Set C{TCP_NODELAY}, become the transport's producer, count the connection, start the idle timer."""
        transport = self.transport
        assert transport is not None
        self._connection = transport
        self._write = ImmediateWriter(transport).write
        if ITCPTransport.providedBy(transport):
            try:
                transport.setTcpNoDelay(True)
            except OSError:
                pass  # already reset: the transport finds out itself
        if IConsumer.providedBy(transport):
            transport.registerProducer(self, True)
            self._registered = True
        self.factory.connection_opened(self)
        if self._first_timeout is not None:
            self._last = self._clock.seconds()
            self._timer = self._clock.callLater(self._first_timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        """Answer every complete request in C{data}, in order (or hold them while paused)."""
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
        if frames:
            if self._timed:
                # Only complete requests are activity: a client trickling a
                # partial request (slowloris) is idle and closed on time.
                self._last = self._clock.seconds()
            if not self._seen:
                self._seen = True
                self.factory.connection_active(self)
            if self._paused:
                # Data read before the pause took effect: served in order
                # when the bounds allow (L{_continue}).
                self._held.extend(frames)
            elif len(frames) == 1 and not self._queue:
                # Postfix asks one thing at a time: the hot path.
                answer = self.factory.respond(frames[0])
                if isinstance(answer, bytes):
                    self._write(answer)
                else:
                    self._wait_for(answer)
            else:
                self._serve(frames)
        if self._closing:
            self._pause()  # do not read the rest
            self._close_when_done()

    def _serve(self, frames: list[bytes]) -> None:
        """
        Answer C{frames} in order: immediate answers are written at once
        (in chunks), a pass with answers waiting for lookups is queued and
        written as a whole.  Stops, holding the rest, when the transport is
        over its bound or C{max_pipeline} answers wait.
        """
        respond = self.factory.respond
        out: list[bytes] = []
        batch: _Batch | None = None
        size = 0
        waiting = bool(self._queue)
        room = self._max_pipeline - self._waiting
        for index, frame in enumerate(frames, 1):
            answer = respond(frame)
            if isinstance(answer, bytes):
                out.append(answer)
                size += len(answer)
                if size < WRITE_CHUNK and not waiting:
                    continue
            else:
                if batch is None:
                    batch = _Batch(out)
                    waiting = True
                batch.missing += 1
                out.append(b"")
                answer.addCallback(self._fill, batch, len(out) - 1)
            if size >= WRITE_CHUNK or len(out) >= room:
                self._emit(out, batch)
                if self._aborted or self._lost:
                    return
                out = []
                batch = None
                size = 0
                waiting = bool(self._queue)
                room = self._max_pipeline - self._waiting
                if self._blocked or (waiting and room <= 0):
                    self._held = frames[index:]
                    self._pause()
                    return
        if out:
            if batch is None and not self._queue:
                self._write(out[0] if len(out) == 1 else b"".join(out))
            else:
                self._emit(out, batch)
                if self._waiting >= self._max_pipeline:
                    self._pause()

    def _wait_for(self, answer: Deferred[bytes]) -> None:
        """Queue the one answer of a read, which waits for a lookup."""
        parts = [b""]
        batch = _Batch(parts)
        batch.missing = 1
        answer.addCallback(self._fill, batch, 0)
        self._emit(parts, batch)

    def _emit(self, out: list[bytes], batch: _Batch | None) -> None:
        """Write C{out} now, or queue it behind answers that wait."""
        queue = self._queue
        if batch is None or not batch.missing:
            if not queue:
                self._write(out[0] if len(out) == 1 else b"".join(out))
                return
            if batch is None:
                batch = _Batch(out)
        queue.append(batch)
        self._waiting += len(out)

    def _fill(self, frame: bytes, batch: _Batch, index: int) -> None:
        batch.parts[index] = frame
        batch.missing -= 1
        if batch.missing or self._lost or self._aborted:
            return
        queue = self._queue
        if queue and queue[0] is batch:
            self._flush()
        # else: not queued yet (fired while being served) or behind an incomplete batch

    def _flush(self) -> None:
        """Write the complete batches at the head of the queue, in one write; then go on."""
        queue = self._queue
        parts: list[bytes] = []
        while queue and not queue[0].missing:
            parts.extend(queue.popleft().parts)
        if parts:
            self._waiting -= len(parts)
            if self._timed:
                self._last = self._clock.seconds()
            self._write(parts[0] if len(parts) == 1 else b"".join(parts))
        self._continue()

    def _continue(self) -> None:
        """Serve the held requests and read again, as far as the bounds allow; close when done."""
        if self._lost or self._aborted:
            return
        if self._held and not self._blocked and self._waiting < self._max_pipeline:
            held = self._held
            self._held = []
            self._serve(held)
        if not (self._held or self._blocked or self._closing) and self._waiting < self._max_pipeline:
            self._resume()
        if self._closing:
            self._close_when_done()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            cast(IPushProducer, self._connection).pauseProducing()  # socket transports are push producers

    def _resume(self) -> None:
        if self._paused and not self._closing:
            self._paused = False
            cast(IPushProducer, self._connection).resumeProducing()

    # --- IPushProducer: the transport's buffer ----------------------------------------

    def pauseProducing(self) -> None:
        """The transport holds more than its bound: stop reading."""
        self._blocked = True
        self._pause()

    def resumeProducing(self) -> None:
        """The transport has sent everything: serve the held requests, read again."""
        self._blocked = False
        self._continue()

    def stopProducing(self) -> None:
        """The connection is lost (L{connectionLost} follows)."""

    # --- closing ------------------------------------------------------------------

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            # A paused producer would keep loseConnection waiting.
            cast(IConsumer, self._connection).unregisterProducer()

    def _close_when_done(self) -> None:
        if self._queue or self._held or self._lost or self._aborted:
            return
        self._unregister()
        self._connection.loseConnection()

    def abort(self) -> None:
        """Close the connection now, dropping answers not sent yet."""
        if self._lost or self._aborted:
            return
        self._aborted = True
        self._unregister()
        abort = getattr(self._connection, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self._connection.loseConnection()

    def _check_idle(self) -> None:
        self._timer = None
        if self._lost or self._aborted:
            return
        timeout = self._idle_timeout if self._seen else self._first_timeout
        if timeout is None:
            return  # active, and no idle timeout
        idle = self._clock.seconds() - self._last
        if self._queue:
            idle = 0.0  # Postfix is waiting for an answer: not idle
        if idle >= timeout:
            self.factory.counts["idle"] += 1
            # Aborted: a client that does not read would keep a close waiting.
            self.abort()
            return
        self._timer = self._clock.callLater(timeout - idle, self._check_idle)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Forget pending answers and held requests, stop the timer, uncount the connection."""
        self._lost = True
        self._closing = True
        self._registered = False
        self._queue.clear()
        self._held = []
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.connection_closed(self)
