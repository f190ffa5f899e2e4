"""
DANE status on the status pages (L{mtasts_twisted.web.dane}): the summary
of a domain's C{tlsa} results today, what the pages say with DANE off,
with reports off, without DANE sessions and with them, escaping of the
DNS names it shows, and a running service whose relay recorded DANE
sessions through the TLSRPT aggregator.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.dane import DANEState, DANEStatus
from mtasts_twisted.delivery.danehost import tlsa_descriptor
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType
from mtasts_twisted.store import MemoryStore
from mtasts_twisted.tlsrpt import RESULTS_TABLE
from mtasts_twisted.tlsrpt.aggregate import encode_results, results_key
from mtasts_twisted.tlsrpt.report import day_of
from mtasts_twisted.web import WebSources
from mtasts_twisted.web.dane import DANESummary, dane_summary
from mtasts_twisted.web.sources import gather_dane
from mtasts_twisted.web.data import DomainRow, domain_page
from mtasts_twisted.web.pages import domain_html, domains_html, render

from .test_web_pages import EVIL, NOW, assert_escaped
from .test_web_service import WebServiceCase, _Elements, populate


def tlsa(base: str, recipient: str, successes: int = 0, failures: tuple[FailureDetails, ...] = ()) -> Result:
    """A result under the C{tlsa} policy of C{base}, reported to C{recipient} (as delivery makes it)."""
    descriptor = tlsa_descriptor(DANEStatus(base, DANEState.USABLE, base_domain=base))
    return Result(descriptor, successes, failures, report_domain=recipient)


def failure(kind: ResultType, host: str, n: int = 1) -> FailureDetails:
    return FailureDetails(kind, receiving_mx_hostname=host, failed_session_count=n)


STS = Result(PolicyDescriptor(PolicyType.STS, "example.com"), 7, (failure(ResultType.CERTIFICATE_EXPIRED, "mx"),))


class SummaryTests(SynchronousTestCase):
    """L{dane_summary} and its one line."""

    def test_tlsa_results_only(self) -> None:
        results = [STS, tlsa("mx1.example.com", "example.com", 4),
                   tlsa("mx2.example.net", "example.com", 1, (failure(ResultType.DANE_REQUIRED, "mx2.example.net", 2),
                                                              failure(ResultType.TLSA_INVALID, "mx2.example.net"))),
                   tlsa("mx1.example.com", "example.com", 0, (failure(ResultType.DANE_REQUIRED, "mx1.example.com"),))]
        summary = dane_summary(results, True)
        self.assertEqual(summary, DANESummary(True, True, 5, 4, (("dane-required", 3), ("tlsa-invalid", 1)),
                                              ("mx1.example.com", "mx2.example.net"),
                                              ("mx1.example.com", "mx2.example.net")))
        self.assertEqual(summary.text, "DANE: 5 sessions succeeded, 4 failed (dane-required 3, tlsa-invalid 1)")
        self.assertEqual(dane_summary([tlsa("mx1.example.com", "example.com", 2)], True).text,
                         "DANE: 2 sessions succeeded")

    def test_what_absence_means(self) -> None:
        self.assertEqual(dane_summary([STS], True).text, "no DANE seen today")
        self.assertEqual(dane_summary(None, True).text, "DANE on; no results kept (reports off)")
        self.assertEqual(dane_summary([STS], False).text, "DANE off (no --dane)")
        self.assertEqual(dane_summary(None, False).text, "DANE off (no --dane)")
        self.assertEqual(dane_summary([tlsa("mx.example.com", "example.com", 3)], False).text,
                         "DANE off (no --dane); earlier today: 3 sessions succeeded")


class GatherTests(SynchronousTestCase):
    """L{gather_dane}: today's stored results per domain, read only with --dane and reports on."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        shelf = self.store.shelf(RESULTS_TABLE)
        day = day_of(NOW)
        self.successResultOf(shelf.put(results_key(day, "example.com"),
                                       encode_results([STS, tlsa("mx.example.com", "example.com", 2)])))
        self.successResultOf(shelf.put(results_key(day, "xn--bcher-kva.example"),
                                       encode_results([tlsa("mx.example.net", "xn--bcher-kva.example", 0, (
                                           failure(ResultType.DANE_REQUIRED, "mx.example.net"),))])))
        self.successResultOf(shelf.put(results_key(day_of(NOW - 86400), "other.example"),
                                       encode_results([tlsa("mx.other.example", "other.example", 9)])))
        self.reads: list[str] = []
        get = shelf.get
        self.patch(shelf, "get", lambda key: (self.reads.append(key), get(key))[1])

    def gather(self, **kw: Any) -> dict[str, DANESummary]:
        sources = WebSources(clock=self.clock, stats=None, store=lambda: self.store, **kw)
        domains = ["example.com", "xn--bcher-kva.example", "other.example"]
        return self.successResultOf(Deferred.fromCoroutine(gather_dane(sources, domains)))

    def test_read_per_domain(self) -> None:
        found = self.gather(dane=True, report_settings=object())
        self.assertEqual({d: s.text for d, s in found.items()}, {
            "example.com": "DANE: 2 sessions succeeded",
            "xn--bcher-kva.example": "DANE: 0 sessions succeeded, 1 failed (dane-required 1)",
            "other.example": "no DANE seen today",  # yesterday's are not today's
        })
        self.assertEqual(len(self.reads), 3)

    def test_nothing_read_without_dane_or_reports(self) -> None:
        self.assertEqual({s.text for s in self.gather().values()}, {"DANE off (no --dane)"})
        self.assertEqual({s.text for s in self.gather(dane=True).values()}, {"DANE on; no results kept (reports off)"})
        self.assertEqual(self.reads, [])


class PageTests(SynchronousTestCase):
    """The DANE column and section, escaped."""

    def test_domains_column_and_domain_section(self) -> None:
        summary = dane_summary([tlsa("mx.example.com", "example.com", 2,
                                    (failure(ResultType.DANE_REQUIRED, "mx.example.com"),))], True)
        html = render(domains_html([DomainRow("example.com", "enforce", "1", NOW, "", dane=summary),
                                    DomainRow("b.example", "testing", "1", NOW, "")], "")).decode()
        self.assertIn("<th>DANE today</th>", html)
        self.assertIn('<td><span class="error">DANE: 2 sessions succeeded, 1 failed (dane-required 1)</span></td>',
                      html)
        self.assertIn("<td>-</td></tr>", html)
        page = domain_page("example.com", None, {}, [tlsa("mx.example.com", "example.com", 2)], "2025-12-03",
                           dane=summary)
        html = render(domain_html(page)).decode()
        self.assertIn("DANE today (RFC 7672, from the TLSRPT results kept for reports)", html)
        self.assertIn("<p>TLSA base domains: mx.example.com</p>", html)
        self.assertIn("<p>MX hosts with failures: mx.example.com</p>", html)
        self.assertIn("<td>tlsa</td><td>mx.example.com</td><td>2</td>", html)

    def test_escaped(self) -> None:
        """A TLSA base domain and an MX host name from DNS come out as text."""
        evil = " ".join(EVIL)
        results = [tlsa(evil, "example.com", 1, (failure(ResultType.TLSA_INVALID, evil),))]
        summary = dane_summary(results, True)
        assert_escaped(self, render(domains_html([DomainRow(evil, "enforce", "1", NOW, "", dane=summary)], "")))
        html = render(domain_html(domain_page(evil, None, {}, results, "2025-12-03", dane=summary)))
        assert_escaped(self, html)
        self.assertGreaterEqual(html.count(b"&lt;script&gt;"), 5)


class DANEServiceTests(WebServiceCase):
    """A service whose relay recorded DANE sessions (through the TLSRPT aggregator) shows them."""

    async def record(self, svc: Any) -> None:
        evil = " ".join(EVIL)
        aggregator = svc.runtime.aggregator
        aggregator.record(tlsa("mx.example.com", "example.com", 4))
        aggregator.record(tlsa(evil, "example.com", 0, (failure(ResultType.DANE_REQUIRED, evil),)))
        await aggregator.flush()

    async def test_dane_on(self) -> None:
        svc, port = await self.start("--dane")
        await populate(svc)
        await self.record(svc)
        status, _, body = await self.get(port, "/domains")
        self.assertEqual(status, 200)
        self.assertIn(b"DANE: 4 sessions succeeded, 1 failed (dane-required 1)", body)
        self.assertIn(b"<td>no DANE seen today</td>", body)  # testing.example
        status, _, body = await self.get(port, "/domain?name=example.com")
        self.assertEqual(status, 200)
        self.assertIn(b"TLSA base domains: &lt;script&gt;alert(1)&lt;/script&gt;", body)
        self.assertIn(b"mx.example.com", body)
        for page in (b"/domains", b"/domain?name=example.com"):
            status, _, body = await self.get(port, page.decode())
            found = _Elements()
            found.feed(body.decode())
            self.assertEqual(found.tags & {"script", "img"}, set(), page)
            self.assertEqual([a for a in found.attributes if a.startswith("on")], [], page)

    async def test_dane_off(self) -> None:
        svc, port = await self.start()
        await populate(svc)
        await self.record(svc)
        status, _, body = await self.get(port, "/domains")
        self.assertEqual(body.count(b"<td>DANE off (no --dane)</td>"), 2)
        status, _, body = await self.get(port, "/domain?name=example.com")
        self.assertIn(b"DANE off (no --dane); earlier today: 4 sessions succeeded, 1 failed", body)

    async def test_reports_off(self) -> None:
        svc, port = await self.start("--dane", "--no-reports")
        await populate(svc)
        status, _, body = await self.get(port, "/domains")
        self.assertEqual(body.count(b"<td>DANE on; no results kept (reports off)</td>"), 2)

