"""
Tests for C{--dane} (C{twistd mtasts --dane}, config key C{dane}): the
option reaches the relay's deliverer, and the start-up warnings about the
resolver DANE relies on (L{mtasts_twisted.service.danecheck}), against a
non-validating test DNS server and the validating DNSSEC world.
"""

from __future__ import annotations

import os

from prometheus_client.exposition import generate_latest
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtasts_twisted import service
from mtasts_twisted.dns import DNSResolver
from mtasts_twisted.metrics import ServiceStats, make_registry
from mtasts_twisted.service.danecheck import check_dane_resolver, remote_nameservers
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.testing.dnssec import Zone, require_world

EPHEMERAL = "tcp:0:interface=127.0.0.1"


class OptionTests(SynchronousTestCase):
    def test_flag_and_config_key(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        config = os.path.join(directory, "mtasts.toml")
        with open(config, "w") as f:
            f.write("dane = true\n")
        for argv, expected in ([(), False], [("--dane",), True], [("--config", config), True]):
            options = service.Options()
            options.parseOptions(["--data-dir", directory, *argv])
            self.assertIs(options.settings.dane, expected, argv)

    def test_remote_nameservers(self) -> None:
        self.assertEqual(
            remote_nameservers(["127.0.0.1", "127.0.0.53:5353", "::1", "[::1]:53", "192.0.2.1",
                                "[2001:db8::1]:53", "10.0.0.1:53"]),
            ["192.0.2.1", "[2001:db8::1]:53", "10.0.0.1:53"])

    def test_metric_family(self) -> None:
        stats = ServiceStats()
        stats.dane_lookups["secure-usable"] += 2
        stats.dane_lookups["bogus"] += 1
        text = generate_latest(make_registry(stats)).decode()
        self.assertIn('mtasts_dane_lookups_total{state="secure-usable"} 2.0', text)
        self.assertIn('mtasts_dane_lookups_total{state="bogus"} 1.0', text)


class ResolverCheckTests(TestCase):
    timeout = 30

    async def test_no_ad_warns(self) -> None:
        """A nameserver that does not validate (no AD on a signed name): one warning line."""
        dns = DNSTestServer()
        dns.start(reactor)
        self.addCleanup(dns.stop)
        dns.add_txt("org", "v=anything")
        resolver = DNSResolver(reactor, [dns.nameserver], timeout=2, budget=4)
        warnings = await check_dane_resolver(resolver, [dns.nameserver])
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("did not set AD for org", warnings[0])
        warnings = await check_dane_resolver(resolver, ["192.0.2.53"])
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("192.0.2.53 is not on loopback", warnings[0])

    async def test_validating_resolver_is_quiet(self) -> None:
        world = require_world([Zone("quiet.test.", ("mx 300 IN A 127.0.0.1",))])
        self.addCleanup(world.stop)
        assert world.nameserver is not None
        resolver = DNSResolver(reactor, [world.nameserver], timeout=3, budget=6)
        self.assertEqual(await check_dane_resolver(resolver, [world.nameserver], "quiet.test"), [])


class ServiceDANETests(TestCase):
    timeout = 30

    async def test_relay_delivers_with_dane(self) -> None:
        """C{--dane}: the relay's deliverer has DANE on, the report mailer's not; the metric is wired."""
        from twisted.logger import formatEvent, globalLogPublisher

        dns = DNSTestServer()
        dns.start(reactor)
        self.addCleanup(dns.stop)
        options = service.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--nameserver", dns.nameserver, "--no-reports",
                              "--socketmap", "none", "--smtp", EPHEMERAL, "--metrics", "none", "--dane"])
        svc = service.makeService(options, reactor, fatal=lambda code: None)
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            svc.privilegedStartService()
            svc.startService()
            self.assertTrue(await svc.ready)
        finally:
            globalLogPublisher.removeObserver(events.append)
        self.addCleanup(svc.stopService)
        runtime = svc.runtime
        assert runtime is not None and runtime.deliverer is not None
        self.assertTrue(runtime.deliverer.settings.dane)
        self.assertIs(svc.stats.dane_lookups, runtime.deliverer.dane_lookups)
        self.assertTrue(any("DANE (RFC 7672) is on" in formatEvent(e) for e in events))
