"""
Fetching an MTA-STS policy over HTTPS (RFC 8461 §3.3).

L{PolicyFetcher.fetch} GETs C{https://mta-sts.<domain>/.well-known/mta-sts.txt}
with treq and either returns a L{FetchedPolicy} or fails with a
L{PolicyFetchError} whose C{result_type} and C{reason} are the RFC 8460
result type and failure reason code a TLSRPT report should carry.

The rules enforced (RFC 8461 §3.3 and the project rulings in DESIGN.md):
PKIX validation of the policy host's certificate (platform roots or given
trust roots) with SNI and host-name verification; TLS 1.2 or newer; no
redirects; only status 200; C{Content-Type: text/plain} (parameters
allowed); a body of at most 65536 bytes, enforced while streaming; and one
timeout covering connect, TLS handshake, headers and body.  Nothing is cached
and no connection is reused.

To tell certificate failures apart, each connection's OpenSSL verify
callback is replaced by one that records the verify error codes (and does the
same service_identity host-name check Twisted's would), so an expired
certificate, an untrusted issuer and a wrong name map to different TLSRPT
reason codes.  TLS failures that are not certificate failures (no common
protocol version, handshake alerts) are classified as C{cannot-fetch-policy}:
RFC 8460 reserves C{sts-webpki-invalid} for a policy host whose certificate
does not validate.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import attrs
from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import extract_patterns
from service_identity.hazmat import DNS_ID, verify_service_identity
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError as TCPTimeoutError,
)
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    URI,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from treq.client import HTTPClient
from zope.interface import implementer

from mtasts_twisted import __version__
from mtasts_twisted.dns import DNSHostnameResolver, DNSNoRecordError, DNSTemporaryError, reactor_with_resolver
from mtasts_twisted.policy import (  # MAX_POLICY_SIZE: 65536, DESIGN.md
    NoRecordError,
    STSRecord,
    select_sts_record,
    MAX_POLICY_SIZE,
    DomainError,
    MTASTSError,
    Policy,
    PolicySyntaxError,
    parse_policy,
    to_alabel,
)
from mtasts_twisted.results import ResultType

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_POLICY_SIZE",
    "FetchedPolicy",
    "PolicyFetchError",
    "NoPolicyServedError",
    "WrongContentTypeError",
    "FetchTimeoutError",
    "PolicyCertificateError",
    "InvalidPolicyError",
    "PolicyTooLargeError",
    "classify_verify_error",
    "PolicyFetcher",
    "fetch_policy",
    "policy_url",
    "load_trust_roots",
]

log = Logger()


#: RFC 8461 §3.3: "a timeout [...] of 60 seconds is RECOMMENDED".
DEFAULT_TIMEOUT = 60.0

_USER_AGENT = f"mtasts-twisted/{__version__}"


# --- results and errors ----------------------------------------------------


@attrs.frozen
class FetchedPolicy:
    """
    A policy fetched and parsed successfully.

    @ivar policy: the parsed L{Policy}.
    @ivar text: the policy text as served, decoded as UTF-8 (a leading BOM
        removed).
    """

    policy: Policy
    text: str


class PolicyFetchError(MTASTSError):
    """
    The policy could not be fetched, or what was fetched is not a policy.

    @cvar result_type: the RFC 8460 §4.3 result type for a TLSRPT report.
    @ivar reason: the RFC 8460 C{failure-reason-code}.
    @ivar url: the policy URL.
    @ivar detail: what went wrong, for people.
    """

    result_type: ResultType = ResultType.STS_POLICY_FETCH_ERROR
    reason = "cannot-fetch-policy"

    def __init__(self, url: str, detail: str, reason: str | None = None) -> None:
        """
        @param url: the policy URL.
        @param detail: a human-readable description of the failure.
        @param reason: overrides the class's C{reason}.
        """
        super().__init__(f"MTA-STS policy fetch from {url} failed: {detail}", reason)
        self.url = url
        self.detail = detail


class NoPolicyServedError(PolicyFetchError):
    """The policy host does not exist, or answered 404 (RFC 8461 §3.3)."""

    reason = "no-policy-served"


class WrongContentTypeError(PolicyFetchError):
    """The answer's media type is not C{text/plain} (RFC 8461 §3.2)."""

    reason = "wrong-content-type"


class FetchTimeoutError(PolicyFetchError):
    """The fetch did not complete (connect, headers and body) in time."""


class PolicyCertificateError(PolicyFetchError):
    """
    The policy host's certificate failed PKIX validation (RFC 8461 §3.3).

    C{reason} is C{certificate-expired}, C{certificate-host-mismatch},
    C{certificate-not-trusted} or, for other OpenSSL verify errors,
    C{validation-failure}.

    @ivar verify_error: the OpenSSL X.509 verify error code, or L{None} for
        a host-name mismatch.
    @ivar depth: the chain depth at which it was reported (0: the leaf).
    """

    result_type = ResultType.STS_WEBPKI_INVALID
    reason = "certificate-not-trusted"

    def __init__(
        self,
        url: str,
        detail: str,
        reason: str | None = None,
        verify_error: int | None = None,
        depth: int | None = None,
    ) -> None:
        super().__init__(url, detail, reason)
        self.verify_error = verify_error
        self.depth = depth


class InvalidPolicyError(PolicyFetchError):
    """What was served is not a valid policy (RFC 8461 §3.2)."""

    result_type = ResultType.STS_POLICY_INVALID
    reason = "policy-syntax-error"


class PolicyTooLargeError(InvalidPolicyError):
    """The body is larger than the limit (65536 bytes by default)."""


# OpenSSL X.509 verify error codes → (TLSRPT reason, description).
_VERIFY_ERRORS: dict[int, tuple[str, str]] = {
    2: ("certificate-not-trusted", "unable to get issuer certificate"),
    9: ("certificate-expired", "certificate is not yet valid"),
    10: ("certificate-expired", "certificate has expired"),
    18: ("certificate-not-trusted", "self-signed certificate"),
    19: ("certificate-not-trusted", "self-signed certificate in certificate chain"),
    20: ("certificate-not-trusted", "unable to get local issuer certificate"),
    21: ("certificate-not-trusted", "unable to verify the first certificate"),
    27: ("certificate-not-trusted", "certificate not trusted"),
}


def classify_verify_error(code: int) -> tuple[str, str]:
    """
    Map an OpenSSL X.509 verify error code to a TLSRPT reason.

    @param code: the C{errno} the OpenSSL verify callback received.
    @return: C{(reason, description)}; C{reason} is C{certificate-expired}
        for 9 and 10, C{certificate-not-trusted} for 2, 18, 19, 20, 21 and
        27, and C{validation-failure} otherwise (DESIGN.md).
    """
    return _VERIFY_ERRORS.get(code, ("validation-failure", f"X.509 verify error {code}"))


# --- trust roots -------------------------------------------------------------


def load_trust_roots(roots: Any) -> Any:
    """
    Build a trust root from what a caller (or C{--ca-file}) gives.

    @param roots: L{None} for the platform's roots; PEM C{bytes} holding
        one or more certificates; a path (C{str} or C{os.PathLike}) to such
        a PEM file; a L{Certificate}; or anything else
        C{optionsForClientTLS} takes as C{trustRoot} (an C{IOpenSSLTrustRoot}
        such as the result of L{trustRootFromCertificates}), passed through.
    @return: an C{IOpenSSLTrustRoot} provider.
    @raise ValueError: the PEM holds no certificate or cannot be parsed.
    @raise OSError: the file cannot be read.
    """
    if roots is None:
        return platformTrust()
    if isinstance(roots, Certificate):
        return trustRootFromCertificates([roots])
    if isinstance(roots, (str, os.PathLike)):
        with open(roots, "rb") as f:
            roots = f.read()
    if not isinstance(roots, bytes):
        return roots  # already a trust root (IOpenSSLTrustRoot)
    end = b"-----END CERTIFICATE-----"
    certificates = []
    for block in roots.split(end):
        if b"-----BEGIN CERTIFICATE-----" in block:
            pem = block[block.index(b"-----BEGIN CERTIFICATE-----") :] + end + b"\n"
            try:
                certificates.append(Certificate.loadPEM(pem))
            except crypto.Error as e:
                raise ValueError(f"invalid PEM certificate in trust roots: {e}") from None
    if not certificates:
        raise ValueError("no PEM certificate found in trust roots")
    return trustRootFromCertificates(certificates)


# --- one attempt: TLS recording and connection tracking ---------------------


@attrs.define
class _VerifyRecord:
    """What the verify callback saw on one connection."""

    errors: list[tuple[int, int]] = attrs.field(factory=list)
    host_mismatch: str | None = None


def _dns_names(certificate: x509.Certificate) -> str:
    """The certificate's DNS names, for messages."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    names = san.value.get_values_for_type(x509.DNSName)
    return "names " + ", ".join(names[:10]) if names else "no DNS names"


def _client_context(trust_root: Any) -> SSL.Context:
    """
    The OpenSSL context of a L{PolicyFetcher}'s connections, built once.

    Building one costs C{SSL_CTX_new}, the cipher list and loading the trust
    roots (milliseconds for a platform store of a few hundred roots): per
    fetch, that was the largest part of a cold lookup's CPU.  Everything
    per host (SNI, the verify callback with its host-name check) is set on
    each connection instead (L{_RecordingCreator}).
    """
    options = CertificateOptions(
        trustRoot=trust_root,
        # RFC 8461 §3.3 wants HTTPS; DESIGN.md: TLS 1.2 or newer.
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    # Verification is set on the context too (VERIFY_PEER and the roots);
    # each connection replaces the callback with its own.
    return options.getContext()


@implementer(IOpenSSLClientConnectionCreator)
class _RecordingCreator:
    """
    Client connections to one policy host on a shared context: SNI, and a
    per-connection verify callback that does the PKIX verdict of OpenSSL,
    the host-name check of C{optionsForClientTLS}, and records why
    verification failed.

    @ivar records: one L{_VerifyRecord} per connection made.
    """

    def __init__(self, hostname: str, context: SSL.Context) -> None:
        """
        @param hostname: the policy host, in A-labels (so ASCII).
        @param context: from L{_client_context}.
        """
        self._hostname = hostname
        self._server_name = hostname.encode("ascii")
        # What service_identity's verify_certificate_hostname builds per
        # call (an IDNA check of the name): once per host instead.
        try:
            self._identity: DNS_ID | None = DNS_ID(hostname)
        except ValueError:
            # Not a name service_identity accepts: the callback fails the
            # handshake as verify_certificate_hostname did, by raising.
            self._identity = None
        self._context = context
        self.records: list[_VerifyRecord] = []

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        # RFC 8461 §3.3 (RFC 6066 §3): SNI with the policy host's name.
        connection.set_tlsext_host_name(self._server_name)
        record = _VerifyRecord()
        self.records.append(record)
        hostname = self._hostname
        identity = self._identity

        def verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
            try:
                if not ok:
                    record.errors.append((errno, depth))
                    return False
                if depth == 0:
                    # RFC 8461 §3.3: the certificate must be valid for the
                    # policy host (RFC 6125 via service_identity).
                    leaf = cert.to_cryptography()
                    try:
                        # = verify_certificate_hostname(leaf, hostname)
                        verify_service_identity(
                            extract_patterns(leaf), [identity or DNS_ID(hostname)], []
                        )
                    except (VerificationError, CertificateError):
                        record.host_mismatch = _dns_names(leaf)
                        return False
                return True
            except BaseException:
                # An exception escaping an OpenSSL callback would be lost.
                log.failure("while verifying the certificate of {hostname}", hostname=hostname)
                return False

        # Per connection (pyOpenSSL >= 20): the context is shared, the
        # record and host name are this connection's.  OpenSSL calls it for
        # every certificate of the chain, the leaf (depth 0) last.
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


class _TrackedConnection(ProtocolWrapper):
    """Sits between TCP and TLS so that an attempt can abort it and see it go."""

    factory: _TrackingFactory

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.factory.attempt.lost(self)


class _TrackingFactory(WrappingFactory):
    protocol = _TrackedConnection
    noisy = False

    def __init__(self, wrappedFactory: Any, attempt: _Attempt) -> None:
        super().__init__(wrappedFactory)
        self.attempt = attempt

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.attempt.live.add(p)


class _Attempt:
    """One fetch: its URL, TLS recorder and live TCP connections."""

    def __init__(self, creator: _RecordingCreator, host: str, url: str, timeout: float) -> None:
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
            connection.transport.abortConnection()

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
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """Deliver the known addresses of the families asked for."""
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self._addresses:
            family = IPv6Address if ":" in address else IPv4Address
            if addressTypes is None or family in addressTypes:
                resolutionReceiver.addressResolved(family(transportSemantics, address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IStreamClientEndpoint)
class _PolicyHostEndpoint:
    """
    TCP to the policy host, then TLS: to the addresses the fetch looked up
    already (one: directly; several: through L{HostnameEndpoint}, RFC 8305
    connection attempts in turn), else through L{HostnameEndpoint} and the
    reactor's name resolver.
    """

    def __init__(
        self,
        reactor: Any,
        clock: Any,
        host: str,
        port: int,
        attempt: _Attempt,
        addresses: tuple[str, ...] | None = None,
    ) -> None:
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

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        protocolFactory.noisy = False  # one "Starting factory" log per fetch is noise
        tls = TLSMemoryBIOFactory(
            self._attempt.creator, True, protocolFactory, clock=self._clock
        )
        tls.noisy = False
        tracking = _TrackingFactory(tls, self._attempt)
        d = self._tcp_endpoint().connect(tracking)
        # tracked connection → TLS protocol → the HTTP protocol Agent wants
        return d.addCallback(lambda tracked: tracked.wrappedProtocol.wrappedProtocol)


class _EndpointFactory:
    def __init__(self, endpoint: _PolicyHostEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        # The URL names the policy host; the port may be overridden (tests).
        return self._endpoint


# --- the body, capped while streaming ---------------------------------------


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _CappedBody(Protocol):
    """Collects a response body; fails as soon as it passes C{limit} bytes."""

    def __init__(self, limit: int, abort: Any) -> None:
        self._limit = limit
        self._abort = abort
        self._chunks: list[bytes] = []
        self._size = 0
        self.finished: Deferred[bytes] = Deferred(lambda d: abort())

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            # RFC 8461 §3.3 / DESIGN.md: cap the body; close the connection
            # at once rather than drain an endless body.
            self._abort()
            self.finished.errback(_TooLarge(self._size))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


# --- the fetcher --------------------------------------------------------------


def policy_url(domain: str) -> str:
    """
    The policy URL of a policy domain (RFC 8461 §3.3).

    @param domain: the policy domain, in any case, Unicode or A-labels.
    @raise DomainError: C{domain} is not a valid domain name.
    """
    return f"https://mta-sts.{to_alabel(domain)}/.well-known/mta-sts.txt"


def _media_type(values: list[bytes] | None) -> str | None:
    if not values or len(values) != 1:
        return None
    return values[0].split(b";", 1)[0].strip().lower().decode("latin-1")


def _describe(failure: Failure) -> str:
    """A short text for a connection-level failure, unwrapping web errors."""
    value = failure.value
    if isinstance(value, (ResponseNeverReceived, ResponseFailed)) and value.reasons:
        return "; ".join(_describe(f) for f in value.reasons)
    if isinstance(value, SSL.Error):
        return f"TLS error: {value}"
    return f"{type(value).__name__}: {value}"


def _inner(failure: Failure) -> list[Failure]:
    value = failure.value
    if isinstance(value, (ResponseNeverReceived, ResponseFailed)) and value.reasons:
        return [f for r in value.reasons for f in _inner(r)]
    return [failure]


class PolicyFetcher:
    """
    Fetches MTA-STS policies (RFC 8461 §3.3).

    Every L{fetch} is independent: a new connection, no cache, no TLS
    session reuse.  A fetcher holds no connections between fetches; its one
    OpenSSL context (trust roots, TLS >= 1.2, ciphers) is built once.
    """

    def __init__(
        self,
        reactor: Any,
        trust_roots: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_size: int = MAX_POLICY_SIZE,
        name_resolver: IHostnameResolver | None = None,
        port: int = 443,
        resolver: Any = None,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP}, C{IReactorTime} and, unless
            C{name_resolver} is given, C{IReactorPluggableNameResolver}.
        @param trust_roots: see L{load_trust_roots}; L{None} for the
            platform's roots.
        @param timeout: seconds for the whole fetch: resolution, connect,
            TLS handshake, headers and body.
        @param max_size: the largest acceptable body, in bytes (the parser
            rejects more than L{MAX_POLICY_SIZE} whatever this says).
        @param name_resolver: resolves policy host names (e.g. through
            configured nameservers); by default the reactor's.
        @param port: the TCP port to connect to (443; tests use others).
        @param resolver: an L{mtasts_twisted.interfaces.IDNSResolver}: the
            policy host is looked up with it first, so that a host that
            does not exist (no policy served) is told apart from a
            temporary DNS failure; it also resolves for the connection
            unless C{name_resolver} is given.
        """
        #: Connect to the addresses the pre-resolution found when the
        #: connection would resolve through the same resolver anyway.
        self._connect_resolved = resolver is not None and (
            name_resolver is None
            or (isinstance(name_resolver, DNSHostnameResolver) and name_resolver.resolver is resolver)
        )
        if resolver is not None and name_resolver is None:
            name_resolver = DNSHostnameResolver(resolver)
        self._dns = resolver
        self._reactor = reactor
        self._connect_reactor = (
            reactor if name_resolver is None else reactor_with_resolver(reactor, name_resolver)
        )
        self._trust_root = load_trust_roots(trust_roots)
        self._tls_context = _client_context(self._trust_root)
        self._timeout = timeout
        self._max_size = max_size
        self._port = port

    def fetch(self, domain: str) -> Deferred[FetchedPolicy]:
        """
        Fetch and parse the policy of C{domain}.

        @param domain: the policy domain (Unicode or A-labels, any case).
        @return: a L{Deferred} firing with a L{FetchedPolicy}, or failing
            with a L{PolicyFetchError} (or L{DomainError} for a name that is
            not a domain).  It fires after the connection is closed.
        """
        try:
            alabel = to_alabel(domain)
        except DomainError:
            return fail()
        host = f"mta-sts.{alabel}"
        url = policy_url(alabel)
        attempt = _Attempt(_RecordingCreator(host, self._tls_context), host, url, self._timeout)
        # No "fetching" event: the outcome is logged once below (one event
        # per fetch, not two, on the cold-lookup path).
        d = Deferred.fromCoroutine(self._fetch(attempt, host))

        def time_out() -> None:
            attempt.timed_out = True
            attempt.abort()
            d.cancel()

        # One timer for everything (DESIGN.md; treq's timeout= covers only
        # the headers).
        timer = self._reactor.callLater(self._timeout, time_out)

        def finish(result: Any) -> Deferred[Any]:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                if attempt.timed_out and result.check(CancelledError):
                    result = Failure(attempt.timeout_error())
                if result.check(PolicyFetchError):
                    error = result.value
                    log.info(
                        "MTA-STS policy fetch {url} failed: {result_type} {reason}: {detail}",
                        url=url,
                        result_type=error.result_type.value,
                        reason=error.reason,
                        detail=error.detail,
                    )
            else:
                log.info(
                    "fetched MTA-STS policy {url}: mode {mode}",
                    url=url,
                    mode=result.policy.mode.value,
                )
            # Nothing of this attempt stays open: not a stalled connection,
            # nor one waiting for a TLS close_notify that may never come.
            attempt.abort()
            return attempt.when_closed().addCallback(lambda _: result)

        return d.addBoth(finish)

    async def _fetch(self, attempt: _Attempt, host: str) -> FetchedPolicy:
        url = attempt.url
        addresses = None
        if self._dns is not None:
            try:
                answer = await self._dns.lookup_addresses(host)
            except DNSNoRecordError:
                # RFC 8461 §3.3 / DESIGN.md: no policy host, no policy served.
                raise NoPolicyServedError(url, f"policy host {host} does not exist") from None
            except DNSTemporaryError as e:
                raise PolicyFetchError(url, f"temporary DNS failure for {host}: {e.detail or e}") from None
            if self._connect_resolved:
                addresses = tuple(answer.addresses)
        endpoint = _PolicyHostEndpoint(
            self._connect_reactor, self._reactor, host, self._port, attempt, addresses
        )
        agent = Agent.usingEndpointFactory(
            self._reactor,
            _EndpointFactory(endpoint),
            # No connection reuse (RFC 8461 §3.3 needs none).
            pool=HTTPConnectionPool(self._reactor, persistent=False),
        )
        client = HTTPClient(agent)
        try:
            response: IResponse = await client.get(
                url,
                # RFC 8461 §3.3: "HTTP 3xx redirects MUST NOT be followed".
                allow_redirects=False,
                unbuffered=True,
                headers={"User-Agent": _USER_AGENT, "Cache-Control": "no-cache"},
            )
        except CancelledError:
            raise
        except Exception:
            raise self._classify(attempt, Failure()) from None

        code = response.code
        if 300 <= code < 400:
            location = (response.headers.getRawHeaders(b"location") or [b"?"])[0]
            raise PolicyFetchError(
                url,
                f"HTTP {code} redirect to {location.decode('latin-1')!r} not followed"
                " (RFC 8461 §3.3)",
            )
        if code == 404:
            raise NoPolicyServedError(url, "HTTP 404: no policy served")
        if code != 200:
            # RFC 8461 §3.3: only a 200 answer carries a policy.
            raise PolicyFetchError(url, f"HTTP status {code}, expected 200")
        content_types = response.headers.getRawHeaders(b"content-type")
        if _media_type(content_types) != "text/plain":
            # RFC 8461 §3.2: the policy is served as "text/plain".
            shown = ", ".join(v.decode("latin-1") for v in content_types or []) or "none"
            raise WrongContentTypeError(url, f"Content-Type {shown}, expected text/plain")
        length = response.length
        if length is not UNKNOWN_LENGTH and length > self._max_size:
            raise PolicyTooLargeError(
                url, f"Content-Length {length} is over the {self._max_size}-byte limit"
            )

        collector = _CappedBody(self._max_size, attempt.abort)
        response.deliverBody(collector)
        try:
            body = await collector.finished
        except _TooLarge as e:
            raise PolicyTooLargeError(
                url, f"body over the {self._max_size}-byte limit ({e.size} bytes received)"
            ) from None
        except CancelledError:
            raise
        except Exception:
            raise self._classify(attempt, Failure()) from None

        try:
            policy = parse_policy(body)
        except PolicySyntaxError as e:
            raise InvalidPolicyError(url, str(e)) from e
        return FetchedPolicy(policy=policy, text=policy.text)

    def _classify(self, attempt: _Attempt, failure: Failure) -> Exception:
        """
        Turn a connection-level failure into a classified error (or into
        L{CancelledError} when the caller cancelled the fetch).
        """
        url = attempt.url
        inner = _inner(failure)
        if attempt.timed_out:
            return attempt.timeout_error()
        if any(f.check(CancelledError, ConnectingCancelledError) for f in inner):
            return CancelledError()
        for record in attempt.creator.records:
            if record.errors:
                errno, depth = record.errors[0]
                reason, text = classify_verify_error(errno)
                where = "certificate" if depth == 0 else f"certificate at chain depth {depth}"
                return PolicyCertificateError(
                    url, f"{where}: {text} (X.509 error {errno})", reason, errno, depth
                )
            if record.host_mismatch is not None:
                return PolicyCertificateError(
                    url,
                    f"certificate is not valid for {attempt.host} ({record.host_mismatch})",
                    "certificate-host-mismatch",
                )
        if any(f.check(DNSLookupError) for f in inner):
            # RFC 8461 §3.3 / DESIGN.md: a policy host that does not exist
            # means no policy is served.
            return NoPolicyServedError(url, f"policy host not found ({_describe(failure)})")
        if any(f.check(ConnectionRefusedError) for f in inner):
            return PolicyFetchError(url, "connection refused")
        if any(f.check(TCPTimeoutError) for f in inner):
            return PolicyFetchError(url, f"cannot connect ({_describe(failure)})")
        if any(f.check(SSL.Error) for f in inner):
            return PolicyFetchError(url, f"TLS handshake failed ({_describe(failure)})")
        return PolicyFetchError(url, _describe(failure))


def fetch_policy(
    reactor: Any,
    domain: str,
    trust_roots: Any = None,
    timeout: float = DEFAULT_TIMEOUT,
    name_resolver: IHostnameResolver | None = None,
    port: int = 443,
) -> Deferred[FetchedPolicy]:
    """
    Fetch the policy of C{domain} once; see L{PolicyFetcher}.

    @return: a L{Deferred} firing with a L{FetchedPolicy} or failing with a
        L{PolicyFetchError}.
    """
    fetcher = PolicyFetcher(
        reactor, trust_roots=trust_roots, timeout=timeout, name_resolver=name_resolver, port=port
    )
    return fetcher.fetch(domain)


# --- discovery: TXT record + policy ------------------------------------------


async def lookup_sts_record(resolver: Any, alabel: str) -> STSRecord:
    """
    Look up and select the STS record of C{alabel} (RFC 8461 §3.1).

    @param resolver: an L{mtasts_twisted.interfaces.IDNSResolver}.
    @raise NoRecordError: no TXT record, or none that is an STS record.
    @raise MultipleRecordsError: several STS records.
    @raise RecordSyntaxError: the STS record is malformed.
    @raise DNSTemporaryError: the lookup failed and may succeed later.
    """
    record, _ = await lookup_sts_answer(resolver, alabel)
    return record


async def lookup_sts_answer(resolver: Any, alabel: str) -> tuple[STSRecord, int]:
    """
    L{lookup_sts_record}, also giving the TXT answer's TTL (seconds left).
    """
    try:
        answer = await resolver.lookup_txt("_mta-sts." + alabel)
    except DNSNoRecordError as e:
        raise NoRecordError(f"no TXT record at _mta-sts.{alabel}") from e
    return _select_sts_record(tuple(answer.strings)), answer.ttl


@functools.lru_cache(maxsize=4096)
def _select_sts_record(strings: tuple[str, ...]) -> STSRecord:
    """L{select_sts_record}, memoised: a cached TXT answer is not parsed again."""
    return select_sts_record(strings)


@attrs.frozen
class Discovery:
    """
    A policy discovered afresh: the STS record and the policy it announces.

    @ivar domain: the policy domain, in A-labels.
    @ivar record: the L{STSRecord} (its C{id} names the policy version).
    @ivar policy: the parsed L{Policy}.
    @ivar text: the policy text as served.
    """

    domain: str
    record: STSRecord
    policy: Policy
    text: str


async def _discover(resolver: Any, fetcher: PolicyFetcher, domain: str) -> Discovery:
    alabel = to_alabel(domain)
    record = await lookup_sts_record(resolver, alabel)
    fetched = await fetcher.fetch(alabel)
    return Discovery(domain=alabel, record=record, policy=fetched.policy, text=fetched.text)


def discover(resolver: Any, fetcher: PolicyFetcher, domain: str) -> Deferred[Discovery]:
    """
    Discover the policy of C{domain} with no cache: TXT lookup, then fetch.

    @return: a L{Deferred} firing with a L{Discovery}, or failing with the
        errors of L{lookup_sts_record} or L{PolicyFetcher.fetch} (each with
        its TLSRPT C{reason}).
    """
    return Deferred.fromCoroutine(_discover(resolver, fetcher, domain))
