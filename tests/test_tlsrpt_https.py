"""
Tests for L{mtasts_twisted.tlsrpt.https} (RFC 8460 §5.4) against the
loopback HTTPS receiver of L{mtasts_twisted.testing.tlsrpt}: real sockets,
real TLS.
"""

from __future__ import annotations

import gzip
import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from mtasts_twisted.testing.pki import PKI
from mtasts_twisted.tlsrpt.https import HTTPSReportSender, ReportDeliveryError
from mtasts_twisted.testing.tlsrpt import ReportReceiver
from tests.test_tlsrpt_report import (
    assert_independent_parse,
    make_report,
    validate_report,
)

_PKI = PKI()


class HTTPSSenderTests(TestCase):
    timeout = 15

    def setUp(self):
        self.receiver = ReportReceiver(reactor, _PKI)
        self.receiver.start()
        self.addCleanup(self.receiver.stop)
        self.report = make_report()

    def sender(self, timeout=10.0, trust=_PKI.ca_pem):
        return HTTPSReportSender(
            reactor, trust_roots=trust, name_resolver=self.receiver.resolver(), timeout=timeout
        )

    async def _post(self, **kwargs):
        return await self.sender(**kwargs).send(self.receiver.url(), self.report)

    def post(self, **kwargs) -> Deferred:
        return Deferred.fromCoroutine(self._post(**kwargs))

    def test_post(self):
        """The report is POSTed gzip-compressed as application/tlsrpt+gzip."""

        def check(code):
            self.assertEqual(code, 200)
            [request] = self.receiver.requests
            self.assertEqual((request.method, request.path), ("POST", "/tlsrpt"))
            self.assertEqual(request.header("content-type"), "application/tlsrpt+gzip")
            self.assertEqual(request.body[:2], b"\x1f\x8b")
            body = json.loads(gzip.decompress(request.body))
            self.assertEqual(body, self.report.to_json())
            validate_report(body)
            assert_independent_parse(self, self.report, gzip.decompress(request.body))
            self.assertIn("mtasts-twisted", request.header("user-agent"))

        return self.post().addCallback(check)

    def test_any_2xx(self):
        """RFC 8460 §5.4: any 2xx is success."""
        self.receiver.statuses = [201, 204]

        async def both():
            return [await self._post(), await self._post()]

        d = Deferred.fromCoroutine(both())
        return d.addCallback(self.assertEqual, [201, 204])

    def _fails(self, reason, substring, **kwargs):
        d = self.post(**kwargs)
        d = self.assertFailure(d, ReportDeliveryError)

        def check(error):
            self.assertEqual(error.reason, reason)
            self.assertIn(substring, str(error))
            self.assertEqual(error.uri, self.receiver.url())
            return error

        return d.addCallback(check)

    def test_server_error(self):
        """A 5xx is a failure naming the status."""
        self.receiver.status = 503
        return self._fails("http-status", "HTTP 503")

    def test_redirect_not_followed(self):
        """A redirect is not followed: a failure, one request."""
        self.receiver.status = 302

        def check(_):
            self.assertEqual(len(self.receiver.requests), 1)

        return self._fails("http-status", "HTTP 302").addCallback(check)

    def test_timeout(self):
        """A server that never answers fails with a timeout, connection closed."""
        self.receiver.status = None

        def check(_):
            self.assertEqual(len(self.receiver.requests), 1)
            # The client gave up and closed the connection (the test would
            # time out otherwise).
            return self.receiver.connections_closed()

        return self._fails("timeout", "no answer within 0.5 s", timeout=0.5).addCallback(check)

    def test_untrusted_certificate(self):
        """The endpoint's certificate is verified against the trust roots."""
        other = PKI()

        def check(_):
            self.assertEqual(self.receiver.requests, [])

        return self._fails("connection-failed", "", trust=other.ca_pem).addCallback(check)

    def test_connection_refused(self):
        """Nothing listening: a clear failure."""

        async def go():
            await self.receiver.stop()
            return await self._post()

        d = self.assertFailure(Deferred.fromCoroutine(go()), ReportDeliveryError)
        return d.addCallback(lambda e: self.assertEqual(e.reason, "connection-failed"))

    def test_not_https(self):
        """Only https: URIs are POSTed to."""
        d = self.sender().send("http://reports.example.test/", self.report)
        return self.assertFailure(d, ReportDeliveryError)
