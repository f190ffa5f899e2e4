"""
Fetching an MTA-STS policy over HTTPS (RFC 8461 §3.3).

L{PolicyFetcher.fetch} GETs C{https://mta-sts.<domain>/.well-known/mta-sts.txt}
with treq and either returns a L{FetchedPolicy} or fails with a
L{PolicyFetchError} whose C{result_type} and C{reason} are the RFC 8460
result type and failure reason code a TLSRPT report should carry.

The rules enforced (RFC 8461 §3.3 and the project rulings in
docs/design.rst): PKIX validation of the policy host's certificate
(platform roots or given trust roots) with SNI and host-name verification;
TLS 1.2 or newer; no redirects; only status 200; C{Content-Type:
text/plain} (parameters allowed); a body of at most 65536 bytes, enforced
while streaming; and one timeout covering connect, TLS handshake, headers
and body.  Nothing is cached and no connection is reused.

To tell certificate failures apart, each connection gets the package's
recording verify callback (L{mtasts_twisted.pkix.VerifyRecorder}: OpenSSL's
verdict, the service_identity host-name check Twisted's would do, and why
it failed), so an expired certificate, an untrusted issuer and a wrong name
map to different TLSRPT reason codes.  TLS failures that are not
certificate failures (no common protocol version, handshake alerts) are
classified as C{cannot-fetch-policy}: RFC 8460 reserves
C{sts-webpki-invalid} for a policy host whose certificate does not
validate.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError as TCPTimeoutError,
)
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from mtasts_twisted import __version__
from mtasts_twisted.dns import DNSHostnameResolver, DNSNoRecordError, DNSTemporaryError, reactor_with_resolver
from mtasts_twisted.fetch.endpoint import Attempt, ClientReactor, PolicyHostEndpoint
from mtasts_twisted.fetch.onerequest import WELL_KNOWN_PATH, get_once
from mtasts_twisted.fetch.errors import (
    InvalidPolicyError,
    NoPolicyServedError,
    PolicyCertificateError,
    PolicyFetchError,
    PolicyTooLargeError,
    WrongContentTypeError,
)
from mtasts_twisted.interfaces import IDNSResolver, IPolicyFetcher
from mtasts_twisted.pkix import (
    CertificateVerifyError,
    RecordingConnectionCreator,
    TrustRootSpec,
    classify_verify_error,
    client_context,
    load_trust_roots,
)
from mtasts_twisted.policy import (  # MAX_POLICY_SIZE: 65536, docs/design.rst
    MAX_POLICY_SIZE,
    DomainError,
    Policy,
    PolicySyntaxError,
    parse_policy,
    to_alabel,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "FetchedPolicy",
    "PolicyFetcher",
    "fetch_policy",
    "policy_url",
]

log = Logger()


#: RFC 8461 §3.3: "a timeout [...] of 60 seconds is RECOMMENDED".
DEFAULT_TIMEOUT = 60.0

_USER_AGENT = f"mtasts-twisted/{__version__}".encode("ascii")


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


# --- the body, capped while streaming ---------------------------------------


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _CappedBody(Protocol):
    """Collects a response body; fails as soon as it passes C{limit} bytes."""

    def __init__(self, limit: int, abort: Callable[[], None]) -> None:
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
            # RFC 8461 §3.3 / docs/design.rst: cap the body; close the connection
            # at once rather than drain an endless body.
            self._abort()
            self.finished.errback(_TooLarge(self._size))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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


@implementer(IPolicyFetcher)
class PolicyFetcher:
    """
    Fetches MTA-STS policies (RFC 8461 §3.3).

    Every L{fetch} is independent: a new connection, no cache, no TLS
    session reuse.  A fetcher holds no connections between fetches; its one
    OpenSSL context (trust roots, TLS >= 1.2, ciphers) is built once.
    """

    def __init__(
        self,
        reactor: ClientReactor,
        trust_roots: TrustRootSpec = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_size: int = MAX_POLICY_SIZE,
        name_resolver: IHostnameResolver | None = None,
        port: int = 443,
        resolver: IDNSResolver | None = None,
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
        self._tls_context = client_context(self._trust_root)
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
        attempt = Attempt(RecordingConnectionCreator(host, self._tls_context), host, url, self._timeout)
        # No "fetching" event: the outcome is logged once below (one event
        # per fetch, not two, on the cold-lookup path).
        d = Deferred.fromCoroutine(self._fetch(attempt, host))

        def time_out() -> None:
            attempt.timed_out = True
            attempt.abort()
            d.cancel()

        # One timer for everything (docs/design.rst; treq's timeout= covers
        # only the headers).
        timer = self._reactor.callLater(self._timeout, time_out)

        def finish(result: FetchedPolicy | Failure) -> Deferred[FetchedPolicy]:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                if attempt.timed_out and result.check(CancelledError):
                    result = Failure(attempt.timeout_error())
                error = result.value
                if isinstance(error, PolicyFetchError):
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

    async def _fetch(self, attempt: Attempt, host: str) -> FetchedPolicy:
        url = attempt.url
        addresses = None
        if self._dns is not None:
            try:
                answer = await self._dns.lookup_addresses(host)
            except DNSNoRecordError:
                # RFC 8461 §3.3 / docs/design.rst: no policy host, no policy
                # served.
                raise NoPolicyServedError(url, f"policy host {host} does not exist") from None
            except DNSTemporaryError as e:
                raise PolicyFetchError(url, f"temporary DNS failure for {host}: {e.detail or e}") from None
            if self._connect_resolved:
                addresses = tuple(answer.addresses)
        endpoint = PolicyHostEndpoint(
            self._connect_reactor, self._reactor, host, self._port, attempt, addresses
        )
        try:
            # One GET on a connection of its own: no pool, no redirects
            # (RFC 8461 §3.3: "HTTP 3xx redirects MUST NOT be followed").
            # Host names the policy host as the URL does (the port is
            # overridden only in tests).
            response: IResponse = await get_once(endpoint, host.encode("ascii"), WELL_KNOWN_PATH, _USER_AGENT)
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

    def _classify(self, attempt: Attempt, failure: Failure) -> Exception:
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
        for recorder in attempt.creator.recorders:
            deciding = recorder.deciding_error()
            if deciding is not None:
                depth, errnum = deciding
                reason = classify_verify_error(errnum).reason
                return PolicyCertificateError(url, recorder.describe(), reason, errnum, depth)
            if recorder.host_mismatch:
                return PolicyCertificateError(url, recorder.describe(), "certificate-host-mismatch")
        if any(f.check(DNSLookupError) for f in inner):
            # RFC 8461 §3.3 / docs/design.rst: a policy host that does not
            # exist means no policy is served.
            return NoPolicyServedError(url, f"policy host not found ({_describe(failure)})")
        if any(f.check(ConnectionRefusedError) for f in inner):
            return PolicyFetchError(url, "connection refused")
        if any(f.check(TCPTimeoutError) for f in inner):
            return PolicyFetchError(url, f"cannot connect ({_describe(failure)})")
        if any(f.check(SSL.Error, CertificateVerifyError) for f in inner):
            return PolicyFetchError(url, f"TLS handshake failed ({_describe(failure)})")
        return PolicyFetchError(url, _describe(failure))


def fetch_policy(
    reactor: ClientReactor,
    domain: str,
    trust_roots: TrustRootSpec = None,
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
