"""
Tests for L{mtasts_twisted.fetch} (RFC 8461 §3.3) against the loopback HTTPS
policy server of L{mtasts_twisted.testing.https}: real sockets, real TLS.
"""

from __future__ import annotations

import time

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IOpenSSLClientConnectionCreator,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtasts_twisted.fetch import (
    MAX_POLICY_SIZE,
    FetchedPolicy,
    FetchTimeoutError,
    InvalidPolicyError,
    NoPolicyServedError,
    PolicyCertificateError,
    PolicyFetcher,
    PolicyFetchError,
    PolicyTooLargeError,
    WrongContentTypeError,
    fetch_policy,
    policy_url,
)
from mtasts_twisted.pkix import classify_verify_error, load_trust_roots
from mtasts_twisted.policy import DomainError, Mode
from mtasts_twisted.results import ResultType
from mtasts_twisted.testing.https import (
    WELL_KNOWN_PATH,
    PolicyServer,
    Route,
    StaticHostnameResolver,
)
from mtasts_twisted.testing.pki import PKI
from tests.vectors import load_vectors

POLICY = (
    "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.mx.example.com\nmax_age: 86400\n"
)
FETCH_ERROR = ResultType.STS_POLICY_FETCH_ERROR

_pki: PKI | None = None


def shared_pki() -> PKI:
    """One PKI for the module: making CAs is the slow part."""
    global _pki
    if _pki is None:
        _pki = PKI()
    return _pki


class _LoopbackMixin:
    """A policy server and a resolver pointing policy hosts at it."""

    timeout_seconds = 5.0

    def start_server(self, **kwargs) -> PolicyServer:
        server = PolicyServer(reactor, self.pki, **kwargs)
        server.start()
        self.addCleanup(server.stop)
        return server

    def setUp(self) -> None:
        self.pki = shared_pki()
        self.server = self.start_server()
        self.resolver = StaticHostnameResolver()

    def serve(self, domain: str, route: Route, server: PolicyServer | None = None, **kwargs) -> str:
        """Serve C{route} as the policy of C{domain}; return the policy host."""
        host = f"mta-sts.{domain}"
        self.resolver.add(host, "127.0.0.1")
        (server or self.server).serve(host, route, **kwargs)
        return host

    def fetcher(self, server: PolicyServer | None = None, **kwargs) -> PolicyFetcher:
        kwargs.setdefault("trust_roots", self.pki.ca_pem)
        kwargs.setdefault("timeout", self.timeout_seconds)
        return PolicyFetcher(
            reactor, name_resolver=self.resolver, port=(server or self.server).port, **kwargs
        )

    async def fetch_error(self, domain: str, error_type: type, **kwargs) -> PolicyFetchError:
        """Fetch C{domain}'s policy, expecting it to fail with C{error_type}."""
        try:
            result = await self.fetcher(**kwargs).fetch(domain)
        except PolicyFetchError as e:
            self.assertIsInstance(e, error_type)
            self.assertIn(policy_url(domain), str(e))
            self.assertIn(e.detail, str(e))
            return e
        self.fail(f"fetch of {domain} succeeded: {result!r}")


class FetchSuccessTests(_LoopbackMixin, TestCase):
    """A policy served by the rules is returned, parsed."""

    async def test_policy(self) -> None:
        self.serve("example.com", Route.policy(POLICY))
        result = await self.fetcher().fetch("example.com")
        self.assertIsInstance(result, FetchedPolicy)
        self.assertEqual(result.text, POLICY)
        self.assertEqual(result.policy.mode, Mode.ENFORCE)
        self.assertEqual(result.policy.mx, ("mx1.example.com", "*.mx.example.com"))
        self.assertEqual(result.policy.max_age, 86400)
        self.assertEqual(self.server.request_count("mta-sts.example.com", WELL_KNOWN_PATH), 1)
        request = self.server.requests[0]
        self.assertEqual(request.method, "GET")
        headers = dict(request.headers)
        self.assertEqual(headers["host"], "mta-sts.example.com")
        # One request per connection, the text as served (RFC 9110 §12.5.3:
        # without Accept-Encoding any coding would be acceptable).
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(headers["accept-encoding"], "identity")
        self.assertTrue(headers["user-agent"].startswith("mtasts-twisted/"))

    async def test_content_type_parameters(self) -> None:
        """C{text/plain} with parameters, in any case, is accepted."""
        for n, content_type in enumerate(
            ["text/plain; charset=utf-8", "TEXT/Plain;charset=UTF-8", "text/plain ; format=flowed"]
        ):
            self.serve(f"d{n}.example", Route.policy(POLICY, content_type=content_type))
            result = await self.fetcher().fetch(f"d{n}.example")
            self.assertEqual(result.policy.mode, Mode.ENFORCE, content_type)

    async def test_sni(self) -> None:
        """The policy host's name is sent as SNI."""
        self.serve("example.com", Route.policy(POLICY))
        await self.fetcher().fetch("example.com")
        self.assertEqual(self.server.servernames, ["mta-sts.example.com"])
        self.assertEqual(self.server.requests[0].servername, "mta-sts.example.com")

    async def test_idn_and_case(self) -> None:
        """The URL uses the lower-case A-label form of the domain."""
        host = self.serve("xn--bcher-kva.example", Route.policy(POLICY))
        await self.fetcher().fetch("Bücher.EXAMPLE.")
        self.assertEqual(self.server.requests[0].host, host)
        self.assertEqual(self.server.servernames, [host])
        self.assertEqual(
            policy_url("Bücher.Example"),
            "https://mta-sts.xn--bcher-kva.example/.well-known/mta-sts.txt",
        )

    async def test_no_caching(self) -> None:
        """Each fetch makes exactly one request; nothing is cached."""
        self.serve("example.com", Route.policy(POLICY))
        fetcher = self.fetcher()
        await fetcher.fetch("example.com")
        self.assertEqual(self.server.request_count("mta-sts.example.com"), 1)
        self.server.serve("mta-sts.example.com", Route.policy(POLICY.replace("enforce", "testing")))
        result = await fetcher.fetch("example.com")
        self.assertEqual(result.policy.mode, Mode.TESTING)
        self.assertEqual(self.server.request_count("mta-sts.example.com"), 2)
        self.assertNotIn("cookie", dict(self.server.requests[1].headers))

    async def test_exactly_max_size(self) -> None:
        """A body of exactly 65536 bytes is accepted, with or without length."""
        text = POLICY + "\n" * (MAX_POLICY_SIZE - len(POLICY))
        self.assertEqual(len(text.encode()), MAX_POLICY_SIZE)
        self.serve("a.example", Route.policy(text))
        self.serve("b.example", Route(body=text, chunked=True, chunk_size=4000))
        for domain in ("a.example", "b.example"):
            result = await self.fetcher().fetch(domain)
            self.assertEqual(result.policy.mode, Mode.ENFORCE)
            self.assertEqual(len(result.text), MAX_POLICY_SIZE)

    async def test_ca_file_path(self) -> None:
        """Trust roots may be given as the path of a PEM file (C{--ca-file})."""
        path = self.pki.write_ca_file(self.mktemp())
        self.serve("example.com", Route.policy(POLICY))
        result = await self.fetcher(trust_roots=path).fetch("example.com")
        self.assertEqual(result.policy.mode, Mode.ENFORCE)

    async def test_module_function(self) -> None:
        self.serve("example.com", Route.policy(POLICY))
        result = await fetch_policy(
            reactor,
            "example.com",
            trust_roots=self.pki.trust_root(),
            timeout=5,
            name_resolver=self.resolver,
            port=self.server.port,
        )
        self.assertEqual(result.policy.mode, Mode.ENFORCE)


class FetchHTTPFailureTests(_LoopbackMixin, TestCase):
    """HTTP-level failures are classified per docs/design.rst."""

    async def test_not_found(self) -> None:
        self.serve("example.com", Route.status_only(404))
        e = await self.fetch_error("example.com", NoPolicyServedError)
        self.assertEqual((e.result_type, e.reason), (FETCH_ERROR, "no-policy-served"))

    async def test_server_error(self) -> None:
        for status in (500, 503, 204, 201):
            self.serve(f"s{status}.example", Route.status_only(status))
            e = await self.fetch_error(f"s{status}.example", PolicyFetchError)
            self.assertEqual((e.result_type, e.reason), (FETCH_ERROR, "cannot-fetch-policy"))
            self.assertIn(str(status), e.detail)

    async def test_redirect_not_followed(self) -> None:
        """RFC 8461 §3.3: 3xx is a failure and the target is never asked."""
        for status in (301, 302, 303, 307, 308):
            target = f"https://mta-sts.r{status}.example/other"
            host = self.serve(f"r{status}.example", Route.redirect(target, status))
            self.server.serve(host, Route.policy(POLICY), path="/other")
            e = await self.fetch_error(f"r{status}.example", PolicyFetchError)
            self.assertEqual((e.result_type, e.reason), (FETCH_ERROR, "cannot-fetch-policy"))
            self.assertIn("redirect", e.detail)
            self.assertEqual(self.server.request_count(host, "/other"), 0)
            self.assertEqual(self.server.request_count(host), 1)

    async def test_wrong_content_type(self) -> None:
        for n, content_type in enumerate(
            [
                "text/html",
                "application/octet-stream",
                "text/plain-ish",
                "text/plainx; charset=utf-8",
                None,
            ]
        ):
            self.serve(f"t{n}.example", Route.policy(POLICY, content_type=content_type))
            e = await self.fetch_error(f"t{n}.example", WrongContentTypeError)
            self.assertEqual((e.result_type, e.reason), (FETCH_ERROR, "wrong-content-type"))
            self.assertIn(content_type or "none", e.detail)

    async def test_syntax_error(self) -> None:
        self.serve("example.com", Route.policy("version: STSv1\nmode: bogus\nmax_age: 1\n"))
        e = await self.fetch_error("example.com", InvalidPolicyError)
        self.assertEqual(
            (e.result_type, e.reason), (ResultType.STS_POLICY_INVALID, "policy-syntax-error")
        )
        self.assertIn("mode", e.detail)

    async def test_too_large_content_length(self) -> None:
        """A Content-Length over the cap fails before the body is read."""
        self.serve("example.com", Route.policy(POLICY + "\n" * (MAX_POLICY_SIZE + 1 - len(POLICY))))
        e = await self.fetch_error("example.com", PolicyTooLargeError)
        self.assertEqual(
            (e.result_type, e.reason), (ResultType.STS_POLICY_INVALID, "policy-syntax-error")
        )
        self.assertIn("65537", e.detail)

    async def test_too_large_chunked(self) -> None:
        """Without a length, the cap applies to the bytes as they stream."""
        text = POLICY + "\n" * (MAX_POLICY_SIZE + 1 - len(POLICY))
        self.serve("example.com", Route(body=text, chunked=True, chunk_size=4096))
        e = await self.fetch_error("example.com", PolicyTooLargeError)
        self.assertIn("received", e.detail)

    async def test_endless_body_closed_early(self) -> None:
        """An endless body is cut off: the client closes the connection."""
        limit = 64 * 1024 * 1024
        self.serve("example.com", Route.endless_body(limit))
        started = time.monotonic()
        e = await self.fetch_error("example.com", PolicyTooLargeError)
        self.assertIn("received", e.detail)
        served = self.server.requests[0]
        await served.finished
        self.assertTrue(served.client_disconnected)
        self.assertLess(served.body_bytes_sent, limit)
        self.assertLess(time.monotonic() - started, 4)

    async def test_max_size_configurable(self) -> None:
        self.serve("example.com", Route.policy(POLICY))
        e = await self.fetch_error("example.com", PolicyTooLargeError, max_size=len(POLICY) - 1)
        self.assertIn(str(len(POLICY)), e.detail)

    async def test_stall_before_headers(self) -> None:
        self.serve("example.com", Route.stall_headers())
        started = time.monotonic()
        e = await self.fetch_error("example.com", FetchTimeoutError, timeout=0.5)
        elapsed = time.monotonic() - started
        self.assertEqual((e.result_type, e.reason), (FETCH_ERROR, "cannot-fetch-policy"))
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 3)
        served = self.server.requests[0]
        await served.finished
        self.assertTrue(served.client_disconnected)

    async def test_stall_mid_body(self) -> None:
        """The timeout covers the body too (treq's timeout= would not)."""
        self.serve("example.com", Route.stall_body(POLICY, after=20))
        e = await self.fetch_error("example.com", FetchTimeoutError, timeout=0.5)
        self.assertIn("0.5 s", e.detail)
        served = self.server.requests[0]
        await served.finished
        self.assertTrue(served.client_disconnected)
        self.assertEqual(served.body_bytes_sent, 20)

    async def test_cancel(self) -> None:
        """Cancelling a fetch fails it with CancelledError and closes the connection."""
        self.serve("example.com", Route.stall_headers())
        arrived = self.server.next_request()
        d = self.fetcher().fetch("example.com")
        served = await arrived
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        await served.finished
        self.assertTrue(served.client_disconnected)

    async def test_reset(self) -> None:
        self.serve("example.com", Route.reset_connection())
        e = await self.fetch_error("example.com", PolicyFetchError)
        self.assertEqual((type(e), e.reason), (PolicyFetchError, "cannot-fetch-policy"))


class FetchConnectionFailureTests(_LoopbackMixin, TestCase):
    """Name and connection failures."""

    async def test_unknown_host(self) -> None:
        """A policy host that does not resolve: no policy served."""
        e = await self.fetch_error("nowhere.example", NoPolicyServedError)
        self.assertEqual((e.result_type, e.reason), (FETCH_ERROR, "no-policy-served"))
        self.assertEqual(self.resolver.lookups, ["mta-sts.nowhere.example"])
        self.assertEqual(self.server.servernames, [])

    async def test_connection_refused(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        self.resolver.add("mta-sts.example.com", "127.0.0.1")
        fetcher = PolicyFetcher(
            reactor,
            trust_roots=self.pki.ca_pem,
            name_resolver=self.resolver,
            port=number,
            timeout=5,
        )
        try:
            await fetcher.fetch("example.com")
        except PolicyFetchError as e:
            self.assertEqual((type(e), e.reason), (PolicyFetchError, "cannot-fetch-policy"))
            self.assertIn("refused", e.detail)
        else:
            self.fail("fetch succeeded")

    async def test_invalid_domain(self) -> None:
        for bad in ("192.0.2.1", "[::1]", "", "a..b", "-x.example"):
            with self.assertRaises(DomainError):
                await self.fetcher().fetch(bad)
        self.assertEqual(self.resolver.lookups, [])


class FetchCertificateTests(_LoopbackMixin, TestCase):
    """PKIX failures are C{sts-webpki-invalid} with a reason per cause."""

    async def check(self, certificate, reason: str, **kwargs) -> PolicyCertificateError:
        self.serve("example.com", Route.policy(POLICY), certificate=certificate)
        e = await self.fetch_error("example.com", PolicyCertificateError, **kwargs)
        self.assertEqual((e.result_type, e.reason), (ResultType.STS_WEBPKI_INVALID, reason))
        self.assertEqual(self.server.requests, [])
        return e

    async def test_expired(self) -> None:
        e = await self.check(self.pki.expired("mta-sts.example.com"), "certificate-expired")
        self.assertEqual((e.verify_error, e.depth), (10, 0))
        self.assertIn("expired", e.detail)

    async def test_not_yet_valid(self) -> None:
        e = await self.check(self.pki.not_yet_valid("mta-sts.example.com"), "certificate-expired")
        self.assertEqual(e.verify_error, 9)

    async def test_host_mismatch(self) -> None:
        e = await self.check(self.pki.valid("mta-sts.other.example"), "certificate-host-mismatch")
        self.assertIn("mta-sts.other.example", e.detail)
        self.assertIsNone(e.verify_error)

    async def test_parent_name_does_not_match(self) -> None:
        """A certificate for the policy domain itself is not enough."""
        await self.check(self.pki.valid("example.com"), "certificate-host-mismatch")

    async def test_untrusted(self) -> None:
        e = await self.check(self.pki.untrusted("mta-sts.example.com"), "certificate-not-trusted")
        self.assertIn(e.verify_error, (2, 19, 20, 21))

    async def test_platform_roots_by_default(self) -> None:
        """Without trust roots, the platform's are used: the test CA is not one."""
        await self.check(None, "certificate-not-trusted", trust_roots=None)
        self.assertEqual(self.server.servernames, ["mta-sts.example.com"])

    async def test_legacy_tls_refused(self) -> None:
        """A policy host offering only TLS 1.0/1.1 is refused (TLS ≥ 1.2)."""
        legacy = self.start_server(legacy_tls=True)
        self.serve("example.com", Route.policy(POLICY), server=legacy)
        e = await self.fetch_error("example.com", PolicyFetchError, server=legacy)
        self.assertEqual((type(e), e.reason), (PolicyFetchError, "cannot-fetch-policy"))
        self.assertIn("TLS", e.detail)
        self.assertEqual(legacy.requests, [])
        # The same server does answer a client that accepts TLS 1.1, so the
        # refusal above is the fetcher's TLS >= 1.2 rule at work.
        version, answer = await _legacy_get(legacy.port, "mta-sts.example.com")
        self.assertIn(version, ("TLSv1", "TLSv1.1"))
        self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer[:40])


@implementer(IOpenSSLClientConnectionCreator)
class _LegacyClientCreator:
    """A client that offers TLS 1.0-1.1 only and verifies nothing."""

    def __init__(self, servername: str) -> None:
        self._context = SSL.Context(SSL.TLS_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_VERSION)
        self._context.set_max_proto_version(SSL.TLS1_1_VERSION)
        self._context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self._servername = servername.encode("ascii")

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._context, None)
        connection.set_tlsext_host_name(self._servername)
        return connection


class _Collect(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.version = None
        self.done = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.version = self.transport.getHandle().get_protocol_version_name()
        self.data += data

    def connectionLost(self, reason) -> None:
        self.done.callback((self.version, self.data))


async def _legacy_get(port: int, host: str) -> tuple[str | None, bytes]:
    """GET the policy over TLS 1.0/1.1; return (TLS version, raw answer)."""
    request = f"GET {WELL_KNOWN_PATH} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()
    endpoint = wrapClientTLS(
        _LegacyClientCreator(host), TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    )
    protocol = await endpoint.connect(Factory.forProtocol(lambda: _Collect(request)))
    return await protocol.done


class TimeoutClockTests(SynchronousTestCase):
    """The overall timeout, driven by a fake clock."""

    def test_timeout_while_connecting(self) -> None:
        clock = MemoryReactorClock()
        resolver = StaticHostnameResolver({"mta-sts.example.com": "127.0.0.1"})
        fetcher = PolicyFetcher(
            clock, trust_roots=shared_pki().ca_pem, name_resolver=resolver, timeout=60
        )
        d = fetcher.fetch("example.com")
        self.assertEqual([(h, p) for h, p, *_ in clock.tcpClients], [("127.0.0.1", 443)])
        clock.advance(59.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        failure = self.failureResultOf(d, FetchTimeoutError)
        self.assertEqual(failure.value.reason, "cannot-fetch-policy")
        self.assertIn("60 s", failure.value.detail)
        self.assertEqual(clock.connectors[0].stoppedConnecting, True)
        self.assertEqual(clock.getDelayedCalls(), [])


class HelperTests(SynchronousTestCase):
    """Pure helpers and the shipped test resolver."""

    def test_classify_verify_error(self) -> None:
        for code in (9, 10):
            self.assertEqual(classify_verify_error(code)[0], "certificate-expired")
        for code in (2, 18, 19, 20, 21, 27):
            self.assertEqual(classify_verify_error(code)[0], "certificate-not-trusted")
        self.assertEqual(classify_verify_error(23), ("validation-failure", "X.509 verify error 23"))

    def test_load_trust_roots(self) -> None:
        pem = shared_pki().ca_pem
        self.assertIsNotNone(load_trust_roots(pem + pem))
        with self.assertRaises(ValueError):
            load_trust_roots(b"not a certificate")
        with self.assertRaises(ValueError):
            load_trust_roots(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        with self.assertRaises(OSError):
            load_trust_roots(self.mktemp())

    def test_error_classes(self) -> None:
        expected = {
            PolicyFetchError: (FETCH_ERROR, "cannot-fetch-policy"),
            NoPolicyServedError: (FETCH_ERROR, "no-policy-served"),
            WrongContentTypeError: (FETCH_ERROR, "wrong-content-type"),
            FetchTimeoutError: (FETCH_ERROR, "cannot-fetch-policy"),
            PolicyCertificateError: (ResultType.STS_WEBPKI_INVALID, "certificate-not-trusted"),
            InvalidPolicyError: (ResultType.STS_POLICY_INVALID, "policy-syntax-error"),
            PolicyTooLargeError: (ResultType.STS_POLICY_INVALID, "policy-syntax-error"),
        }
        for cls, pair in expected.items():
            e = cls("https://mta-sts.x.example/.well-known/mta-sts.txt", "oops")
            self.assertEqual((e.result_type, e.reason), pair)
            self.assertEqual(
                str(e),
                "MTA-STS policy fetch from https://mta-sts.x.example/.well-known/mta-sts.txt"
                " failed: oops",
            )

    def test_static_resolver(self) -> None:
        resolver = StaticHostnameResolver(
            {"a.example": "127.0.0.1", "B.example.": ["::1", "127.0.0.2"]}
        )
        verifyObject(IHostnameResolver, resolver)

        @implementer(IResolutionReceiver)
        class Receiver:
            def __init__(self):
                self.events = []

            def resolutionBegan(self, resolution):
                self.events.append(("began", resolution.name))

            def addressResolved(self, address):
                self.events.append(address)

            def resolutionComplete(self):
                self.events.append("complete")

        r = Receiver()
        resolver.resolveHostName(r, "b.EXAMPLE", 443)
        self.assertEqual(
            r.events,
            [
                ("began", "b.EXAMPLE"),
                IPv6Address("TCP", "::1", 443),
                IPv4Address("TCP", "127.0.0.2", 443),
                "complete",
            ],
        )
        r = Receiver()
        resolver.resolveHostName(r, "b.example", 25, addressTypes=[IPv4Address])
        self.assertEqual(r.events[1:], [IPv4Address("TCP", "127.0.0.2", 25), "complete"])
        r = Receiver()
        resolver.resolveHostName(r, "c.example")
        self.assertEqual(r.events, [("began", "c.example"), "complete"])
        with self.assertRaises(ValueError):
            resolver.add("d.example", "not-an-ip")


class ConformanceTests(_LoopbackMixin, TestCase):
    """
    The C{policy_fetch} vectors of ../shared/conformance/vectors.json, end to
    end.  The vectors' certificate and body fields are prose; each test reads
    what it can from the vector and builds the rest as the prose says.
    """

    def vector(self, vid: str) -> dict:
        for v in load_vectors("policy_fetch"):
            if v["vid"] == vid:
                return v
        self.fail(f"no vector {vid}")

    def serve_vector(self, v: dict, body=None, **kwargs) -> str:
        domain = v["domain"].split()[0]
        route = Route(status=v["http_status"], body=v["body"] if body is None else body)
        self.serve(domain, route, **kwargs)
        return domain

    async def test_policy_fetch_0(self) -> None:
        """vid policy_fetch:0: 200 with body "bogus" → policy syntax error."""
        v = self.vector("policy_fetch:0")
        self.assertIn("ErrPolicySyntax", v["expected"])
        domain = self.serve_vector(v, certificate=self.pki.valid("mta-sts.mox.example"))
        e = await self.fetch_error(domain, InvalidPolicyError)
        self.assertEqual(e.result_type, ResultType.STS_POLICY_INVALID)

    async def test_policy_fetch_1(self) -> None:
        """vid policy_fetch:1: certificate for another host → host mismatch."""
        v = self.vector("policy_fetch:1")
        self.assertIn("cert name mismatch", v["expected"])
        domain = self.serve_vector(v, certificate=self.pki.valid("mta-sts.mox.example"))
        self.assertEqual(domain, "other.example")
        e = await self.fetch_error(domain, PolicyCertificateError)
        self.assertEqual(
            (e.result_type, e.reason),
            (ResultType.STS_WEBPKI_INVALID, "certificate-host-mismatch"),
        )

    async def test_policy_fetch_2(self) -> None:
        """vid policy_fetch:2: expired certificate → sts-webpki-invalid."""
        v = self.vector("policy_fetch:2")
        self.assertIn("sts-webpki-invalid", v["expected"])
        domain = self.serve_vector(v, certificate=self.pki.expired("mta-sts.mox.example"))
        e = await self.fetch_error(domain, PolicyCertificateError)
        self.assertEqual(
            (e.result_type, e.reason), (ResultType.STS_WEBPKI_INVALID, "certificate-expired")
        )

    async def test_policy_fetch_3(self) -> None:
        """vid policy_fetch:3: HTTP 404 → no policy (ErrNoPolicy)."""
        v = self.vector("policy_fetch:3")
        self.assertEqual(v["expected"], "ErrNoPolicy")
        domain = self.serve_vector(v)
        e = await self.fetch_error(domain, NoPolicyServedError)
        self.assertEqual(e.reason, "no-policy-served")

    async def test_policy_fetch_4(self) -> None:
        """vid policy_fetch:4: the policy host does not exist → no policy."""
        v = self.vector("policy_fetch:4")
        self.assertIn("FetchPolicy: ErrNoPolicy", v["expected"])
        domain = v["domain"].split()[0]
        e = await self.fetch_error(domain, NoPolicyServedError)
        self.assertEqual(e.reason, "no-policy-served")
        self.assertEqual(self.server.requests, [])

    async def test_policy_fetch_5(self) -> None:
        """vid policy_fetch:5: 301 with Location /other is not followed."""
        v = self.vector("policy_fetch:5")
        self.assertIn("redirect not followed", v["expected"])
        domain = v["domain"]
        host = self.serve(domain, Route.redirect("/other", v["http_status"]))
        self.server.serve(host, Route.policy(POLICY), path="/other")
        e = await self.fetch_error(domain, PolicyFetchError)
        self.assertEqual((type(e), e.reason), (PolicyFetchError, "cannot-fetch-policy"))
        self.assertEqual(self.server.request_count(host, "/other"), 0)

    async def test_policy_fetch_6(self) -> None:
        """vid policy_fetch:6: HTTP 500 → fetch error."""
        v = self.vector("policy_fetch:6")
        self.assertEqual(v["expected"], "ErrPolicyFetch")
        domain = self.serve_vector(v)
        e = await self.fetch_error(domain, PolicyFetchError)
        self.assertEqual((type(e), e.reason), (PolicyFetchError, "cannot-fetch-policy"))

    async def test_policy_fetch_7(self) -> None:
        """vid policy_fetch:7: 65538 NUL bytes → syntax error (size limit)."""
        v = self.vector("policy_fetch:7")
        self.assertIn("65538 NUL bytes", v["body"])
        domain = self.serve_vector(v, body=b"\0" * (64 * 1024 + 2))
        e = await self.fetch_error(domain, PolicyTooLargeError)
        self.assertEqual(
            (e.result_type, e.reason), (ResultType.STS_POLICY_INVALID, "policy-syntax-error")
        )

    async def test_policy_fetch_8(self) -> None:
        """vid policy_fetch:8: a minimal mode-none policy without spaces."""
        v = self.vector("policy_fetch:8")
        domain = self.serve_vector(v)
        result = await self.fetcher().fetch(domain)
        self.assertEqual(result.policy.mode, Mode.NONE)
        self.assertEqual(result.policy.max_age, 1)
        self.assertEqual(result.policy.mx, ())
        self.assertEqual(result.text, v["body"])


class SharedContextTests(_LoopbackMixin, TestCase):
    """
    One OpenSSL context per fetcher, built once; SNI, the verify callback
    and its record are per connection, so verification stays per host.
    """

    async def test_one_context_per_fetcher(self) -> None:
        from mtasts_twisted.fetch import fetcher as fetch_module

        built: list[object] = []
        real = fetch_module.client_context

        def counting(trust_root: object) -> SSL.Context:
            built.append(trust_root)
            return real(trust_root)

        self.patch(fetch_module, "client_context", counting)
        for domain in ("a.example", "b.example"):
            self.serve(domain, Route.policy(POLICY))
        fetcher = self.fetcher()
        self.assertEqual(len(built), 1)
        for domain in ("a.example", "b.example", "a.example"):
            result = await fetcher.fetch(domain)
            self.assertEqual(result.text, POLICY)
        self.assertEqual(len(built), 1)
        self.assertEqual(
            self.server.servernames, ["mta-sts.a.example", "mta-sts.b.example", "mta-sts.a.example"]
        )

    async def test_verification_per_connection(self) -> None:
        """Good and bad hosts through one fetcher, in turn and at once: each is judged alone."""
        self.serve("good.example", Route.policy(POLICY))
        self.serve("wrong.example", Route.policy(POLICY), certificate=self.pki.valid("mta-sts.good.example"))
        self.serve("expired.example", Route.policy(POLICY), certificate=self.pki.expired("mta-sts.expired.example"))
        self.serve("untrusted.example", Route.policy(POLICY), certificate=self.pki.untrusted("mta-sts.untrusted.example"))
        fetcher = self.fetcher()

        async def outcome(domain: str) -> str:
            try:
                await fetcher.fetch(domain)
            except PolicyFetchError as e:
                return e.reason
            return "ok"

        expected = {
            "good.example": "ok",
            "wrong.example": "certificate-host-mismatch",
            "expired.example": "certificate-expired",
            "untrusted.example": "certificate-not-trusted",
        }
        for domain in ["good.example", "wrong.example", "good.example", "expired.example", "untrusted.example", "good.example"]:
            self.assertEqual(await outcome(domain), expected[domain], domain)
        domains = list(expected) * 2
        results = await gatherResults([Deferred.fromCoroutine(outcome(d)) for d in domains])
        self.assertEqual(results, [expected[d] for d in domains])


class _CountingResolver:
    """An IDNSResolver that counts address lookups."""

    def __init__(self, resolver: object) -> None:
        self._resolver = resolver
        self.address_lookups: list[str] = []

    def lookup_addresses(self, host: str) -> Deferred:
        self.address_lookups.append(host)
        return self._resolver.lookup_addresses(host)

    def __getattr__(self, name: str) -> object:
        return getattr(self._resolver, name)


class PreResolvedTests(TestCase):
    """The policy host's address, looked up before connecting, is the one connected to."""

    def setUp(self) -> None:
        from mtasts_twisted.testing.world import LoopbackWorld

        self.world = LoopbackWorld.start(reactor)
        self.addCleanup(self.world.stop)
        self.world.publish("example.com", POLICY)
        self.counting = _CountingResolver(self.world.resolver)

    def fetcher(self, **kwargs) -> PolicyFetcher:
        return PolicyFetcher(
            reactor, trust_roots=self.world.pki.ca_pem, resolver=self.counting, port=self.world.https.port, timeout=5, **kwargs
        )

    async def test_one_lookup(self) -> None:
        """One address: connected to without resolving again."""
        from mtasts_twisted.dns import DNSHostnameResolver

        for fetcher in (self.fetcher(), self.fetcher(name_resolver=DNSHostnameResolver(self.counting))):
            self.counting.address_lookups.clear()
            result = await fetcher.fetch("example.com")
            self.assertEqual(result.text, POLICY)
            self.assertEqual(self.counting.address_lookups, ["mta-sts.example.com"])

    async def test_other_name_resolver_used(self) -> None:
        """A name resolver of its own is still what the connection resolves with."""
        static = StaticHostnameResolver()
        static.add("mta-sts.example.com", "127.0.0.1")
        result = await self.fetcher(name_resolver=static).fetch("example.com")
        self.assertEqual(result.text, POLICY)
        self.assertEqual(static.lookups, ["mta-sts.example.com"])
        self.assertEqual(self.counting.address_lookups, ["mta-sts.example.com"])

    async def test_several_addresses(self) -> None:
        """
        Several addresses: HostnameEndpoint tries them in turn (::1 has no
        server), without looking the host up a second time.
        """
        self.world.dns.add_aaaa("mta-sts.example.com", "::1")
        result = await self.fetcher().fetch("example.com")
        self.assertEqual(result.text, POLICY)
        self.assertEqual(self.counting.address_lookups, ["mta-sts.example.com"])

    async def test_several_addresses_other_name_resolver(self) -> None:
        """With a name resolver of its own, the connection still resolves through it."""
        self.world.dns.add_aaaa("mta-sts.example.com", "::1")
        static = StaticHostnameResolver()
        static.add("mta-sts.example.com", "127.0.0.1")
        result = await self.fetcher(name_resolver=static).fetch("example.com")
        self.assertEqual(result.text, POLICY)
        self.assertEqual(static.lookups, ["mta-sts.example.com"])
        self.assertEqual(self.counting.address_lookups, ["mta-sts.example.com"])


class FetchLogTests(_LoopbackMixin, TestCase):
    """One log event per fetch: its outcome."""

    async def test_one_event(self) -> None:
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.serve("example.com", Route.policy(POLICY))
        await self.fetcher().fetch("example.com")
        ours = [e for e in events if e.get("log_namespace", "").startswith("mtasts_twisted")]
        self.assertEqual(len(ours), 1, ours)
        self.assertIn("fetched MTA-STS policy", ours[0]["log_format"])
