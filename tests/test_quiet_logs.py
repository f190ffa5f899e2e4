"""
No log line per connection: Twisted logs "Starting factory" and "Stopping
factory" for every connection made through a noisy factory.  Our client
connections (SMTP delivery, DNS over TCP, TLSRPT reports over HTTPS) and
our server factories are quiet.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet import reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.delivery import Deliverer, DeliverySettings, Status
from mtasts_twisted.dns import DNSResolver
from mtasts_twisted.relay import RelaySettings, RelaySMTPFactory
from mtasts_twisted.store import MemoryStore
from mtasts_twisted.testing.dns import Behaviour as DNSBehaviour
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.testing.memory import FakeFetcher
from mtasts_twisted.testing.pki import PKI
from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer
from mtasts_twisted.testing.tlsrpt import ReportReceiver
from mtasts_twisted.tlsrpt.https import HTTPSReportSender

from .test_tlsrpt_report import make_report

_PKI = PKI()
FACTORY_LINES = ("Starting factory {factory!r}", "Stopping factory {factory!r}")


class QuietTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.dns = DNSTestServer()
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)

    def listen(self) -> None:
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def factory_lines(self) -> list[str]:
        return [str(e.get("factory")) for e in self.events if e.get("log_format") in FACTORY_LINES]

    async def test_delivery(self) -> None:
        """An SMTP delivery logs no factory line."""
        server = SMTPTestServer(Behaviour(certificate=_PKI.valid("mx1.example.com")), reactor=reactor)
        port = server.start()
        self.addCleanup(server.stop)
        self.dns.add_mx("example.com", 10, "mx1.example.com.")
        self.dns.add_a("mx1.example.com", "127.0.0.1")
        resolver = DNSResolver(reactor, [self.dns.nameserver], timeout=0.5, budget=3)
        cache = PolicyCache(MemoryStore(), resolver, FakeFetcher(), reactor)
        deliverer = Deliverer(reactor, resolver, cache, trust_root=_PKI.ca_pem,
                              settings=DeliverySettings(port_for={"mx1.example.com": port}))
        self.listen()
        result = await deliverer.deliver("alice@example.org", ["bob@example.com"],
                                         io.BytesIO(b"Subject: hi\r\n\r\nhello\r\n"))
        self.assertEqual([o.status for o in result.outcomes], [Status.DELIVERED])
        await deliverer.close()
        self.assertEqual(self.factory_lines(), [])

    async def test_failure_reason_once(self) -> None:
        """
        A delivery refused for an untrusted certificate (enforce) logs the
        reason in one line (the delivery outcome), once.
        """
        server = SMTPTestServer(Behaviour(certificate=_PKI.untrusted("mx1.example.com")), reactor=reactor)
        port = server.start()
        self.addCleanup(server.stop)
        self.dns.add_mx("example.com", 10, "mx1.example.com.")
        self.dns.add_a("mx1.example.com", "127.0.0.1")
        self.dns.add_txt("_mta-sts.example.com", "v=STSv1; id=1")
        fetcher = FakeFetcher()
        fetcher.policies["example.com"] = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmax_age: 86400\n"
        resolver = DNSResolver(reactor, [self.dns.nameserver], timeout=0.5, budget=3)
        cache = PolicyCache(MemoryStore(), resolver, fetcher, reactor)
        deliverer = Deliverer(reactor, resolver, cache, trust_root=_PKI.ca_pem,
                              settings=DeliverySettings(port_for={"mx1.example.com": port}))
        self.listen()
        result = await deliverer.deliver("alice@example.org", ["bob@example.com"],
                                         io.BytesIO(b"Subject: hi\r\n\r\nhello\r\n"))
        self.assertEqual([o.status for o in result.outcomes], [Status.TRANSIENT])
        lines = [formatEvent(e) for e in self.events
                 if e.get("log_level", LogLevel.info) >= LogLevel.info and "X509_V_ERR" in formatEvent(e)]
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(lines[0].count("X509_V_ERR"), 1, lines[0])

    async def test_dns_over_tcp(self) -> None:
        """A truncated answer retried over TCP logs no factory line."""
        self.dns.add_txt("_mta-sts.example.com", "v=STSv1; id=1")
        self.dns.set_behaviour("_mta-sts.example.com", DNSBehaviour.TRUNCATE)
        resolver = DNSResolver(reactor, [self.dns.nameserver], timeout=1, budget=3)
        self.listen()
        answer = await resolver.lookup_txt("_mta-sts.example.com")
        self.assertTrue(answer)
        self.assertGreaterEqual(self.dns.count("_mta-sts.example.com", "TXT"), 2)
        self.assertEqual(self.factory_lines(), [])

    async def test_https_report(self) -> None:
        """A report POSTed over HTTPS logs no factory line."""
        receiver = ReportReceiver(reactor, _PKI)
        receiver.start()
        self.addCleanup(receiver.stop)
        sender = HTTPSReportSender(reactor, trust_roots=_PKI.ca_pem, name_resolver=receiver.resolver())
        self.listen()
        self.assertEqual(await sender.send(receiver.url(), make_report()), 200)
        self.assertEqual(self.factory_lines(), [])

    def test_server_factories(self) -> None:
        """The relay intake's factory is quiet when the service starts it."""
        factory = RelaySMTPFactory(None, RelaySettings(reporting_mta="relay.test"), reactor)  # type: ignore[arg-type]
        self.listen()
        factory.doStart()
        factory.doStop()
        self.assertEqual(self.factory_lines(), [])
