"""
A loopback HTTPS server for MTA-STS policy hosts, and a static host-name
resolver that points policy hosts at it.

The server listens on 127.0.0.1 on an ephemeral port, presents a certificate
per host chosen by the TLS SNI name the client sends (certificates come from
L{mtasts_twisted.testing.pki.PKI}), and answers each C{(host, path)} with a
configurable L{Route}: any status, content type and body, a redirect, a stall
before the headers or in the middle of the body, or an endless chunked body.
Every request is logged as a L{ServedRequest}, so tests can assert how often a
policy host was asked.

Typical use in a trial test::

    pki = PKI()
    server = PolicyServer(reactor, pki)
    server.start()
    self.addCleanup(server.stop)
    server.serve("mta-sts.example.com", Route.policy(POLICY_TEXT))
    resolver = StaticHostnameResolver({"mta-sts.example.com": "127.0.0.1"})
    fetcher = PolicyFetcher(reactor, trust_roots=pki.ca_pem,
                            name_resolver=resolver, port=server.port)
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IPullProducer,
)
from twisted.internet.ssl import TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from mtasts_twisted.testing.pki import PKI, IssuedCertificate
# StaticHostnameResolver is named here too, where the fetch tests have
# always found it.
from mtasts_twisted.testing.serving import (
    ConnectionTracker,
    StaticHostnameResolver,
    TCPServerReactor,
    abort_connection,
    port_number,
    stop_server,
)

__all__ = [
    "WELL_KNOWN_PATH",
    "StaticHostnameResolver",
    "Route",
    "ServedRequest",
    "PolicyServer",
]

#: RFC 8461 §3.3: the policy is served at this path of C{mta-sts.<domain>}.
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"


def _to_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _to_headers(value: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in value)


@attrs.frozen
class Route:
    """
    How the server answers one C{(host, path)}.

    @ivar status: the HTTP status code.
    @ivar body: the response body (text is encoded as UTF-8).
    @ivar content_type: the C{Content-Type} header, or L{None} for none.
    @ivar headers: extra response headers as C{(name, value)} pairs.
    @ivar stall: L{None} to answer normally; C{"headers"} to never send
        anything; C{"body"} to send the headers (with the full
        C{Content-Length}) and the first C{stall_after} bytes of C{body},
        then nothing more.
    @ivar stall_after: see C{stall}.
    @ivar reset: abort the connection when the request arrives (the client
        sees the connection reset before any answer).
    @ivar chunked: send C{body} with chunked transfer coding (no
        C{Content-Length}), in C{chunk_size} pieces.
    @ivar endless: if not L{None}, ignore C{body} and send chunked filler
        bytes until this many were sent or the client disconnects.
    @ivar chunk_size: piece size for C{chunked} and C{endless}.
    """

    status: int = 200
    body: bytes = attrs.field(default=b"", converter=_to_bytes)
    content_type: str | None = "text/plain"
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_to_headers)
    stall: str | None = attrs.field(
        default=None, validator=attrs.validators.in_([None, "headers", "body"])
    )
    stall_after: int = 0
    reset: bool = False
    chunked: bool = False
    endless: int | None = None
    chunk_size: int = 16384

    @classmethod
    def policy(cls, text: str | bytes, content_type: str = "text/plain") -> Route:
        """A C{200} answer with C{text} as the body."""
        return cls(body=text, content_type=content_type)

    @classmethod
    def status_only(cls, status: int, body: str | bytes = b"") -> Route:
        """An answer with C{status} and a short body."""
        return cls(status=status, body=body or f"status {status}\n")

    @classmethod
    def redirect(cls, location: str, status: int = 301) -> Route:
        """A redirect to C{location}."""
        return cls(status=status, body=b"moved\n", headers=[("Location", location)])

    @classmethod
    def stall_headers(cls) -> Route:
        """Accept the request and never answer."""
        return cls(stall="headers")

    @classmethod
    def stall_body(cls, body: str | bytes, after: int) -> Route:
        """Send the headers and C{after} bytes of C{body}, then stall."""
        return cls(body=body, stall="body", stall_after=after)

    @classmethod
    def reset_connection(cls) -> Route:
        """Abort the connection instead of answering."""
        return cls(reset=True)

    @classmethod
    def endless_body(cls, limit: int = 64 * 1024 * 1024) -> Route:
        """A C{200 text/plain} chunked body of up to C{limit} filler bytes."""
        return cls(endless=limit)


_NO_ROUTE = Route(status=404, body=b"no route for this host and path\n")


@attrs.define(eq=False)
class ServedRequest:
    """
    One request the server received, updated while its answer streams.

    @ivar host: the C{Host} header's name, lower case, without port.
    @ivar path: the request path (no query).
    @ivar method: the request method.
    @ivar servername: the TLS SNI name of the connection, or L{None}.
    @ivar headers: the request headers as C{(lower-case name, value)} pairs.
    @ivar body_bytes_sent: body bytes handed to the transport so far.
    @ivar client_disconnected: the connection went away before the answer
        was complete.
    @ivar finished: fires (with L{None}) when the answer completed or the
        connection was lost.
    """

    host: str
    path: str
    method: str
    servername: str | None
    headers: tuple[tuple[str, str], ...] = ()
    body_bytes_sent: int = 0
    client_disconnected: bool = False
    finished: Deferred[None] = attrs.field(factory=Deferred, repr=False)


@implementer(IPullProducer)
class _Filler:
    """Writes filler chunks to a request until a limit or disconnection."""

    def __init__(self, request: Request, served: ServedRequest, limit: int, size: int) -> None:
        self._request = request
        self._served = served
        self._limit = limit
        self._chunk = b"x" * size
        self._stopped = False

    def resumeProducing(self) -> None:
        if self._stopped:
            return
        remaining = self._limit - self._served.body_bytes_sent
        if remaining <= 0:
            self._stopped = True
            self._request.unregisterProducer()
            self._request.finish()
            return
        piece = self._chunk[:remaining]
        self._served.body_bytes_sent += len(piece)
        self._request.write(piece)

    def stopProducing(self) -> None:
        self._stopped = True


class _PolicyResource(Resource):
    isLeaf = True

    def __init__(self, server: PolicyServer) -> None:
        super().__init__()
        self._server = server

    def render(self, request: Request) -> bytes | int:
        host = (request.getRequestHostname() or b"").decode("ascii", "replace").lower()
        path = request.path.decode("ascii", "replace")
        method = request.method.decode("ascii", "replace")
        servername = None
        handle = getattr(request.channel.transport, "getHandle", None)
        if handle is not None:
            raw = handle().get_servername()
            servername = raw.decode("ascii", "replace") if raw else None
        served = ServedRequest(
            host=host,
            path=path,
            method=method,
            servername=servername,
            headers=tuple(
                (k.decode("latin-1").lower(), v.decode("latin-1"))
                for k, values in request.requestHeaders.getAllRawHeaders()
                for v in values
            ),
        )
        self._server._received(served)

        def done(result: object) -> None:
            if isinstance(result, Failure):
                served.client_disconnected = True
            served.finished.callback(None)

        request.notifyFinish().addBoth(done)

        route = self._server.route_for(host, path)
        request.setResponseCode(route.status)
        request.defaultContentType = None
        if route.content_type is not None:
            request.setHeader("Content-Type", route.content_type)
        for name, value in route.headers:
            request.setHeader(name, value)

        if route.reset:
            abort_connection(request.channel.transport)
            return NOT_DONE_YET
        if route.stall == "headers":
            return NOT_DONE_YET
        if route.endless is not None:
            request.registerProducer(
                _Filler(request, served, route.endless, route.chunk_size), False
            )
            return NOT_DONE_YET
        if route.stall == "body":
            request.setHeader("Content-Length", str(len(route.body)))
            prefix = route.body[: route.stall_after]
            served.body_bytes_sent += len(prefix)
            request.write(prefix)
            return NOT_DONE_YET
        if route.chunked:
            for start in range(0, len(route.body), route.chunk_size):
                piece = route.body[start : start + route.chunk_size]
                served.body_bytes_sent += len(piece)
                request.write(piece)
            request.finish()
            return NOT_DONE_YET
        served.body_bytes_sent += len(route.body)
        return route.body


# --- TLS with SNI ----------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class _SNICreator:
    """Server connections start on the default context; SNI may switch it."""

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


class PolicyServer:
    """
    An HTTPS server for any number of policy hosts on 127.0.0.1.

    Certificates are chosen by SNI: a host given to L{serve} presents its
    certificate (by default a valid one for that host from the trusted CA);
    connections without SNI, or naming an unknown host, get the default
    certificate (valid for C{policy-server.invalid}).

    @ivar port: the TCP port, once L{start} was called.
    @ivar requests: every L{ServedRequest}, in order.
    @ivar servernames: the SNI name of every TLS handshake (L{None} when the
        client sent none), in order, including failed handshakes.
    """

    def __init__(self, reactor: TCPServerReactor, pki: PKI, *, legacy_tls: bool = False) -> None:
        """
        @param reactor: an C{IReactorTCP} provider (see L{TCPServerReactor}).
        @param pki: issues the default and per-host certificates.
        @param legacy_tls: offer only TLS 1.0 and 1.1 (to test that clients
            refuse TLS < 1.2).
        """
        self._reactor = reactor
        self._pki = pki
        self._routes: dict[tuple[str, str], Route] = {}
        self._contexts: dict[str, SSL.Context] = {}
        self.requests: list[ServedRequest] = []
        self.servernames: list[str | None] = []
        self._waiting: list[Deferred[ServedRequest]] = []
        self.port: int = 0
        self._listening: IListeningPort | None = None
        self._tracker: ConnectionTracker | None = None

        self._legacy_tls = legacy_tls
        self._default_context = self._make_context(pki.valid("policy-server.invalid"))
        self._default_context.set_tlsext_servername_callback(self._on_servername)

    def _make_context(self, certificate: IssuedCertificate) -> SSL.Context:
        if not self._legacy_tls:
            return certificate.server_options().getContext()
        context = certificate.server_options(
            insecurelyLowerMinimumTo=TLSVersion.TLSv1_0,
            lowerMaximumSecurityTo=TLSVersion.TLSv1_1,
        ).getContext()
        # OpenSSL 3+ allows the SHA-1 based TLS < 1.2 only at security level
        # 0; every context SNI may switch to needs it.
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        return context

    def _on_servername(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace").lower() if raw else None
        self.servernames.append(name)
        context = self._contexts.get(name) if name else None
        if context is not None:
            connection.set_context(context)

    def start(self) -> int:
        """Listen on 127.0.0.1, on an ephemeral port; return the port."""
        site = Site(_PolicyResource(self), timeout=None)
        site.noisy = False
        tls = TLSMemoryBIOFactory(_SNICreator(self._default_context), False, site)
        tls.noisy = False
        self._tracker = ConnectionTracker(tls)
        self._tracker.noisy = False
        self._listening = self._reactor.listenTCP(0, self._tracker, interface="127.0.0.1")
        self.port = port_number(self._listening.getHost())
        return self.port

    def set_certificate(self, host: str, certificate: IssuedCertificate) -> None:
        """Present C{certificate} to clients that send SNI C{host}."""
        self._contexts[host.lower()] = self._make_context(certificate)

    def serve(
        self,
        host: str,
        route: Route,
        *,
        path: str = WELL_KNOWN_PATH,
        certificate: IssuedCertificate | None = None,
    ) -> None:
        """
        Answer requests for C{host} and C{path} with C{route}.

        @param certificate: the certificate for C{host}; by default the one
            set before, else a valid one from the trusted CA.
        """
        host = host.lower()
        if certificate is not None:
            self.set_certificate(host, certificate)
        elif host not in self._contexts:
            self.set_certificate(host, self._pki.valid(host))
        self._routes[(host, path)] = route

    def route_for(self, host: str, path: str) -> Route:
        """The route for C{(host, path)}: a C{404} when none was set."""
        return self._routes.get((host.lower(), path), _NO_ROUTE)

    def _received(self, served: ServedRequest) -> None:
        self.requests.append(served)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(served)

    def next_request(self) -> Deferred[ServedRequest]:
        """Fire with the next L{ServedRequest} the server receives."""
        d: Deferred[ServedRequest] = Deferred()
        self._waiting.append(d)
        return d

    def request_count(self, host: str | None = None, path: str | None = None) -> int:
        """How many requests named C{host} (any if L{None}) and C{path}."""
        return sum(
            1
            for r in self.requests
            if (host is None or r.host == host.lower()) and (path is None or r.path == path)
        )

    def stop(self) -> Deferred[None]:
        """
        Stop listening and abort every open connection.

        @return: a L{Deferred} that fires when the port is closed and every
            connection is gone.
        """
        listening, self._listening = self._listening, None
        return stop_server(listening, self._tracker)
