"""
Test helpers for TLSRPT reporting: a loopback HTTPS report receiver and a
recording C{send_mail}.

L{ReportReceiver} is an HTTPS server on 127.0.0.1 with a certificate for one
host name from a L{mtasts_twisted.testing.pki.PKI}; it records every request
(method, path, headers, body) and answers with a configurable status, or
never::

    pki = PKI()
    receiver = ReportReceiver(reactor, pki)
    receiver.start()
    self.addCleanup(receiver.stop)
    sender = HTTPSReportSender(reactor, trust_roots=pki.ca_pem,
                               name_resolver=receiver.resolver())
    await sender.send(receiver.url(), report)
    [request] = receiver.requests
    report_json = request.report()

L{RecordingMailer} is a C{send_mail} callable (see
L{mtasts_twisted.tlsrpt.mail.SendMail}) that keeps the messages.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mtasts_twisted.testing.serving import (
    ConnectionTracker,
    StaticHostnameResolver,
    TCPServerReactor,
    port_number,
    stop_server,
)
from mtasts_twisted.testing.pki import PKI

__all__ = ["MailFailure", "ReceivedRequest", "RecordingMailer", "ReportReceiver", "SentMail"]


@attrs.frozen
class ReceivedRequest:
    """
    One request the L{ReportReceiver} got.

    @ivar method: e.g. C{"POST"}.
    @ivar path: the request path.
    @ivar headers: C{(lower-case name, value)} pairs.
    @ivar body: the raw body.
    @ivar status: the status answered (L{None} if never answered).
    """

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    status: int | None

    def header(self, name: str) -> str | None:
        """The first value of header C{name}, or L{None}."""
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None

    def report(self) -> dict[str, Any]:
        """The body, gunzipped and parsed as JSON."""
        return json.loads(gzip.decompress(self.body))


class _Receive(Resource):
    isLeaf = True

    def __init__(self, receiver: ReportReceiver) -> None:
        super().__init__()
        self._receiver = receiver

    def render(self, request: Request) -> bytes | int:
        receiver = self._receiver
        status = receiver.statuses.pop(0) if receiver.statuses else receiver.status
        content = request.content
        assert content is not None  # the body is read before render
        content.seek(0)
        receiver.requests.append(
            ReceivedRequest(
                method=request.method.decode("ascii"),
                path=request.path.decode("ascii", "replace"),
                headers=tuple(
                    (k.decode("latin-1").lower(), v.decode("latin-1"))
                    for k, values in request.requestHeaders.getAllRawHeaders()
                    for v in values
                ),
                body=content.read(),
                status=status,
            )
        )
        if status is None:
            return NOT_DONE_YET  # never answer
        request.setResponseCode(status)
        if 300 <= status < 400:
            request.setHeader(b"Location", b"https://elsewhere.invalid/")
        return b"thanks\n" if 200 <= status < 300 else b"no\n"


class ReportReceiver:
    """
    A loopback HTTPS endpoint for C{https:} rua.

    @ivar host: the host name its certificate is for.
    @ivar port: the TCP port, after L{start}.
    @ivar requests: every L{ReceivedRequest}, in order.
    @ivar status: the status to answer with (L{None}: never answer).
    @ivar statuses: statuses for the next requests, used first, in order.
    """

    def __init__(self, reactor: TCPServerReactor, pki: PKI, host: str = "reports.example.test") -> None:
        """
        @param reactor: an C{IReactorTCP} (see L{TCPServerReactor}): TLS is
            done in memory, over plain TCP.
        @param pki: issues the server certificate (trust C{pki.ca_pem}).
        @param host: the name in the certificate and in L{url}.
        """
        self._reactor = reactor
        self._pki = pki
        self.host = host
        self.port = 0
        self.status: int | None = 200
        self.statuses: list[int | None] = []
        self.requests: list[ReceivedRequest] = []
        self._listening: IListeningPort | None = None
        self._tracker: ConnectionTracker | None = None

    def start(self) -> int:
        """Listen on 127.0.0.1 (ephemeral port); return the port."""
        from twisted.protocols.tls import TLSMemoryBIOFactory

        site = Site(_Receive(self), timeout=None)
        site.noisy = False
        options = self._pki.valid(self.host).server_options()
        tls = TLSMemoryBIOFactory(options, False, site)
        tls.noisy = False
        self._tracker = ConnectionTracker(tls)
        self._tracker.noisy = False
        self._listening = self._reactor.listenTCP(0, self._tracker, interface="127.0.0.1")
        self.port = port_number(self._listening.getHost())
        return self.port

    def url(self, path: str = "/tlsrpt") -> str:
        """An C{https:} rua URI for this receiver."""
        return f"https://{self.host}:{self.port}{path}"

    def resolver(self) -> StaticHostnameResolver:
        """A host-name resolver pointing L{host} at 127.0.0.1."""
        return StaticHostnameResolver({self.host: "127.0.0.1"})

    @property
    def posts(self) -> list[ReceivedRequest]:
        """The C{POST} requests."""
        return [r for r in self.requests if r.method == "POST"]

    def connections_closed(self) -> Deferred[None]:
        """Fire when every connection open now has closed (from either end)."""
        open_now = list(self._tracker.protocols) if self._tracker is not None else []
        return gatherResults([c.closed for c in open_now]).addCallback(lambda _: None)

    def stop(self) -> Deferred[None]:
        """Stop listening and abort open connections; fires when all are gone."""
        listening, self._listening = self._listening, None
        return stop_server(listening, self._tracker)


@attrs.frozen
class SentMail:
    """
    One message handed to a L{RecordingMailer}.

    @ivar sender: the envelope sender.
    @ivar recipient: the envelope recipient.
    @ivar message: the message bytes.
    """

    sender: str
    recipient: str
    message: bytes


class MailFailure(Exception):
    """What a L{RecordingMailer} fails with when told to."""


class RecordingMailer:
    """
    A C{send_mail(sender, recipient, message) -> Deferred} that records.

    @ivar sent: every accepted L{SentMail}.
    @ivar attempts: every call, accepted or not.
    @ivar failures: how many of the next calls fail with L{MailFailure}.
    """

    def __init__(self, failures: int = 0) -> None:
        """@param failures: see L{failures}."""
        self.sent: list[SentMail] = []
        self.attempts: list[SentMail] = []
        self.failures = failures

    def __call__(self, sender: str, recipient: str, message: bytes) -> Deferred[None]:
        """Accept (record) or refuse one message."""
        mail = SentMail(sender, recipient, message)
        self.attempts.append(mail)
        if self.failures > 0:
            self.failures -= 1
            return fail(MailFailure(f"451 try again later ({recipient})"))
        self.sent.append(mail)
        return succeed(None)
