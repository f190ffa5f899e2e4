"""
The status page's data (pure functions, frozen values), its rendering and
escaping, the hourly counts behind its charts, and L{requires_auth}.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.cache import CacheEntry
from mtasts_twisted.delivery.values import DeliveryResult, RecipientOutcome, Status
from mtasts_twisted.metrics import HostOutcome, HourlyCounts, MeteredDeliverer, MeteredSink, ServiceStats
from mtasts_twisted.policy import Mode, Policy
from mtasts_twisted.relay.envelope import QueuedMessage, RecipientState
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType
from mtasts_twisted.tlsrpt import PendingReport
from mtasts_twisted.web.data import (
    DomainRow,
    HostRow,
    Series,
    domain_page,
    domain_rows,
    overview,
    queue_rows,
    report_rows,
)
from mtasts_twisted.web.pages import domain_html, domains_html, overview_html, queue_html, render, reports_html
from mtasts_twisted.web.auth import requires_auth

NOW = 1_764_720_000.0  # 2025-12-03 00:00 UTC
HOUR = 3600.0

#: What a hostile peer puts in a policy, an MX name, a reply or an error.
EVIL = ['<script>alert(1)</script>', '"><img src=x onerror=alert(2)>', "'><svg onload=alert(3)>"]


def entry(domain: str, mode: Mode = Mode.ENFORCE, text: str = "", mx: tuple[str, ...] = ("mx.example.net",),
          failure: FailureDetails | None = None) -> CacheEntry:
    policy = Policy(mode=mode, max_age=86400, mx=mx, text=text or f"version: STSv1\nmode: {mode.value}\n")
    return CacheEntry(domain, domain, NOW - 10, NOW - 10, NOW - 5, record_id="20251203", policy=policy,
                      valid_end=NOW + 86400, backoff_failure=failure)


class HourlyCountsTests(SynchronousTestCase):
    def test_ring_keeps_24_hours(self) -> None:
        """Counts go to their hour; hours older than the ring are dropped; series are oldest first."""
        ring = HourlyCounts()
        for h in range(30):
            ring.add("delivered", NOW + h * HOUR, h + 1)
        ring.add("delivered", NOW + 29 * HOUR + 10)
        self.assertLessEqual(len(ring._counts), 24)
        series = ring.series(NOW + 29 * HOUR + 20)
        self.assertEqual(len(series), 24)
        self.assertEqual(series[0][0], NOW + 6 * HOUR)
        self.assertEqual([c["delivered"] for _, c in series], list(range(7, 30)) + [31])

    def test_empty_hours(self) -> None:
        """An hour without counts is an empty mapping."""
        ring = HourlyCounts()
        ring.add("x", NOW)
        series = ring.series(NOW + 5 * HOUR)
        self.assertEqual([dict(c) for _, c in series[-6:]], [{"x": 1}, {}, {}, {}, {}, {}])

    def test_metered_wrappers_feed_the_ring(self) -> None:
        """MeteredDeliverer counts each recipient per hour and keeps each MX's last outcome; MeteredSink counts failures."""
        clock = [NOW + 30]
        stats = ServiceStats(lambda: clock[0])
        outcome = RecipientOutcome("a@example.com", Status.DELIVERED, 250, "2.0.0 ok", "mx.example.com",
                                   "TLSv1.3", True)
        result = DeliveryResult("example.com", Mode.ENFORCE, (outcome,), ())

        class Deliverer:
            def deliver(self, *args: Any, **kw: Any) -> Any:
                from twisted.internet.defer import succeed

                return succeed(result)

        MeteredDeliverer(Deliverer(), stats).deliver("s@x", ["a@example.com"], None)  # type: ignore[arg-type]
        sink_result = Result(PolicyDescriptor(PolicyType.STS, "example.com"),
                             failures=(FailureDetails(ResultType.CERTIFICATE_EXPIRED, failed_session_count=2),))
        MeteredSink(None, stats).record(sink_result)
        self.assertEqual(stats.hourly_deliveries.series(NOW)[-1][1], {("delivered", "enforce"): 1})
        self.assertEqual(stats.hourly_tls_failures.series(NOW)[-1][1], {"certificate-expired": 2})
        self.assertEqual(stats.mx_outcomes[("example.com", "mx.example.com")],
                         HostOutcome(NOW + 30, "delivered", "TLSv1.3", True, "2.0.0 ok"))


class DataTests(SynchronousTestCase):
    def test_overview(self) -> None:
        """The overview's series have one point per hour, only keys with counts, outcomes in order."""
        deliveries = HourlyCounts()
        deliveries.add(("transient", "enforce"), NOW - HOUR, 2)
        deliveries.add(("delivered", "testing"), NOW, 5)
        failures = HourlyCounts()
        failures.add("certificate-expired", NOW, 3)
        data = overview(NOW, deliveries.series(NOW), failures.series(NOW), {"certificate-expired": 3},
                        (4, 90.0), {"sent": 2}, ["due", "collecting", "due"], 7, {"entries": 7, "deleted": 0})
        self.assertEqual(len(data.hours), 24)
        self.assertEqual([s.label for s in data.deliveries], ["delivered/testing", "transient/enforce"])
        self.assertEqual(data.deliveries[0].points[-1], 5)
        self.assertEqual(data.deliveries[1].points[-2:], (2, 0))
        self.assertEqual(data.tls_failures, (Series("certificate-expired", (0,) * 23 + (3,)),))
        self.assertEqual(data.reports_pending, (("collecting", 1), ("due", 2)))
        self.assertEqual((data.queue_messages, data.queue_oldest_age, data.cache_entries), (4, 90.0, 7))

    def test_domain_rows_filter(self) -> None:
        """Rows are sorted; the filter matches the domain, the mode, or the error."""
        entries = [entry("b.example", Mode.TESTING), entry("a.example"),
                   entry("c.example", failure=FailureDetails(ResultType.STS_POLICY_FETCH_ERROR,
                                                             failure_reason_code="no-policy-served"))]
        self.assertEqual([r.domain for r in domain_rows(entries)], ["a.example", "b.example", "c.example"])
        self.assertEqual([r.domain for r in domain_rows(entries, "B.EX")], ["b.example"])
        self.assertEqual([r.domain for r in domain_rows(entries, "testing")], ["b.example"])
        self.assertEqual([r.domain for r in domain_rows(entries, "no-policy")], ["c.example"])
        self.assertEqual(domain_rows(entries, "a.example")[0],
                         DomainRow("a.example", "enforce", "20251203", NOW + 86400, "", ("mx.example.net",)))

    def test_domain_page(self) -> None:
        """A domain's hosts: the policy's patterns, then hosts delivered to with their last outcome; today's results."""
        outcomes = {("a.example", "mx1.a.example"): HostOutcome(NOW, "transient", None, False, "421 busy"),
                    ("other.example", "mx.other"): HostOutcome(NOW, "delivered", "TLSv1.3", True, "ok")}
        result = Result(PolicyDescriptor(PolicyType.STS, "a.example"), success_count=4,
                        failures=(FailureDetails(ResultType.CERTIFICATE_EXPIRED, receiving_mx_hostname="mx1.a.example"),))
        page = domain_page("a.example", entry("a.example", mx=("*.a.example",)), outcomes, [result], "2025-12-03")
        self.assertEqual(page.hosts, (HostRow("*.a.example"), HostRow("mx1.a.example", NOW, "transient", "no TLS",
                                                                      "421 busy")))
        self.assertEqual([(r.policy_type, r.successes, r.failures, r.details) for r in page.results],
                         [("sts", 4, 1, (("certificate-expired", "mx1.a.example", 1),))])
        self.assertIn("mode: enforce", page.policy_text)
        self.assertIsNone(domain_page("b.example", None, outcomes, [], "2025-12-03").row)

    def test_queue_and_report_rows(self) -> None:
        """Queue rows oldest first with their pending recipients; report rows by day and domain."""
        messages = [
            QueuedMessage("b", "s@x", (RecipientState("r1@y", next_attempt=NOW + 60),), NOW - 10, 10, 1, "421 later"),
            QueuedMessage("a", "", (RecipientState("r2@y", next_attempt=NOW + 30),), NOW - 20, 10),
        ]
        rows = queue_rows(messages)
        self.assertEqual([(r.ident, r.recipients, r.next_attempt, r.last_error) for r in rows],
                         [("a", ("r2@y",), NOW + 30, ""), ("b", ("r1@y",), NOW + 60, "421 later")])
        reports = report_rows([PendingReport("2025-12-03", "b.example", "collecting"),
                               PendingReport("2025-12-02", "z.example", "retry", 2, NOW, "503 no")])
        self.assertEqual([(r.day, r.domain, r.state, r.last_error) for r in reports],
                         [("2025-12-02", "z.example", "retry", "503 no"), ("2025-12-03", "b.example", "collecting", "")])


class _Elements(HTMLParser):
    """The element and attribute names of a document, as a browser would parse it."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.extend(name for name, _ in attrs)


def assert_escaped(case: SynchronousTestCase, html: bytes) -> None:
    """No element or event attribute came from L{EVIL}; its markup is there as text."""
    text = html.decode("utf-8")
    found = _Elements()
    found.feed(text)
    case.assertEqual(found.tags & {"script", "img", "iframe", "object"}, set())
    case.assertEqual([a for a in found.attributes if a.startswith("on")], [])
    case.assertNotIn("<script", text)
    case.assertNotIn("<img", text)
    case.assertNotIn("<svg onload", text)
    case.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", text)
    case.assertIn("&lt;img src=x onerror=alert(2)&gt;", text)


class EscapingTests(SynchronousTestCase):
    """
    Every value from a peer is escaped: a policy text, an MX name, an SMTP
    reply and a fetch error carrying markup come out as text.
    """

    def assert_escaped(self, html: bytes) -> None:
        assert_escaped(self, html)

    def test_domain_page_escapes(self) -> None:
        """Policy text, MX patterns and names, replies, and the domain itself are escaped."""
        evil = " ".join(EVIL)
        e = entry("evil.example", text=f"version: STSv1\nmode: enforce\nmx: {evil}\n", mx=(evil,),
                  failure=FailureDetails(ResultType.STS_POLICY_FETCH_ERROR, failure_reason_code=evil))
        outcomes = {("evil.example", evil): HostOutcome(NOW, "permanent", None, False, evil)}
        result = Result(PolicyDescriptor(PolicyType.STS, "evil.example"),
                        failures=(FailureDetails(ResultType.VALIDATION_FAILURE, receiving_mx_hostname=evil),))
        html = render(domain_html(domain_page(evil, e, outcomes, [result], "2025-12-03")))
        self.assert_escaped(html)
        self.assertGreaterEqual(html.count(b"&lt;script&gt;"), 6)

    def test_domains_page_escapes(self) -> None:
        """A domain name, an error and the filter are escaped; the link's name is URL-quoted."""
        evil = " ".join(EVIL)
        row = DomainRow(evil, "enforce", evil, NOW, evil)
        html = render(domains_html([row], evil))
        self.assert_escaped(html)
        self.assertIn(b'href="/domain?name=%3Cscript%3Ealert%281%29', html)

    def test_queue_reports_overview_escape(self) -> None:
        """Queue errors and senders, report errors and chart labels are escaped."""
        evil = " ".join(EVIL)
        message = QueuedMessage("a", evil, (RecipientState(evil),), NOW, 1, 1, evil)
        self.assert_escaped(render(queue_html(queue_rows([message]), NOW)))
        self.assert_escaped(render(reports_html(report_rows([PendingReport("2025-12-03", evil, "retry", 1, NOW, evil)]),
                                                [(evil, 1)])))
        hourly = HourlyCounts()
        hourly.add(evil, NOW)
        data = overview(NOW, hourly.series(NOW), hourly.series(NOW), {evil: 1}, None, {evil: 1}, [evil], None, None)
        self.assert_escaped(render(overview_html(data)))


class ChartTests(SynchronousTestCase):
    def test_points_and_values(self) -> None:
        """Each non-zero hour of each series is one rect with its value; the page is SVG inline."""
        deliveries = HourlyCounts()
        deliveries.add(("delivered", "enforce"), NOW - 2 * HOUR, 3)
        deliveries.add(("delivered", "enforce"), NOW, 1)
        deliveries.add(("transient", "none"), NOW, 2)
        data = overview(NOW, deliveries.series(NOW), HourlyCounts().series(NOW), {"starttls-not-supported": 4},
                        None, {}, [], 0, None)
        html = render(overview_html(data)).decode()
        self.assertEqual(html.count("<svg"), 4)
        self.assertEqual(re.findall(r'class="point"[^>]*data-value="(\d+)"', html), ["3", "1", "2", "4"])


class RequiresAuthTests(SynchronousTestCase):
    def test_loopback_or_not(self) -> None:
        """Only a loopback interface (or a UNIX socket) goes without a password."""
        for description, expected in [
            ("tcp:8080:interface=127.0.0.1", False),
            ("tcp:8080:interface=127.1.2.3", False),
            (r"tcp6:8080:interface=\:\:1", False),
            ("unix:/run/mtasts-web.sock", False),
            ("tcp:8080", True),
            ("tcp:8080:interface=0.0.0.0", True),
            ("tcp:8080:interface=192.0.2.1", True),
            (r"tcp6:8080:interface=\:\:", True),
            ("tcp:8080:interface=localhost", True),
            ("ssl:8443:privateKey=k.pem", True),
            ("systemd:domain=INET:index=0", True),
        ]:
            self.assertEqual(requires_auth(description), expected, description)
