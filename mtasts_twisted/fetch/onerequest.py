"""
One HTTP/1.1 GET on a connection of its own: the policy fetch's request.

A policy fetch makes exactly one request to one host and never reuses the
connection (RFC 8461 §3.3 needs none), so it needs nothing of an HTTP
client's machinery but the protocol: no URL parsing, no connection pool, no
redirect or content-decoding layers, no cookies.  L{get_once} connects
through the fetch's endpoint, writes the request with Twisted's
L{HTTP11ClientProtocol} (which parses the response, chunked or not) and
gives its L{IResponse}.  On the cold-lookup path this replaced treq's
C{HTTPClient} over C{Agent} and C{HTTPConnectionPool}: those layers cost
about a tenth of the CPU of a cold lookup (bench/RESULTS.md, issue 19).

Errors are those of the endpoint's C{connect} and of
L{HTTP11ClientProtocol.request} (C{ResponseNeverReceived},
C{ResponseFailed}, C{RequestTransmissionFailed}, each carrying the inner
failures), as C{Agent} passed them on before.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.web._newclient import HTTP11ClientProtocol, Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

__all__ = ["WELL_KNOWN_PATH", "get_once"]

#: RFC 8461 §3.3: the policy is at this path of the policy host.
WELL_KNOWN_PATH = b"/.well-known/mta-sts.txt"


class _OneRequestFactory(Factory):
    """Builds the HTTP/1.1 client protocol of one fetch's connection."""

    protocol = HTTP11ClientProtocol
    # One "Starting factory" log line per fetch is noise.
    noisy = False


_FACTORY = _OneRequestFactory()


async def get_once(
    endpoint: IStreamClientEndpoint, host: bytes, path: bytes, user_agent: bytes
) -> IResponse:
    """
    Connect through C{endpoint} and GET C{path} once.

    @param endpoint: connects to the server (TLS included); its C{connect}
        must give the protocol C{Factory.buildProtocol} built (not a
        wrapper of it).
    @param host: the C{Host} header's value (RFC 9112 §3.2: required).
    @param path: the request target, absolute path form.
    @param user_agent: the C{User-Agent} header's value.
    @return: the response, as soon as its headers are in; read the body
        with C{deliverBody}.  The connection is not persistent: the request
        says C{Connection: close}.
    """
    protocol = await endpoint.connect(_FACTORY)
    headers = Headers(
        {
            b"host": [host],
            b"user-agent": [user_agent],
            # A policy is fetched fresh (RFC 8461 §3.3 leaves caching to the
            # sender, which caches the parsed policy itself).
            b"cache-control": [b"no-cache"],
            # RFC 9110 §12.5.3: without Accept-Encoding any content coding
            # would be acceptable; the policy text is read as sent.
            b"accept-encoding": [b"identity"],
        }
    )
    request = Request(b"GET", path, headers, None, persistent=False)
    client: HTTP11ClientProtocol = protocol  # type: ignore[assignment]
    response: Deferred[IResponse] = client.request(request)
    return await response
