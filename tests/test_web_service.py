"""
The status page of C{twistd mtasts} (C{--web}) over real loopback sockets:
each page served from a running service with data in it, escaping through
the whole path, read-only and bounded like the metrics endpoint, and
authentication when it binds beyond loopback.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from html.parser import HTMLParser
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtasts_twisted import service
from mtasts_twisted.cache import POLICY_TABLE, CacheEntry
from mtasts_twisted.delivery.values import DeliveryResult, RecipientOutcome, Status
from mtasts_twisted.metrics import MeteredDeliverer, MeteredSink
from mtasts_twisted.policy import Mode, Policy
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.tlsrpt import RESULTS_TABLE
from mtasts_twisted.tlsrpt.aggregate import encode_results, results_key
from mtasts_twisted.tlsrpt.report import day_of
from mtasts_twisted.web import WebLimits

from .clients import RawClient
from .test_metrics_http import server_transports, settle

EPHEMERAL = "tcp:0:interface=127.0.0.1"
EVIL = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


async def populate(svc: Any, evil: str = EVIL) -> None:
    """Put real data in a running service: cached policies, today's results, deliveries, TLS failures."""
    store = svc.runtime.store
    now = reactor.seconds()
    for domain, mode, text, mx in [
        ("example.com", Mode.ENFORCE, "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n",
         ("mx.example.com",)),
        # RFC 8461 §3.2: an extension's value may hold < > " and /, so a policy can carry markup.
        ("testing.example", Mode.TESTING, "version: STSv1\nmode: testing\nmx: mx.testing.example\nmax_age: 86400\n"
         'x_evil: <script>alert(1)</script>"><img/src/onerror\n', ("mx.testing.example",)),
    ]:
        entry = CacheEntry(domain, domain, now, now, now, record_id="20251203",
                           policy=Policy(mode=mode, max_age=86400, mx=mx, text=text), valid_end=now + 86400,
                           backoff_failure=FailureDetails(ResultType.STS_POLICY_FETCH_ERROR,
                                                          failure_reason_code=evil) if mode is Mode.TESTING else None)
        await store.shelf(POLICY_TABLE).put(domain, entry.to_json())
    failures = (FailureDetails(ResultType.CERTIFICATE_EXPIRED, receiving_mx_hostname="mx.example.com",
                               failed_session_count=2),)
    result = Result(PolicyDescriptor(PolicyType.STS, "example.com", ("version: STSv1", "mode: enforce"),
                                     ("mx.example.com",)), success_count=5, failures=failures)
    await store.shelf(RESULTS_TABLE).put(results_key(day_of(now), "example.com"), encode_results([result]))
    MeteredSink(None, svc.stats).record(result)
    outcomes = {
        "example.com": (Mode.ENFORCE, [RecipientOutcome("a@example.com", Status.DELIVERED, 250, "2.0.0 ok",
                                                        "mx.example.com", "TLSv1.3", True)] * 3),
        "testing.example": (Mode.TESTING, [RecipientOutcome("b@testing.example", Status.TRANSIENT, 421, evil,
                                                            evil, None, False)]),
    }

    class Deliverer:
        def __init__(self, result: DeliveryResult) -> None:
            self.result = result

        def deliver(self, *args: Any, **kw: Any) -> Any:
            return succeed(self.result)

    for domain, (mode, recipients) in outcomes.items():
        delivered = DeliveryResult(domain, mode, tuple(recipients), ())
        await MeteredDeliverer(Deliverer(delivered), svc.stats).deliver("s@x", [r.recipient for r in recipients],
                                                                        None)  # type: ignore[arg-type]


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.extend(name for name, _ in attrs)


class WebServiceCase(TestCase):
    """A running service with C{--web} (and a DNS server), and requests to it."""

    timeout = 60

    def setUp(self) -> None:
        self.dns = DNSTestServer()
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)

    async def start(self, *extra: str) -> tuple[Any, int]:
        options = service.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--nameserver", self.dns.nameserver,
                              "--socketmap", "none", "--smtp", "none", "--web", EPHEMERAL,
                              "--report-org", "Example", "--report-from", "tlsrpt@example.org", *extra])
        svc = service.makeService(options, reactor, fatal=lambda code: None)
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        self.assertTrue(await svc.ready)
        return svc, svc.listeners["web"].port.getHost().port

    async def connect(self, port: int) -> RawClient:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: None if client.closed.called else (client.transport.abortConnection(),
                                                                    client.closed)[1])
        return client

    async def get(self, port: int, path: str, headers: str = "") -> tuple[int, bytes, bytes]:
        """One GET on a new connection: status, head, body."""
        client = await self.connect(port)
        client.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n".encode())
        await settle(lambda: client.closed.called)
        head, _, body = client.data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), head, body


class WebServiceTests(WebServiceCase):
    """The service's C{--web} listener."""

    async def test_pages(self) -> None:
        """Every page answers 200 with its data; charts have one point per non-zero hour and series."""
        svc, port = await self.start()
        await populate(svc)
        status, head, body = await self.get(port, "/")
        self.assertEqual(status, 200, body)
        self.assertIn(b"Content-Security-Policy: default-src 'none'", head)
        self.assertIn(b"X-Content-Type-Options: nosniff", head)
        self.assertEqual(body.count(b"<svg"), 4)
        self.assertEqual(re.findall(rb'class="point"[^>]*data-value="(\d+)"', body), [b"3", b"1", b"2", b"2"])
        self.assertIn(b"delivered/enforce (3)", body)
        self.assertIn(b"certificate-expired", body)

        status, _, body = await self.get(port, "/domains")
        self.assertEqual(status, 200)
        self.assertIn(b"2 policies", body)
        status, _, body = await self.get(port, "/domains?q=testing")
        self.assertIn(b"1 policies matching", body)
        self.assertIn(b"testing.example", body)
        self.assertNotIn(b">example.com<", body)

        queries = sum(self.dns.queries.values())
        status, _, body = await self.get(port, "/domain?name=example.com")
        self.assertEqual(status, 200)
        self.assertIn(b"mode: enforce", body)
        self.assertIn(b"<td>mx.example.com</td>", body)
        self.assertIn(b"TLSv1.3 verified", body)
        self.assertIn(b"certificate-expired mx.example.com: 2", body)
        # The verdict: the socketmap's answer from the cache, and nothing asked of DNS for it.
        self.assertIn(b"Verdict now (from the cache, no lookup made)", body)
        self.assertIn(b"<code>OK secure match=mx.example.com servername=hostname</code>", body)
        status, _, body = await self.get(port, "/domain?name=uncached.example")
        self.assertIn(b"not cached: the next request for it looks the policy up", body)
        self.assertEqual(sum(self.dns.queries.values()), queries)

        status, _, body = await self.get(port, "/reports")
        self.assertEqual(status, 200)
        self.assertIn(b"collecting", body)
        day = day_of(reactor.seconds())
        self.assertIn(f"/report?day={day}&amp;domain=example.com".encode(), body)
        status, _, body = await self.get(port, f"/report?day={day}&domain=example.com")
        self.assertEqual(status, 200)
        self.assertIn(b"\"organization-name\": \"Example\"", body)
        self.assertIn(b"\"total-failure-session-count\": 2", body)
        status, head, body = await self.get(port, f"/report.json?day={day}&domain=example.com")
        self.assertEqual(status, 200)
        self.assertIn(b"Content-Type: application/json", head)
        self.assertEqual(json.loads(body)["policies"][0]["summary"]["total-successful-session-count"], 5)
        status, _, _ = await self.get(port, f"/report.json?day={day}&domain=nothing.example")
        self.assertEqual(status, 404)

        status, _, body = await self.get(port, "/queue")
        self.assertEqual((status, b"the relay is off" in body), (200, True))
        status, _, _ = await self.get(port, "/nothing")
        self.assertEqual(status, 404)

    async def test_domains_capped(self) -> None:
        """The domains table shows at most its cap of rows, and counts every match."""
        from mtasts_twisted.web.sources import gather_domains

        svc, _ = await self.start()
        now = reactor.seconds()
        shelf = svc.runtime.store.shelf(POLICY_TABLE)
        for n in range(1203):
            domain = f"d{n:05d}.example"
            entry = CacheEntry(domain, domain, now, now, now, record_id="1",
                               policy=Policy(mode=Mode.ENFORCE, max_age=86400, mx=("mx.example",),
                                             text="version: STSv1\nmode: enforce\nmx: mx.example\nmax_age: 86400\n"),
                               valid_end=now + 86400)
            await shelf.put(domain, entry.to_json())
        sources = svc.listeners["web"].factory.resource.sources
        rows, total = await gather_domains(sources, "", max_rows=1000)
        self.assertEqual((len(rows), total), (1000, 1203))
        self.assertEqual(rows[0].domain, "d00000.example")
        rows, total = await gather_domains(sources, "d0120")
        self.assertEqual([r.domain for r in rows], ["d01200.example", "d01201.example", "d01202.example"])

    async def test_lookup_chart(self) -> None:
        """Socketmap answers are sampled into the overview's lookups chart."""
        from mtasts_twisted.web import CounterSampler

        from .test_service import socketmap_query

        svc, port = await self.start("--socketmap", EPHEMERAL)
        socketmap_port = svc.listeners["socketmap"].port.getHost().port
        for _ in range(3):
            await socketmap_query(socketmap_port, "nothing.example")
        (sampler,) = [s for s in svc if isinstance(s, CounterSampler)]
        sampler.sample()
        status, _, body = await self.get(port, "/")
        self.assertEqual(status, 200)
        self.assertIn(b"notfound (3)", body)
        self.assertIn(b'data-value="3"><title>notfound ', body)

    async def test_queue(self) -> None:
        """
        With the relay on, the queue page lists a queued message (the
        message itself, or, once its recipient failed for good, the DSN to
        its sender from C{<>}).
        """
        svc, port = await self.start("--smtp", EPHEMERAL)
        svc.relay.queue.enqueue("sender@example.org", ["<b>rcpt</b>@nowhere.invalid"], b"Subject: x\r\n\r\nbody\r\n")
        status, _, body = await self.get(port, "/queue")
        self.assertEqual(status, 200)
        self.assertIn(b"1 messages", body)
        self.assertIn(b"sender@example.org", body)
        self.assertNotIn(b"<b>", body)
        status, _, body = await self.get(port, "/")
        self.assertIn(b"<td>queue</td><td>", body)
        self.assertIn(b" messages, oldest ", body)

    async def test_injection_escaped(self) -> None:
        """Markup in a policy text, an MX name, a reply and a fetch error reaches the browser as text."""
        svc, port = await self.start()
        await populate(svc)
        for path in ("/", "/domains", "/domains?q=%3Cscript%3E", "/domain?name=testing.example",
                     "/domain?name=%3Cscript%3Ealert(1)%3C/script%3E"):
            status, _, body = await self.get(port, path)
            self.assertEqual(status, 200, path)
            found = _Elements()
            found.feed(body.decode())
            self.assertEqual(found.tags & {"script", "img"}, set(), path)
            self.assertEqual([a for a in found.attributes if a.startswith("on")], [], path)
        status, _, body = await self.get(port, "/domain?name=testing.example")
        self.assertGreaterEqual(body.count(b"&lt;script&gt;alert(1)&lt;/script&gt;"), 4)
        self.assertIn(b"x_evil: &lt;script&gt;alert(1)&lt;/script&gt;\"&gt;&lt;img/src/onerror", body)
        # The verdict of a domain backing off after a failed fetch carries the failure's reason.
        now = reactor.seconds()
        backoff = CacheEntry("backoff.example", "backoff.example", now, now, now, backoff_id="1",
                             backoff_until=now + 300, backoff_failure=FailureDetails(
                                 ResultType.STS_POLICY_FETCH_ERROR, failure_reason_code=EVIL))
        await svc.runtime.store.shelf(POLICY_TABLE).put("backoff.example", backoff.to_json())
        status, _, body = await self.get(port, "/domain?name=backoff.example")
        self.assertEqual(status, 200)
        found = _Elements()
        found.feed(body.decode())
        self.assertEqual(found.tags & {"script", "img"}, set())
        self.assertIn(b"<code>NOTFOUND </code>", body)
        self.assertIn(b"backing off after a failed policy fetch (&lt;script&gt;alert(1)&lt;/script&gt;", body)

    async def test_read_only_and_no_body(self) -> None:
        """Only GET and HEAD; a request announcing a body is refused before any of it is read or spooled."""
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        self.patch(tempfile, "tempdir", tmp)
        spooled: list[object] = []
        real = tempfile.TemporaryFile
        self.patch(tempfile, "TemporaryFile", lambda *a, **kw: (spooled.append(a), real(*a, **kw))[1])
        _, port = await self.start()
        for request, status in [
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5000000000\r\n\r\n" + b"x" * 65536, b"413"),
            (b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"413"),
            (b"PUT / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", b"405"),
            (b"DELETE /domains HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", b"405"),
        ]:
            client = await self.connect(port)
            client.send(request)
            await settle(lambda: client.closed.called)
            self.assertTrue(client.closed.called, request)
            if client.data:  # unless the unread body made the close a reset
                self.assertTrue(client.data.startswith(b"HTTP/1.1 " + status + b" "), (request, client.data))
        self.assertEqual(spooled, [])
        self.assertEqual(os.listdir(tmp), [])
        client = await self.connect(port)
        client.send(b"HEAD / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        await settle(lambda: client.closed.called)
        self.assertTrue(client.data.startswith(b"HTTP/1.1 200 "), client.data)
        self.assertTrue(client.data.endswith(b"\r\n\r\n"), client.data)

    async def test_head_limits(self) -> None:
        """A request head over the cap is refused with 400 and closed."""
        _, port = await self.start()
        client = await self.connect(port)
        client.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        await settle(lambda: client.closed.called)
        self.assertTrue(client.closed.called)
        if client.data:  # unless the unread rest made the close a reset
            self.assertTrue(client.data.startswith(b"HTTP/1.1 400 "), client.data[:100])

    async def test_connection_cap(self) -> None:
        """Connections beyond the cap are closed on accept; the others are served."""
        _, port = await self.start()
        cap = WebLimits().max_connections
        clients = [await self.connect(port) for _ in range(cap + 3)]
        await settle(lambda: sum(c.closed.called for c in clients) >= 3)
        self.assertEqual(sum(c.closed.called for c in clients), 3)
        self.assertEqual(len(server_transports(port)), cap)
        open_ = [c for c in clients if not c.closed.called]
        open_[0].send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await open_[0].expect(rb"<svg")

    async def test_password(self) -> None:
        """With --web-password-file every page asks for a user and password (401 without, 200 with)."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("admin:s3cret\n")
        _, port = await self.start("--web-password-file", path)
        os.remove(path)  # read once at start (before twistd -u drops privileges)
        for credentials, expected in [(None, 401), ("admin:wrong", 401), ("nobody:s3cret", 401),
                                      ("admin:s3cret", 200)]:
            headers = "" if credentials is None else (
                "Authorization: Basic " + base64.b64encode(credentials.encode()).decode() + "\r\n")
            for page in ("/", "/domains", "/domain?name=example.com"):
                status, head, body = await self.get(port, page, headers)
                self.assertEqual(status, expected, (credentials, page, body))
                if expected == 401:
                    self.assertIn(b'WWW-Authenticate: basic realm="mtasts status"', head)
                    self.assertNotIn(b"<svg", body)


class OptionsMixin:
    """Parse service options; a usage error must be one line naming C{message}."""

    def parse(self, *argv: str) -> service.Options:
        options = service.Options()
        options.parseOptions(["--data-dir", self.mktemp(), *argv])  # type: ignore[attr-defined]
        return options

    def assertUsage(self, message: str, *argv: str) -> None:
        error = self.assertRaises(usage.UsageError, self.parse, *argv)  # type: ignore[attr-defined]
        self.assertIn(message, str(error))  # type: ignore[attr-defined]
        self.assertNotIn("\n", str(error))  # type: ignore[attr-defined]


class WebOptionsTests(OptionsMixin, SynchronousTestCase):
    """C{--web} binds loopback unless a password file is given; errors are one line."""

    def test_default_off(self) -> None:
        self.assertIsNone(self.parse().settings.web)
        self.assertNotIn("web", self.parse().settings.listeners)

    def test_loopback_needs_no_password(self) -> None:
        settings = self.parse("--web", "tcp:8080:interface=127.0.0.1").settings
        self.assertEqual(settings.listeners["web"], "tcp:8080:interface=127.0.0.1")
        self.assertIsNone(settings.web_password_file)

    def test_other_addresses_refused_without_password(self) -> None:
        for endpoint in ("tcp:8080", "tcp:8080:interface=0.0.0.0", "tcp:8080:interface=192.0.2.1",
                         r"tcp6:8080:interface=\:\:"):
            self.assertUsage(f"--web {endpoint!r}: not a loopback address; give --web-password-file", "--web",
                             endpoint)

    def test_config_file(self) -> None:
        """C{web} and C{web-password-file} are settings of the config file too."""
        password, config = self.mktemp(), self.mktemp()
        with open(password, "w") as f:
            f.write("admin:s3cret\n")
        with open(config, "w") as f:
            f.write(f'web = "tcp:8080"\nweb-password-file = "{password}"\n')
        settings = self.parse("--config", config).settings
        self.assertEqual((settings.web, settings.web_password_file), ("tcp:8080", password))
        with open(config, "w") as f:
            f.write('web = "tcp:8080"\n')
        self.assertUsage("--web 'tcp:8080': not a loopback address", "--config", config)

    def test_password_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# users\nadmin:s3cret\n")
        settings = self.parse("--web", "tcp:8080", "--web-password-file", path).settings
        self.assertEqual(settings.web_password_file, path)
        self.assertUsage("--web-password-file /nonexistent: cannot read it", "--web", "tcp:8080",
                         "--web-password-file", "/nonexistent")
        with open(path, "w") as f:
            f.write("admin\n")
        self.assertUsage("expected lines USER:PASSWORD", "--web", "tcp:8080", "--web-password-file", path)


class IdleTimeoutTests(SynchronousTestCase):
    """The idle timeout counts completed requests as activity, not bytes (a slow client cannot hold a slot)."""

    def connect(self) -> tuple[Any, Any, Any]:
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from mtasts_twisted.web import StatusResource, WebSite, WebSources

        clock = Clock()
        site = WebSite(StatusResource(WebSources(clock=clock, stats=None)), clock)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return clock, channel, transport

    def test_trickling_request_times_out(self) -> None:
        """A request head sent a byte at a time never completes: closed 30 s after the connection opened."""
        clock, channel, transport = self.connect()
        for byte in b"GET /queue HTTP/1.1\r\nHost: h\r\n":
            clock.advance(5)
            channel.dataReceived(bytes([byte]))
            if transport.disconnecting:
                break
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(clock.seconds(), 30)
        channel.connectionLost(None)
        self.assertEqual(channel.site.connections, 0)

    def test_completed_requests_are_activity(self) -> None:
        """After each answered request the connection has another 30 s."""
        clock, channel, transport = self.connect()
        for _ in range(3):
            clock.advance(25)
            channel.dataReceived(b"GET /nothing HTTP/1.1\r\nHost: h\r\n\r\n")
            self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value().count(b"HTTP/1.1 404 "), 3)
        clock.advance(31)
        self.assertTrue(transport.disconnecting)

    def test_idle_close_is_quiet(self) -> None:
        """A browser's idle keep-alive connection is closed without a log line (no line per visit)."""
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock, channel, transport = self.connect()
        channel.dataReceived(b"GET /nothing HTTP/1.1\r\nHost: h\r\n\r\n")
        clock.advance(31)
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e.get("log_format") for e in events], [])


class CounterSamplerTests(SynchronousTestCase):
    def test_increases_per_hour(self) -> None:
        """Each reading counts what the totals grew by, in the reading's hour; a total that fell counts from zero."""
        from twisted.internet.task import Clock

        from mtasts_twisted.metrics import HourlyCounts
        from mtasts_twisted.web import CounterSampler

        clock = Clock()
        clock.advance(1_764_720_000)
        totals: dict[str, int] = {}
        hourly = HourlyCounts()
        sampler = CounterSampler(lambda: totals or None, hourly.add, clock, interval=60)
        sampler.startService()
        totals.update(ok=5, temp=1)
        clock.advance(60)
        totals.update(ok=7)
        clock.pump([60] * 60)
        totals.update(ok=2)  # the component was replaced: counts from zero
        sampler.stopService()
        series = hourly.series(clock.seconds())
        self.assertEqual(dict(series[-2][1]), {"ok": 7, "temp": 1})
        self.assertEqual(dict(series[-1][1]), {"ok": 2})
