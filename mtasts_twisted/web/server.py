"""
The status page's HTTP server (C{--web}): a twisted.web L{Site} with one
read-only resource (L{StatusResource}), optionally behind authentication
(L{protect<mtasts_twisted.web.auth.protect>}), within L{WebLimits}.

Limits, like the metrics endpoint's (L{mtasts_twisted.metrics.http}):

  - C{GET} and C{HEAD} only (C{405} otherwise, from L{Resource.render}).
  - A request that announces a body (a C{Content-Length} other than 0, or
    any C{Transfer-Encoding}) is answered C{413} and the connection closed
    before any of the body is read (L{_NoBodyChannel}): nothing a client
    sends is kept beyond one request head.
  - The request head is capped (L{WebLimits.max_head} bytes,
    L{WebLimits.max_headers} fields; C{400} and close beyond).
  - Connections are capped (L{WebLimits.max_connections}); beyond the cap a
    new one is closed on accept.
  - A connection that completes no request for L{WebLimits.idle_timeout}
    seconds is closed (bytes of a request that never completes are not
    activity, so a client trickling a head cannot keep a slot).
  - Tables show at most L{MAX_ROWS<mtasts_twisted.web.sources.MAX_ROWS>} rows.
  - No log line per request, unless asked (C{log_requests}), nor per idle
    connection closed.

Every answer carries a C{Content-Security-Policy} that allows no script at
all, so even a value that escaped the escaping could not run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.template import Tag

from mtasts_twisted.web.pages import (
    domain_html,
    domains_html,
    overview_html,
    queue_html,
    render,
    report_json_html,
    reports_html,
)
from mtasts_twisted.web.sources import (
    WebSources,
    gather_domain,
    gather_domains,
    gather_overview,
    gather_queue,
    gather_report,
    gather_reports,
)

__all__ = ["WebLimits", "WebSite", "StatusResource"]

log = Logger()

#: The answers' security headers: no script, no frames, no sniffing, no caching.
SECURITY_HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                                b"form-action 'self'; frame-ancestors 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
}

#: The longest query parameter value used (a domain name is at most 253).
MAX_PARAMETER = 256

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


@attrs.frozen
class WebLimits:
    """
    The limits of the status page (README, "Limits").

    @ivar max_connections: connections open at once; beyond, a new one is
        closed on accept.
    @ivar idle_timeout: seconds a connection may stay idle.
    @ivar max_head: bytes of one request head.
    @ivar max_headers: header fields of one request.
    """

    max_connections: int = 16
    idle_timeout: float = 30.0
    max_head: int = 8192
    max_headers: int = 64


def _parameter(request: Request, name: str) -> str:
    values = (request.args or {}).get(name.encode("ascii"), [])
    if not values:
        return ""
    return values[0][:MAX_PARAMETER].decode("utf-8", "replace")


class StatusResource(Resource):
    """
    The status pages, by path: C{/} (overview), C{/domains?q=FILTER},
    C{/domain?name=DOMAIN}, C{/reports}, C{/report?day=DAY&domain=DOMAIN}
    (and C{/report.json}, the JSON alone), C{/queue}.  Read-only: C{GET} and C{HEAD}.
    """

    isLeaf = True
    allowedMethods = (b"GET", b"HEAD")

    def __init__(self, sources: WebSources) -> None:
        """
        @param sources: what the pages read.
        """
        super().__init__()
        self.sources = sources

    def render(self, request: Request) -> int | bytes:
        """C{405} for every method but C{GET} and C{HEAD}; else the page."""
        if request.method not in self.allowedMethods:
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            request.setHeader(b"Content-Type", b"text/plain")
            return b"only GET and HEAD: the status page changes nothing\n"
        return super().render(request)

    def render_GET(self, request: Request) -> int | bytes:
        """Answer one page (asynchronously: the store may be read)."""
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        if request.path == b"/report.json":
            d0: Deferred[bytes] = Deferred.fromCoroutine(self._report_json(request))
            d0.addCallback(lambda body: self._write(request, body))
            d0.addErrback(self._failed, request)
            return NOT_DONE_YET
        page = self._pages().get(request.path)
        if page is None:
            request.setResponseCode(404)
            return b"<!DOCTYPE html>\n<title>not found</title><p>not found</p>\n"
        d: Deferred[Tag] = Deferred.fromCoroutine(page(request))
        d.addCallback(lambda tag: self._write(request, render(tag)))
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    render_HEAD = render_GET

    def _pages(self) -> dict[bytes, Callable[[Request], Coroutine[Any, Any, Tag]]]:
        return {b"/": self._overview, b"/domains": self._domains, b"/domain": self._domain,
                b"/reports": self._reports, b"/report": self._report, b"/queue": self._queue}

    async def _overview(self, request: Request) -> Tag:
        return overview_html(await gather_overview(self.sources))

    async def _domains(self, request: Request) -> Tag:
        query = _parameter(request, "q")
        rows, total = await gather_domains(self.sources, query)
        return domains_html(rows, query, total)

    async def _domain(self, request: Request) -> Tag:
        return domain_html(await gather_domain(self.sources, _parameter(request, "name")))

    async def _reports(self, request: Request) -> Tag:
        return reports_html(await gather_reports(self.sources), sorted(self.sources.stats.reports.items()))

    async def _report(self, request: Request) -> Tag:
        day, domain = _parameter(request, "day"), _parameter(request, "domain")
        report = await gather_report(self.sources, day, domain) if _DAY.fullmatch(day) else None
        return report_json_html(day, domain, report)

    async def _report_json(self, request: Request) -> bytes:
        """The report's JSON itself (C{application/json}; 404 when there is none)."""
        day, domain = _parameter(request, "day"), _parameter(request, "domain")
        report = await gather_report(self.sources, day, domain) if _DAY.fullmatch(day) else None
        if report is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"no results stored for this day and domain\n"
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(report, indent=2, sort_keys=True).encode("utf-8") + b"\n"

    async def _queue(self, request: Request) -> Tag:
        return queue_html(gather_queue(self.sources), self.sources.clock.seconds())

    def _write(self, request: Request, body: bytes) -> None:
        if request.finished or request.channel is None:
            return
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: Request) -> None:
        log.failure("web: cannot render {path}", failure, path=request.path.decode("ascii", "replace"))
        if request.finished or request.channel is None:
            return
        request.setResponseCode(500)
        self._write(request, b"<!DOCTYPE html>\n<title>error</title><p>cannot render this page (logged)</p>\n")


class _NoBodyChannel(HTTPChannel):
    """An C{HTTPChannel} that refuses a request body before reading any of it, within the head limits."""

    site: WebSite

    def dataReceived(self, data: bytes) -> None:
        """
        Take C{data} without restarting the idle timer: bytes of a request
        that never completes are not activity (C{HTTPChannel} restarts it
        once a request is answered).
        """
        LineReceiver.dataReceived(self, data)

    def timeoutConnection(self) -> None:
        """Close an idle connection, quietly (a browser leaves one idle after each visit)."""
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def allHeadersReceived(self) -> None:
        headers = self.requests[-1].requestHeaders
        length = headers.getRawHeaders(b"content-length", [b"0"])
        if headers.hasHeader(b"transfer-encoding") or length != [b"0"]:
            self.transport.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n"  # type: ignore[union-attr]
                                 b"Connection: close\r\n\r\n")
            # Whatever follows (the body) is dropped unread.
            self.dataReceived = self.rawDataReceived = self.lineReceived = _ignore  # type: ignore[method-assign,assignment]
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        super().allHeadersReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.site.connections -= 1
        super().connectionLost(reason)


def _ignore(*args: object) -> None:
    return None


class WebSite(Site):
    """
    The status page's L{Site} within L{WebLimits}.

    @ivar limits: the L{WebLimits}.
    @ivar connections: connections open now.
    @ivar log_requests: log one line per request.
    """

    noisy = False

    def __init__(self, resource: IResource, clock: IReactorTime, limits: WebLimits = WebLimits(),
                 log_requests: bool = False) -> None:
        """
        @param resource: the root resource (a L{StatusResource}, or one
            behind L{protect}).
        @param clock: the reactor (the idle timeouts).
        @param limits: the limits.
        @param log_requests: log one line per request.
        """
        super().__init__(resource, timeout=limits.idle_timeout, reactor=clock)
        self.limits = limits
        self.log_requests = log_requests
        self.connections = 0

    protocol = _NoBodyChannel  # type: ignore[assignment]

    def logPrefix(self) -> str:
        """Name the endpoint in the port's log lines."""
        return "mtasts web"

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """A channel, or L{None} (closed on accept) beyond the connection cap."""
        if self.connections >= self.limits.max_connections:
            return None
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.totalHeadersSize = self.limits.max_head
            channel.maxHeaders = self.limits.max_headers
            self.connections += 1
        return channel

    def log(self, request: http.Request) -> None:
        """One line per request, only if asked (no access log by default)."""
        if self.log_requests:
            log.info("web: {method} {uri} from {peer}: {code}", method=request.method.decode("ascii", "replace"),
                     uri=request.uri.decode("ascii", "replace"), peer=str(request.getClientAddress()),
                     code=request.code)
