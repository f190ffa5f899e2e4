"""
The status page in a real headless browser (Debian C{chromium} driven
through C{chromedriver}): each page of a running service with data in it
loads, its charts are SVG with drawn data points, no hostile value became
an element, and a screenshot of each is saved under the test's temporary
directory.  Skips, naming what is missing, without chromium or
chromedriver (fails under C{CI=true}).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mtasts_twisted import service
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.tlsrpt.report import day_of

from .test_web_service import EPHEMERAL, populate
from .webdriver import Browser, require_browser

#: What the page script reports: the browser's view of the document.
PROBE = """
const points = [...document.querySelectorAll('svg rect.point')];
return {
  title: document.title,
  svgs: document.querySelectorAll('svg').length,
  points: points.length,
  drawn: points.filter(r => { const b = r.getBoundingClientRect(); return b.width > 0 && b.height > 0; }).length,
  values: points.map(r => r.getAttribute('data-value')),
  injected: document.querySelectorAll('script, img, iframe, [onerror], [onload]').length,
  text: document.body.innerText,
};
"""


class BrowserTests(TestCase):
    timeout = 180

    async def test_pages_in_chromium(self) -> None:
        chromium, driver = require_browser()
        dns = DNSTestServer()
        dns.start(reactor)
        self.addCleanup(dns.stop)
        options = service.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--nameserver", dns.nameserver, "--socketmap", "none",
                              "--smtp", "none", "--web", EPHEMERAL, "--no-reports"])
        svc = service.makeService(options, reactor, fatal=lambda code: None)
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        self.assertTrue(await svc.ready)
        await populate(svc)
        base = f"http://127.0.0.1:{svc.listeners['web'].port.getHost().port}"

        shots = os.path.abspath(self.mktemp())
        os.makedirs(shots)
        browser: Browser = await deferToThread(Browser, chromium, driver, os.path.join(shots, "profile"),
                                               os.path.join(shots, "chromedriver.log"))
        self.addCleanup(deferToThread, browser.close)

        async def visit(path: str, name: str) -> dict[str, Any]:
            await deferToThread(browser.get, base + path)
            seen: dict[str, Any] = await deferToThread(browser.run, PROBE)
            size = await deferToThread(browser.screenshot, os.path.join(shots, f"{name}.png"))
            self.assertGreater(size, 1000, name)
            with open(os.path.join(shots, f"{name}.png"), "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            self.assertEqual(seen["injected"], 0, (name, seen["text"]))
            return seen

        overview = await visit("/", "overview")
        self.assertEqual(overview["title"], "mtasts: Overview")
        self.assertEqual(overview["svgs"], 4)
        # Deliveries (3 delivered/enforce, 1 transient/testing), TLS failures this hour (2), since start (2).
        self.assertEqual(overview["values"], ["3", "1", "2", "2"])
        self.assertEqual(overview["drawn"], 4)

        domains = await visit("/domains", "domains")
        self.assertIn("example.com", domains["text"])
        self.assertIn("testing.example", domains["text"])
        filtered = await visit("/domains?q=testing", "domains-filtered")
        self.assertNotIn("\nexample.com", filtered["text"])

        domain = await visit("/domain?name=testing.example", "domain")
        self.assertIn('x_evil: <script>alert(1)</script>"><img/src/onerror', domain["text"])
        self.assertIn('<script>alert(1)</script>"><img src=x onerror=alert(2)>', domain["text"])
        self.assertIn("Verdict now (from the cache, no lookup made)", domain["text"])
        self.assertEqual(domain["svgs"], 0)

        reports = await visit("/reports", "reports")
        self.assertIn("collecting", reports["text"])
        report = await visit(f"/report?day={day_of(reactor.seconds())}&domain=example.com", "report")
        self.assertIn("no results stored", report["text"])  # --no-reports: nothing to build a report with
        queue = await visit("/queue", "queue")
        self.assertIn("the relay is off", queue["text"])
        self.assertEqual(sorted(n for n in os.listdir(shots) if n.endswith(".png")),
                         ["domain.png", "domains-filtered.png", "domains.png", "overview.png", "queue.png",
                          "report.png", "reports.png"])
