"""
Delivery of TLSRPT reports to C{https:} rua URIs (RFC 8460 §5.4).

L{HTTPSReportSender.send} POSTs the gzip-compressed report as
C{application/tlsrpt+gzip} with treq.  Any 2xx answer is success (§5.4:
"a 'successful' response ... typically a 200 or 201"); anything else, a
redirect included, is a L{ReportDeliveryError} the scheduler retries.  One
timeout covers connecting, TLS, the request and reading the answer.

The endpoint's certificate is verified as the policy host's is: one
OpenSSL context per sender (L{mtasts_twisted.pkix.client_context}) and the
package's recording verify callback per connection
(L{mtasts_twisted.pkix.RecordingConnectionCreator}), so a refused
certificate's error says why.
"""

from __future__ import annotations

from typing import cast

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHostnameResolver, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgent, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from mtasts_twisted import __version__
from mtasts_twisted.dns import reactor_with_resolver
from mtasts_twisted.fetch.endpoint import ClientReactor
from mtasts_twisted.pkix import RecordingConnectionCreator, TrustRootSpec, client_context, load_trust_roots
from mtasts_twisted.policy import MTASTSError
from mtasts_twisted.tlsrpt.report import GZIP_MEDIA_TYPE, Report

__all__ = ["DEFAULT_TIMEOUT", "HTTPSReportSender", "ReportDeliveryError"]

log = Logger()

#: Seconds for one POST: connect, TLS, request, answer.
DEFAULT_TIMEOUT = 120.0

_USER_AGENT = f"mtasts-twisted/{__version__} (TLSRPT)".encode("ascii")
# Answers are read and dropped; past this many bytes the connection is cut.
_MAX_ANSWER = 64 * 1024


class ReportDeliveryError(MTASTSError):
    """
    A rua endpoint did not accept a report.

    @ivar uri: the rua URI.
    @ivar detail: what went wrong.
    @ivar reason: C{http-status}, C{timeout}, C{connection-failed} or
        C{mail-failed}.
    """

    reason = "connection-failed"

    def __init__(self, uri: str, detail: str, reason: str | None = None) -> None:
        super().__init__(f"{uri}: {detail}", reason=reason)
        self.uri = uri
        self.detail = detail


@implementer(IPolicyForHTTPS)
class _VerifyingPolicy:
    """
    Every https connection of a sender: its one OpenSSL context, SNI, and
    the recording verify callback checking the endpoint's host.
    """

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def creatorForNetloc(self, hostname: bytes, port: int) -> RecordingConnectionCreator:
        """A creator for one connection to C{hostname} (A-labels or an address)."""
        return RecordingConnectionCreator(hostname.decode("ascii"), self._context)


class _Drain(Protocol):
    """Reads and drops a response body; cuts it off past L{_MAX_ANSWER}."""

    def __init__(self) -> None:
        self.finished: Deferred[None] = Deferred()
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > _MAX_ANSWER and self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Whatever ended the body (done, cut off, lost), the status counts.
        if not self.finished.called:
            self.finished.callback(None)

    def abort(self) -> None:
        """Stop reading (the connection is closed)."""
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory, without its "Starting factory" log line per connection."""

    noisy = False


def _quiet_pool(reactor: ClientReactor) -> HTTPConnectionPool:
    """A non-persistent pool whose connections log no factory lines."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietHTTP11ClientFactory
    return pool


class HTTPSReportSender:
    """
    POSTs reports to C{https:} rua URIs.

    Certificates are verified against C{trust_roots} (RFC 8460 §3 allows
    ignoring errors; we do not: a report may carry details of the
    sender's traffic).
    """

    def __init__(
        self,
        reactor: ClientReactor,
        trust_roots: TrustRootSpec = None,
        name_resolver: IHostnameResolver | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        agent: IAgent | None = None,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP}, C{IReactorTime} and, unless
            C{name_resolver} is given, C{IReactorPluggableNameResolver}.
        @param trust_roots: see L{mtasts_twisted.pkix.load_trust_roots};
            L{None} for the platform's roots.
        @param name_resolver: resolves the endpoints' host names (e.g.
            through configured nameservers); the reactor's by default.
        @param timeout: seconds for one POST, start to end.
        @param agent: an L{IAgent} to use instead of building one (then
            C{trust_roots} and C{name_resolver} are ignored).
        """
        self._reactor = reactor
        self._timeout = timeout
        if agent is None:
            connect = reactor if name_resolver is None else reactor_with_resolver(reactor, name_resolver)
            agent = Agent(
                connect,
                # One OpenSSL context per sender, not per POST.
                contextFactory=_VerifyingPolicy(client_context(load_trust_roots(trust_roots))),
                connectTimeout=timeout,
                # One report per connection: nothing to keep open between days.
                pool=_quiet_pool(reactor),
            )
        # treq (and hyperlink, for its URLs) loads only once a report
        # sender exists: a process that sends no reports stays smaller.
        from treq.client import HTTPClient

        self._client = HTTPClient(agent)

    def send(self, uri: str, report: Report) -> Deferred[int]:
        """
        POST C{report} to C{uri}.

        @param uri: an C{https:} rua URI.
        @param report: the report.
        @return: L{Deferred} firing with the 2xx status code, or failing
            with L{ReportDeliveryError}.
        """
        if not uri.lower().startswith("https:"):
            return Deferred.fromCoroutine(self._refuse(uri))
        drain = _Drain()
        d = Deferred.fromCoroutine(self._send(uri, report, drain))
        timed_out = []

        def time_out() -> None:
            timed_out.append(True)
            drain.abort()
            d.cancel()

        timer = self._reactor.callLater(self._timeout, time_out)

        def done(result: int | Failure) -> int | Failure:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                if timed_out and not result.check(ReportDeliveryError):
                    # Cancelling shows up as CancelledError or wrapped in
                    # ResponseNeverReceived / ResponseFailed.
                    result = Failure(
                        ReportDeliveryError(uri, f"no answer within {self._timeout:g} s", "timeout")
                    )
                elif not result.check(ReportDeliveryError, CancelledError):
                    result = Failure(
                        ReportDeliveryError(uri, _describe(result), "connection-failed")
                    )
                log.info(
                    "TLSRPT report {report_id} to {uri} failed: {error}",
                    report_id=report.report_id, uri=uri, error=result.getErrorMessage(),
                )
            else:
                log.info(
                    "TLSRPT report {report_id} to {uri} accepted: HTTP {code}",
                    report_id=report.report_id, uri=uri, code=result,
                )
            return result

        return d.addBoth(done)

    async def _refuse(self, uri: str) -> int:
        raise ReportDeliveryError(uri, "not an https: URI", "connection-failed")

    async def _send(self, uri: str, report: Report, drain: _Drain) -> int:
        headers: dict[bytes | str, list[bytes | str]] = {
            # RFC 8460 §5.4: "the report SHOULD use the media type
            # application/tlsrpt+gzip" when compressed (§5.2).
            b"Content-Type": [GZIP_MEDIA_TYPE.encode("ascii")],
            b"User-Agent": [_USER_AGENT],
        }
        response: IResponse = await self._client.post(
            uri,
            data=report.gzip_bytes(),
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
        )
        response.deliverBody(drain)
        await drain.finished
        code = response.code
        # RFC 8460 §5.4: a "successful" response; other codes "could
        # indicate a delivery failure, and may be retried".
        if not 200 <= code < 300:
            phrase = response.phrase.decode("latin-1", "replace") if response.phrase else ""
            raise ReportDeliveryError(uri, f"HTTP {code} {phrase}".strip(), "http-status")
        return code


def _describe(failure: Failure) -> str:
    # treq/Agent wrap the interesting error in ResponseNeverReceived etc.
    inner = getattr(failure.value, "reasons", None)
    if inner:
        return "; ".join(_message(f) for f in inner)
    return _message(failure)


def _message(failure: Failure) -> str:
    return failure.getErrorMessage() or type(failure.value).__name__
