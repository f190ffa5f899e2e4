"""
The metrics endpoint of C{twistd mtasts} (C{--metrics}): a deliberately
small HTTP/1.1 server that answers C{GET} and C{HEAD} with a registry in
the Prometheus text format, at every path, and nothing else.

It is a plain protocol rather than a twisted.web C{Site}, so that nothing
a client sends is kept beyond one bounded request head (twisted.web reads
every request body, and spools one over 100 kB to a temporary file):

  - C{GET} and C{HEAD} only (C{405} otherwise); a request that announces a
    body (C{Content-Length} other than 0, or any C{Transfer-Encoding}) is
    refused with C{413}.  Either answer closes the connection at once: the
    body is never read, let alone stored.
  - The request head (request line and headers) is capped
    (L{MetricsLimits.max_head}, C{431} and close); so is the input held
    while pipelined requests wait (L{MetricsLimits.max_input}).
  - Connections are capped (L{MetricsLimits.max_connections}); beyond the
    cap a new one is closed on accept.
  - Buffered output is bounded: the protocol is the transport's streaming
    producer, so when the transport holds more unsent output than its
    buffer (64 KiB for TCP) it stops reading and answering pipelined
    requests until the client has read; a connection's unsent output stays
    within one transport buffer and one response.
  - A connection that completes no request for
    L{MetricsLimits.idle_timeout} seconds (30) is aborted; bytes of a
    request that never completes are not activity, and neither is a client
    that stops reading.
  - No log line per scrape, unless asked (C{log_requests}).
"""

from __future__ import annotations

import re
from typing import Protocol as TypingProtocol
from typing import cast

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["MetricsFactory", "MetricsLimits", "MetricsProtocol"]

log = Logger()

#: The end of a request head: an empty line (CRLF, or a bare LF, RFC 9112 §2.2).
_HEAD_END = re.compile(rb"\r?\n\r?\n")
#: RFC 9112 §2.2: empty lines before a request line are ignored.
_EMPTY_LINES = re.compile(rb"[\r\n]*")
#: RFC 9112 §3: request-line = method SP request-target SP HTTP-version.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/1\.([01])")

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}


@attrs.frozen
class MetricsLimits:
    """
    The limits of the metrics endpoint (README, "Limits").

    @ivar max_connections: connections open at once; beyond, a new one is
        closed on accept.  A Prometheus server keeps one per target.
    @ivar idle_timeout: seconds a connection may go without completing a
        request before it is aborted.
    @ivar max_head: bytes of one request head (request line and headers).
    @ivar max_headers: header fields of one request.
    @ivar max_input: bytes of received, unanswered input held while the
        client does not read its answers (pipelined requests); beyond, the
        connection is aborted.  The transport reads 64 KiB at a time and
        stops reading while its output is full, so a well-behaved
        transport never gets here.
    """

    max_connections: int = 32
    idle_timeout: float = 30.0
    max_head: int = 8192
    max_headers: int = 64
    max_input: int = 131072


class _Connection(TypingProtocol):
    """What the endpoint uses of its transport: a TCP (or TLS) connection, a consumer and a producer."""

    def write(self, data: bytes) -> None:
        """Send C{data}."""

    def getPeer(self) -> IAddress:
        """The client's address."""

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        """Have the transport pause and resume C{producer} as its output fills and drains."""

    def unregisterProducer(self) -> None:
        """Undo L{registerProducer}."""

    def pauseProducing(self) -> None:
        """Stop reading."""

    def resumeProducing(self) -> None:
        """Read again."""

    def loseConnection(self) -> None:
        """Close once what is written has been sent."""

    def abortConnection(self) -> None:
        """Close now, dropping what is unsent."""


@implementer(IPushProducer)
class MetricsProtocol(Protocol):
    """
    One connection to the metrics endpoint (see the module docstring).

    It registers itself as the transport's streaming producer: the
    transport pauses it when its output buffer is full, and it then stops
    reading (and answering) until the transport resumes it.
    """

    factory: MetricsFactory

    def __init__(self, factory: MetricsFactory) -> None:
        """
        @param factory: the L{MetricsFactory} (registry, clock, limits).
        """
        self.factory = factory
        self._buffer = b""
        self._paused = False
        self._closing = False
        self._timer: IDelayedCall | None = None

    @property
    def _connection(self) -> _Connection:
        # While connected, the transport is a TCP (or TLS) connection.
        return cast(_Connection, self.transport)

    def connectionMade(self) -> None:
        """Count the connection, become the transport's producer, start the idle timer."""
        self.factory.connections += 1
        self._connection.registerProducer(self, True)
        self._restart_timer()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Uncount the connection; stop the timer."""
        self.factory.connections -= 1
        self._closing = True
        self._buffer = b""
        self._stop_timer()

    def dataReceived(self, data: bytes) -> None:
        """Take C{data} and answer every complete request (until paused)."""
        if self._closing:
            return
        self._buffer += data
        self._serve()

    # IPushProducer, called by the transport.

    def pauseProducing(self) -> None:
        """The transport's output is full: stop reading and answering."""
        if not self._paused and not self._closing:
            self._paused = True
            self._connection.pauseProducing()

    def resumeProducing(self) -> None:
        """The transport's output has drained: read and answer again."""
        if self._paused and not self._closing:
            self._paused = False
            self._connection.resumeProducing()
            self._serve()

    def stopProducing(self) -> None:
        """The connection is going away."""
        self._closing = True

    # Requests.

    def _serve(self) -> None:
        limits = self.factory.limits
        buffer, start = self._buffer, 0
        try:
            while not self._paused and not self._closing:
                start = _EMPTY_LINES.match(buffer, start).end()  # type: ignore[union-attr]  # always matches
                end = _HEAD_END.search(buffer, start, start + limits.max_head + 4)
                if end is None or end.start() - start > limits.max_head:
                    if len(buffer) - start > limits.max_head:
                        self._refuse(431, b"request head too large\n")
                    return
                head, start = buffer[start:end.start()], end.end()
                self._request(head)
        finally:
            if not self._closing:
                self._buffer = buffer[start:]
        if len(self._buffer) > limits.max_input:
            self._abort()

    def _request(self, head: bytes) -> None:
        request_line, *lines = head.replace(b"\r\n", b"\n").split(b"\n")
        match = _REQUEST_LINE.fullmatch(request_line)
        if match is None:
            self._refuse(400, b"not an HTTP/1.x request\n")
            return
        method, target, minor = match.group(1), match.group(2), match.group(3)
        if len(lines) > self.factory.limits.max_headers:
            self._refuse(431, b"too many header fields\n")
            return
        headers: dict[bytes, bytes] = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                self._refuse(400, b"malformed header field\n")
                return
            headers[name.lower()] = value.strip()
        if method not in (b"GET", b"HEAD"):
            self._refuse(405, b"only GET and HEAD\n", [b"Allow: GET, HEAD"])
            return
        if b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0":
            self._refuse(413, b"a request to this endpoint has no body\n")
            return
        tokens = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
        close = minor == b"0" or b"close" in tokens
        try:
            body = generate_latest(self.factory.registry)
        except Exception:
            log.failure("metrics: cannot collect the metrics")
            self._refuse(500, b"cannot collect the metrics\n")
            return
        if self.factory.log_requests:
            log.info("metrics: {method} {target} from {peer}: 200, {size} bytes",
                     method=method.decode("ascii"), target=target.decode("ascii", "replace"),
                     peer=str(self._connection.getPeer()), size=len(body))
        self._restart_timer()
        self._respond(200, [b"Content-Type: " + CONTENT_TYPE_LATEST.encode("ascii")], body,
                      send_body=method == b"GET", close=close)

    def _respond(self, code: int, headers: list[bytes], body: bytes, send_body: bool = True,
                 close: bool = False) -> None:
        lines = [b"HTTP/1.1 %d %s" % (code, _REASONS[code]), *headers, b"Content-Length: %d" % len(body)]
        if close:
            lines.append(b"Connection: close")
        self._connection.write(b"\r\n".join(lines) + b"\r\n\r\n" + (body if send_body else b""))
        if close:
            self._close()

    def _refuse(self, code: int, text: bytes, headers: list[bytes] | None = None) -> None:
        """Answer C{code} and close, reading nothing more (a body included)."""
        if self.factory.log_requests:
            log.info("metrics: refused a request from {peer}: {code}", peer=str(self._connection.getPeer()),
                     code=code)
        self._respond(code, [*(headers or []), b"Content-Type: text/plain"], text, close=True)

    def _close(self) -> None:
        """Close once the answer is written; abort if it is not read within the idle timeout."""
        self._closing = True
        self._buffer = b""
        self._connection.unregisterProducer()
        self._connection.loseConnection()
        self._restart_timer()

    def _abort(self) -> None:
        self._closing = True
        self._buffer = b""
        self._stop_timer()
        self._connection.abortConnection()

    # The idle timer.

    def _restart_timer(self) -> None:
        self._stop_timer()
        self._timer = self.factory.clock.callLater(self.factory.limits.idle_timeout, self._timed_out)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timed_out(self) -> None:
        self._timer = None
        self._abort()


class MetricsFactory(Factory[MetricsProtocol]):
    """
    Serves a Prometheus registry over HTTP within L{MetricsLimits}.

    @ivar registry: the C{CollectorRegistry} served.
    @ivar clock: the reactor's time (idle timeouts).
    @ivar limits: the L{MetricsLimits}.
    @ivar log_requests: log one line per request (off by default: a
        Prometheus server scrapes every few seconds).
    @ivar connections: connections open now.
    """

    noisy = False

    def __init__(self, registry: CollectorRegistry, clock: IReactorTime,
                 limits: MetricsLimits = MetricsLimits(), log_requests: bool = False) -> None:
        """
        @param registry: the registry to serve.
        @param clock: the reactor's time.
        @param limits: the limits.
        @param log_requests: log one line per request.
        """
        self.registry = registry
        self.clock = clock
        self.limits = limits
        self.log_requests = log_requests
        self.connections = 0

    def logPrefix(self) -> str:
        """Name the endpoint in the port's log lines."""
        return "mtasts metrics"

    def buildProtocol(self, addr: IAddress | None) -> MetricsProtocol | None:
        """A L{MetricsProtocol}, or L{None} (closed on accept) beyond the connection cap."""
        if self.connections >= self.limits.max_connections:
            return None
        return MetricsProtocol(self)
