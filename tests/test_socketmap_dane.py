"""
The socketmap with C{dane} on (C{twistd mtasts --dane}) never overrides
DANE: L{mtasts_twisted.socketmap.dane}'s verdicts and the answers built on
them, with the fake resolver, then once through a DNSSEC world (signed
zones behind a validating Unbound on loopback).
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.dane import DANEState, DANEStatus
from mtasts_twisted.dns import DNSResolver, DNSTemporaryError
from mtasts_twisted.overrides import OverriddenLookup, Override, OverrideKind
from mtasts_twisted.socketmap import NetstringDecoder, SocketmapFactory, SocketmapSettings
from mtasts_twisted.socketmap import server as socketmap_server
from mtasts_twisted.socketmap.answers import MAX_REPLY
from mtasts_twisted.socketmap.dane import DomainDANE, NextHopDANE, dane_reply, judge
from mtasts_twisted.store import MemoryStore
from mtasts_twisted.testing.dnssec import Security, Zone, require_world
from mtasts_twisted.testing.memory import FakeFetcher, FakeResolver

DIGEST = "ab" * 32
ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.com\nmax_age: 86400\n"
EXACT = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: mx2.example.com\nmax_age: 86400\n"
TESTING = "version: STSv1\nmode: testing\nmx: mx1.example.com\nmax_age: 86400\n"
MTA_STS = "OK secure match=mx1.example.com:mx2.example.com servername=hostname"


def status(state: DANEState, ttl: int = 300) -> DANEStatus:
    return DANEStatus("mx.example.com", state, ttl=ttl)


class JudgeTests(SynchronousTestCase):
    """The verdict of a next hop from its hosts' statuses, and its reply (pure)."""

    def test_verdicts(self):
        U, X, N, I, B = (DANEState.USABLE, DANEState.UNUSABLE, DANEState.NONE, DANEState.INSECURE,
                         DANEState.BOGUS)
        cases = [
            ((U, U), NextHopDANE.ALL),
            ((U,), NextHopDANE.ALL),
            ((U, N), NextHopDANE.SOME),
            ((N, U), NextHopDANE.SOME),
            ((U, X), NextHopDANE.SOME),  # dane-only would defer to the UNUSABLE host
            ((X,), NextHopDANE.SOME),
            ((U, I), NextHopDANE.SOME),
            ((U, B), NextHopDANE.FAILED),
            ((N, B), NextHopDANE.FAILED),  # never MTA-STS instead of a failed DANE lookup
            ((N, I), NextHopDANE.NONE),
            ((), NextHopDANE.NONE),
        ]
        for states, verdict in cases:
            self.assertEqual(judge([status(s) for s in states]), verdict, states)

    def test_replies(self):
        self.assertEqual(dane_reply("example.com", DomainDANE(NextHopDANE.ALL)), "OK dane-only")
        self.assertEqual(dane_reply("example.com", DomainDANE(NextHopDANE.SOME)), "OK dane")
        self.assertIsNone(dane_reply("example.com", DomainDANE(NextHopDANE.NONE)))
        reply = dane_reply("example.com", DomainDANE(NextHopDANE.FAILED, detail="x" * 1000))
        self.assertTrue(reply.startswith("TEMP DANE lookup for example.com failed ("), reply)
        self.assertLessEqual(len(reply), 300)


class _FakeDNS(SynchronousTestCase):
    """The factory over L{FakeResolver}: a secure zone unless told."""

    dane = True

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.resolver = FakeResolver(secure=True)
        self.fetcher = FakeFetcher()
        self.cache = PolicyCache(MemoryStore(), self.resolver, self.fetcher, self.clock)
        self.events = []
        self.patch(socketmap_server, "log", Logger(observer=self.events.append))
        self.factory = self.make_factory()

    def make_factory(self, source=None, **kw):
        settings = SocketmapSettings(dane=self.dane, **kw)
        return SocketmapFactory(source or self.cache, self.resolver, self.clock, settings)

    def publish(self, text=ENFORCE, hosts=("mx1.example.com", "mx2.example.com"), tlsa=()):
        self.resolver.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
        self.fetcher.policies["example.com"] = text
        self.resolver.mx["example.com"] = [(10 * (i + 1), h) for i, h in enumerate(hosts)]
        for host in hosts:
            self.resolver.addresses[host] = ["192.0.2.1"]
        for host in tlsa:
            self.resolver.tlsa["_25._tcp." + host] = [(3, 1, 1, DIGEST)]

    def ask(self, key="example.com", factory=None):
        answer = (factory or self.factory).respond(b"postfix " + key.encode())
        if isinstance(answer, Deferred):
            answer = self.successResultOf(answer)
        [text] = NetstringDecoder(MAX_REPLY).feed(answer)
        return text.decode()


class FakeDNSTests(_FakeDNS):
    """Answers with C{dane} on."""

    def test_all_dane(self):
        self.publish(tlsa=("mx1.example.com", "mx2.example.com"))
        self.assertEqual(self.ask(), "OK dane-only")
        self.assertEqual(self.factory.counts["ok"], 1)
        # Port 25 whatever the policy: Postfix delivers to MX hosts on 25.
        self.assertEqual(self.resolver.queries[("TLSA", "_25._tcp.mx2.example.com")], 1)

    def test_mixed(self):
        self.publish(tlsa=("mx2.example.com",))
        self.assertEqual(self.ask(), "OK dane")

    def test_exact_patterns_mixed(self):
        # Exact patterns need no MX lookup without DANE; with it they do.
        self.publish(text=EXACT, tlsa=("mx1.example.com",))
        self.assertEqual(self.ask(), "OK dane")
        self.assertEqual(self.resolver.queries[("MX", "example.com")], 1)

    def test_unusable_tlsa_is_dane(self):
        self.publish(tlsa=("mx1.example.com", "mx2.example.com"))
        self.resolver.tlsa["_25._tcp.mx2.example.com"] = [(1, 1, 1, DIGEST)]  # PKIX-EE: unusable
        self.assertEqual(self.ask(), "OK dane")

    def test_bogus_is_temp(self):
        self.publish(tlsa=("mx1.example.com",))
        self.resolver.tlsa["_25._tcp.mx2.example.com"] = DNSTemporaryError(
            "SERVFAIL", name="_25._tcp.mx2.example.com", rdtype="TLSA")
        answer = self.ask()
        self.assertTrue(answer.startswith("TEMP DANE lookup for example.com failed (mx2.example.com: "), answer)
        self.assertEqual(self.factory.counts["temp"], 1)
        [event] = [e for e in self.events if e["log_level"].name == "warn"]
        self.assertEqual(event["domain"], "example.com")
        # The TEMP is kept for mx_retry (60 s), then DANE is asked again.
        self.ask()
        self.assertEqual(self.resolver.queries[("TLSA", "_25._tcp.mx2.example.com")], 1)
        self.clock.advance(61)
        self.resolver.tlsa["_25._tcp.mx2.example.com"] = [(3, 1, 1, DIGEST)]
        self.assertEqual(self.ask(), "OK dane-only")

    def test_bogus_without_other_dane_is_temp(self):
        self.publish()
        self.resolver.tlsa["_25._tcp.mx1.example.com"] = DNSTemporaryError("SERVFAIL")
        self.assertTrue(self.ask().startswith("TEMP DANE lookup"))

    def test_mx_failure_is_temp(self):
        self.publish()
        self.resolver.mx["example.com"] = DNSTemporaryError("SERVFAIL", name="example.com", rdtype="MX")
        self.assertEqual(self.ask(), "TEMP DANE lookup for example.com failed (MX lookup failed: SERVFAIL)")

    def test_secure_without_tlsa(self):
        self.publish()
        self.assertEqual(self.ask(), MTA_STS)

    def test_insecure_mx_with_tlsa(self):
        self.publish(tlsa=("mx1.example.com", "mx2.example.com"))
        self.resolver.security["example.com"] = False
        self.assertEqual(self.ask(), MTA_STS)
        self.assertEqual(sum(n for (kind, _), n in self.resolver.queries.items() if kind == "TLSA"), 0)

    def test_insecure_tlsa(self):
        self.publish(tlsa=("mx1.example.com", "mx2.example.com"))
        self.resolver.security["_25._tcp.mx1.example.com"] = False
        self.resolver.security["_25._tcp.mx2.example.com"] = False
        self.assertEqual(self.ask(), MTA_STS)

    def test_testing_with_attributes(self):
        # The testing level (may) would override Postfix's dane default.
        self.publish(text=TESTING, tlsa=("mx1.example.com",))
        factory = self.make_factory(tlsrpt_attributes=True)
        self.assertEqual(self.ask(factory=factory), "OK dane")
        self.resolver.tlsa.clear()
        self.clock.advance(400)
        self.assertTrue(self.ask(factory=factory).startswith("OK may policy_type=sts "))

    def test_dane_answers_carry_no_attributes(self):
        self.publish(tlsa=("mx1.example.com", "mx2.example.com"))
        self.assertEqual(self.ask(factory=self.make_factory(tlsrpt_attributes=True)), "OK dane-only")

    def test_no_policy_costs_no_dane_lookup(self):
        # NOTFOUND leaves Postfix its own level (dane): nothing to look up.
        self.resolver.mx["example.com"] = [(10, "mx1.example.com")]
        self.resolver.tlsa["_25._tcp.mx1.example.com"] = [(3, 1, 1, DIGEST)]
        self.assertEqual(self.ask(), "NOTFOUND ")
        self.assertEqual(self.resolver.queries[("MX", "example.com")], 0)

    def test_bracketed_next_hop(self):
        # Postfix connects to a [host] next hop without an MX lookup: DANE
        # applies to the host when its addresses are secure.
        self.publish(tlsa=("mx1.example.com",))
        lookup = self.successResultOf(self.cache.get("example.com"))
        factory = self.make_factory(source=_Source(lookup))
        self.assertEqual(self.ask("[mx1.example.com]", factory=factory), "OK dane-only")
        self.assertEqual(self.ask("[mx2.example.com]", factory=factory),
                         "OK secure match=mx2.example.com servername=hostname")
        self.assertEqual(self.resolver.queries[("MX", "mx1.example.com")], 0)

    def test_verdict_cached(self):
        self.publish(tlsa=("mx1.example.com", "mx2.example.com"))
        for _ in range(100):
            self.assertEqual(self.ask(), "OK dane-only")
        self.assertEqual(self.resolver.queries[("MX", "example.com")], 1)
        self.assertEqual(self.resolver.queries[("TLSA", "_25._tcp.mx1.example.com")], 1)
        self.assertEqual(self.factory.counts["ok"], 100)
        # The smallest TTL (300 s) ends it.
        self.clock.advance(301)
        self.resolver.tlsa.clear()
        self.assertEqual(self.ask(), MTA_STS)

    def test_dane_max_age(self):
        self.resolver.ttl = 86400
        self.publish(tlsa=("mx1.example.com", "mx2.example.com"))
        factory = self.make_factory(dane_max_age=100.0)
        self.ask(factory=factory)
        self.clock.advance(101)
        self.ask(factory=factory)
        self.assertEqual(self.resolver.queries[("MX", "example.com")], 2)

    def test_dane_only_override(self):
        self.publish()  # no TLSA: the operator's dane-only stands
        lookup = OverriddenLookup(None, self.cache_result(), True,
                                  override=Override("example.com", OverrideKind.DANE_ONLY))
        factory = self.make_factory(source=_Source(lookup))
        self.assertEqual(self.ask(factory=factory), "OK dane-only")
        self.assertEqual(self.resolver.queries[("MX", "example.com")], 0)

    def cache_result(self):
        self.publish()
        return self.successResultOf(self.cache.get("example.com")).result


class DANEOffTests(_FakeDNS):
    """With C{dane} off, today's answers, DANE or not."""

    dane = False

    def test_all_dane(self):
        self.publish(tlsa=("mx1.example.com", "mx2.example.com"))
        self.assertEqual(self.ask(), MTA_STS)
        self.assertEqual(sum(n for (kind, _), n in self.resolver.queries.items() if kind == "TLSA"), 0)

    def test_mixed(self):
        self.publish(tlsa=("mx2.example.com",))
        self.assertEqual(self.ask(), MTA_STS)

    def test_bogus_is_temp(self):
        self.publish()
        self.resolver.tlsa["_25._tcp.mx2.example.com"] = DNSTemporaryError("SERVFAIL")
        self.assertEqual(self.ask(), MTA_STS)

    def test_exact_patterns_mixed(self):
        self.publish(text=EXACT, tlsa=("mx1.example.com",))
        self.assertEqual(self.ask(), MTA_STS)
        self.assertEqual(self.resolver.queries[("MX", "example.com")], 0)

    def test_mx_failure_is_temp(self):
        self.publish()
        self.resolver.mx["example.com"] = DNSTemporaryError("SERVFAIL", name="example.com", rdtype="MX")
        self.assertEqual(self.ask(), "OK secure match=mx1.example.com:.example.com servername=hostname")

    def test_testing_with_attributes(self):
        self.publish(text=TESTING, tlsa=("mx1.example.com",))
        factory = self.make_factory(tlsrpt_attributes=True)
        self.assertTrue(self.ask(factory=factory).startswith("OK may policy_type=sts "))

    def test_dane_only_override(self):
        lookup = OverriddenLookup(None, self.cache_result(), True,
                                  override=Override("example.com", OverrideKind.DANE_ONLY))
        self.assertEqual(self.ask(factory=self.make_factory(source=_Source(lookup))), "OK dane-only")

    def cache_result(self):
        self.publish()
        return self.successResultOf(self.cache.get("example.com")).result


class _Source:
    def __init__(self, lookup):
        self.lookup = lookup

    def get(self, domain):
        return succeed(self.lookup)


# --- through a DNSSEC world ------------------------------------------------------------

TXT = '_mta-sts 300 IN TXT "v=STSv1; id=1"'
ZONES = [
    Zone("all.test.", (TXT, "@ 300 IN MX 10 mx1", "@ 300 IN MX 20 mx2",
                       "mx1 300 IN A 127.0.0.1", "mx2 300 IN A 127.0.0.1",
                       f"_25._tcp.mx1 300 IN TLSA 3 1 1 {DIGEST}", f"_25._tcp.mx2 300 IN TLSA 3 1 1 {DIGEST}")),
    Zone("mixed.test.", (TXT, "@ 300 IN MX 10 mx1", "@ 300 IN MX 20 mx2",
                         "mx1 300 IN A 127.0.0.1", "mx2 300 IN A 127.0.0.1",
                         f"_25._tcp.mx1 300 IN TLSA 3 1 1 {DIGEST}")),
    Zone("bogus.test.", (TXT, "@ 300 IN MX 10 mx1", "mx1 300 IN A 127.0.0.1",
                         f"_25._tcp.mx1 300 IN TLSA 3 1 1 {DIGEST}"),
         bogus_rrsets=(("_25._tcp.mx1", "TLSA"),)),
    Zone("plain.test.", (TXT, "@ 300 IN MX 10 mx1", "mx1 300 IN A 127.0.0.1",
                         f"_25._tcp.mx1 300 IN TLSA 3 1 1 {DIGEST}"), security=Security.INSECURE),
]


class DNSSECWorldTests(TestCase):
    """The answers with real DNSSEC: Knot serving signed zones, Unbound validating."""

    timeout = 60

    def setUp(self):
        world = require_world(ZONES)
        self.addCleanup(world.stop)
        resolver = DNSResolver(reactor, [world.nameserver], timeout=5, budget=20, attempts=1)
        fetcher = FakeFetcher()
        for domain in ("all.test", "mixed.test", "bogus.test", "plain.test"):
            fetcher.policies[domain] = f"version: STSv1\nmode: enforce\nmx: *.{domain}\nmax_age: 86400\n"
        cache = PolicyCache(MemoryStore(), resolver, fetcher, reactor)
        self.factories = {dane: SocketmapFactory(cache, resolver, reactor, SocketmapSettings(dane=dane))
                          for dane in (True, False)}

    async def ask(self, domain, dane=True):
        answer = self.factories[dane].respond(b"postfix " + domain.encode())
        if isinstance(answer, Deferred):
            answer = await answer
        [text] = NetstringDecoder(MAX_REPLY).feed(answer)
        return text.decode()

    async def test_answers(self):
        self.assertEqual(await self.ask("all.test"), "OK dane-only")
        self.assertEqual(await self.ask("mixed.test"), "OK dane")
        bogus = await self.ask("bogus.test")
        self.assertTrue(bogus.startswith("TEMP DANE lookup for bogus.test failed (mx1.bogus.test: "), bogus)
        self.assertEqual(await self.ask("plain.test"), "OK secure match=mx1.plain.test servername=hostname")
        # --dane off: today's MTA-STS answer, even for the DANE domain.
        self.assertEqual(await self.ask("all.test", dane=False),
                         "OK secure match=mx1.all.test:mx2.all.test servername=hostname")
        self.assertEqual(await self.ask("bogus.test", dane=False), "OK secure match=mx1.bogus.test servername=hostname")


class ServiceWiringTests(TestCase):
    """C{twistd mtasts --dane} turns DANE on in the socketmap's settings too."""

    timeout = 30

    async def test_flag_reaches_socketmap(self):
        from mtasts_twisted import service
        from mtasts_twisted.testing.dns import DNSTestServer

        dns = DNSTestServer()
        dns.start(reactor)
        self.addCleanup(dns.stop)
        for flags, expected in (((), False), (("--dane",), True)):
            options = service.Options()
            options.parseOptions(["--data-dir", self.mktemp(), "--nameserver", dns.nameserver, "--no-reports",
                                  "--socketmap", "tcp:0:interface=127.0.0.1", "--smtp", "none",
                                  "--metrics", "none", *flags])
            svc = service.makeService(options, reactor, fatal=lambda code: None)
            svc.privilegedStartService()
            svc.startService()
            self.assertTrue(await svc.ready)
            await svc.stopService()
            self.assertIs(svc.stats.socketmap.settings.dane, expected)
