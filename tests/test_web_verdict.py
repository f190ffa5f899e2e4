"""
The domain page's verdict (L{mtasts_twisted.web.verdict}): the answer the
service would give now, made from the cache by the socketmap's own code
and without any lookup, its rendering and escaping.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.cache import CacheEntry, Lookup, PolicyCache
from mtasts_twisted.metrics import ServiceStats
from mtasts_twisted.overrides import OverrideTable, OverridingPolicySource, parse_overrides
from mtasts_twisted.policy import Mode, Policy, parse_policy
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType
from mtasts_twisted.socketmap import NetstringDecoder, SocketmapFactory, SocketmapSettings, encode_netstring
from mtasts_twisted.testing.memory import FakeFetcher, FakeResolver, MemoryStore
from mtasts_twisted.web import WebSources
from mtasts_twisted.web.data import domain_page
from mtasts_twisted.web.pages import domain_html, render
from mtasts_twisted.web.sources import gather_domain
from mtasts_twisted.web.sources import gather_verdict
from mtasts_twisted.web.verdict import NO_LOOKUP, Verdict, verdict_of

from .test_web_pages import EVIL, NOW, assert_escaped

EXACT = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: mx2.example.com\nmax_age: 86400\n"
WILDCARD = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 86400\n"
TESTING = "version: STSv1\nmode: testing\nmx: mx1.example.com\nmax_age: 86400\n"
OVERRIDES = """\
["pinned.example"]
action = "enforce"
mx = ["mx.pinned.example"]
reason = "ticket 7"

["skipped.example"]
action = "skip"
until = 2030-01-02

["dane.example"]
action = "dane-only"
"""


def lookup_of(text: str, domain: str = "example.com", fresh: bool = True) -> Lookup:
    policy = parse_policy(text)
    return Lookup(policy, Result(PolicyDescriptor(PolicyType.STS, domain, policy.policy_strings, policy.mx)),
                  fresh, "1")


class VerdictOfTests(SynchronousTestCase):
    """L{verdict_of}, pure."""

    def test_not_cached(self) -> None:
        verdict = verdict_of("example.com", None, SocketmapSettings())
        self.assertIsNone(verdict.answer)
        self.assertIn("not cached: the next request for it looks the policy up", verdict.how)

    def test_known_without_dns(self) -> None:
        verdict = verdict_of("example.com", lookup_of(EXACT), SocketmapSettings())
        self.assertEqual(verdict, Verdict(
            "example.com", "OK secure match=mx1.example.com:mx2.example.com servername=hostname",
            "as the socketmap answers it from the cache", True, "enforce", ("mx1.example.com", "mx2.example.com"),
            True, relay="deliver only over STARTTLS with a verified certificate, to MX hosts the policy names"))
        testing = verdict_of("example.com", lookup_of(TESTING, fresh=False), SocketmapSettings())
        self.assertEqual((testing.answer, testing.mode, testing.confirmed), ("NOTFOUND ", "testing", False))
        strict = verdict_of("example.com", lookup_of(TESTING), SocketmapSettings(strict_testing=True))
        self.assertEqual(strict.answer, "OK secure match=mx1.example.com servername=hostname")

    def test_needs_a_lookup(self) -> None:
        """A wildcard needs the MX answer, and --dane the DANE verdict: unknown, unless the socketmap memoised it."""
        wildcard = verdict_of("example.com", lookup_of(WILDCARD), SocketmapSettings())
        self.assertIsNone(wildcard.answer)
        self.assertEqual(wildcard.how, "lists the MX hosts matching mx1.example.com, *.example.net (a wildcard "
                                       "matches one label): needs the domain's MX answer, not looked up here")
        dane = verdict_of("example.com", lookup_of(EXACT), SocketmapSettings(dane=True))
        self.assertEqual((dane.answer, dane.how),
                         (None, "needs the DANE verdict of its MX hosts (--dane), not looked up here"))
        memo = ("OK secure match=mx1.example.com:a.example.net servername=hostname", NOW + 300)
        memoised = verdict_of("example.com", lookup_of(WILDCARD), SocketmapSettings(), memo)
        self.assertEqual((memoised.answer, memoised.how),
                         (memo[0], "as the socketmap memoised it, until 2025-12-03 00:05:00 UTC"))

    def test_overrides(self) -> None:
        """Overrides decide the answer and the relay's words, with or without a cached policy."""
        clock = Clock()
        source = OverridingPolicySource(_NoCache(), OverrideTable("o.toml", parse_overrides(OVERRIDES, "o.toml")),
                                        clock)
        pinned = verdict_of("pinned.example", source.applied(None, "pinned.example"), SocketmapSettings(),
                            cached=False)
        self.assertEqual((pinned.answer, pinned.cached, pinned.override),
                         ("OK secure match=mx.pinned.example servername=hostname", False,
                          "enforce (o.toml:1), mx mx.pinned.example: ticket 7"))
        self.assertIn("the override decides whatever a lookup finds (nothing cached)", pinned.how)
        skipped = verdict_of("skipped.example", source.applied(lookup_of(EXACT, "skipped.example"),
                                                               "skipped.example"), SocketmapSettings())
        self.assertEqual((skipped.answer, skipped.mode), ("NOTFOUND ", "-"))
        dane = verdict_of("dane.example", source.applied(lookup_of(WILDCARD, "dane.example"), "dane.example"),
                          SocketmapSettings(), relay_dane=True)
        self.assertEqual(dane.answer, "OK dane-only")
        self.assertIn("the relay sends only to MX hosts DANE authenticates", dane.relay)
        source.enforce_as_testing = True
        relaxed = verdict_of("example.com", source.applied(lookup_of(EXACT), "example.com"), SocketmapSettings())
        self.assertEqual((relaxed.answer, relaxed.mode, relaxed.as_testing), ("NOTFOUND ", "testing", True))


class _NoCache:
    def get(self, domain: str) -> Any:
        raise AssertionError("the verdict never asks the cache's get")


class GatherVerdictTests(SynchronousTestCase):
    """
    L{gather_verdict} over a real cache, overrides and socketmap: no DNS
    query, no fetch, nothing counted, and the answer is the socketmap's.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.resolver = FakeResolver(ttl=60)
        self.fetcher = FakeFetcher()
        self.store = MemoryStore()
        self.cache = PolicyCache(self.store, self.resolver, self.fetcher, self.clock)
        table = OverrideTable("o.toml", parse_overrides(OVERRIDES, "o.toml"))
        self.policies = OverridingPolicySource(self.cache, table, self.clock)
        self.factory = SocketmapFactory(self.policies, self.resolver, self.clock, SocketmapSettings())
        self.sources = WebSources(clock=self.clock, stats=None, cache=lambda: self.cache,
                                  policies=lambda: self.policies, socketmap=lambda: self.factory)

    def publish(self, domain: str, text: str, mx: tuple[str, ...] = ("mx1.example.com",)) -> None:
        self.resolver.txt["_mta-sts." + domain] = ["v=STSv1; id=1"]
        self.fetcher.policies[domain] = text
        self.resolver.mx[domain] = [(10, host) for host in mx]

    def socketmap(self, domain: str) -> str:
        """What the socketmap answers (asking DNS as it must)."""
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(encode_netstring(b"postfix " + domain.encode()))
        [answer] = NetstringDecoder().feed(transport.value())
        proto.connectionLost(None)
        return answer.decode()

    def verdict(self, domain: str) -> Verdict:
        asked = (sum(self.resolver.queries.values()), sum(self.fetcher.fetches.values()), dict(self.factory.counts),
                 dict(self.cache.stats), dict(self.policies.uses))
        verdict = self.successResultOf(Deferred.fromCoroutine(gather_verdict(self.sources, domain)))
        self.assertEqual((sum(self.resolver.queries.values()), sum(self.fetcher.fetches.values()),
                          dict(self.factory.counts), dict(self.cache.stats), dict(self.policies.uses)), asked)
        return verdict

    def test_as_the_socketmap_answers(self) -> None:
        self.publish("exact.example", EXACT)
        self.publish("wild.example", WILDCARD, ("mx1.example.com", "a.example.net", "b.c.example.net"))
        self.assertIsNone(self.verdict("exact.example").answer)  # not cached yet
        for domain in ("exact.example", "wild.example", "pinned.example", "skipped.example", "dane.example"):
            answer = self.socketmap(domain)
            self.assertEqual(self.verdict(domain).answer, answer, domain)
        # A domain without MTA-STS is not cached (the next request asks DNS again).
        self.assertEqual(self.socketmap("nothing.example"), "NOTFOUND ")
        self.assertIn("not cached", self.verdict("nothing.example").how)
        self.assertEqual(self.verdict("wild.example").answer,
                         "OK secure match=mx1.example.com:a.example.net servername=hostname")
        self.assertIn("memoised", self.verdict("wild.example").how)
        # Past the TXT TTL and the memo: still known from the cache, not confirmed now.
        self.clock.advance(301)
        exact = self.verdict("exact.example")
        self.assertEqual((exact.answer, exact.confirmed, exact.cached),
                         ("OK secure match=mx1.example.com:mx2.example.com servername=hostname", False, True))
        self.assertIsNone(self.verdict("wild.example").answer)

    def test_backoff_literals_and_bad_names(self) -> None:
        self.resolver.txt["_mta-sts.broken.example"] = ["v=STSv1; id=1"]
        self.assertEqual(self.socketmap("broken.example"), "NOTFOUND ")  # no policy served: backs off
        broken = self.verdict("broken.example")
        self.assertEqual((broken.answer, broken.cached), ("NOTFOUND ", True))
        self.assertIn("backing off after a failed policy fetch", broken.problem)
        self.assertEqual(self.verdict("[192.0.2.1]").answer, "NOTFOUND ")
        bad = self.verdict("not a domain")
        self.assertIsNone(bad.answer)
        self.assertIn("not a domain name", bad.how)
        self.assertIn("not open yet", self.successResultOf(Deferred.fromCoroutine(
            gather_verdict(WebSources(clock=self.clock, stats=None), "example.com"))).how)

    def test_domain_page_by_either_name(self) -> None:
        """An IDN's page, asked by A-label or U-label, shows its cache entry and verdict."""
        self.publish("xn--bcher-kva.example", EXACT)
        self.successResultOf(self.cache.get("bücher.example"))
        sources = attrs.evolve(self.sources, stats=ServiceStats(), store=lambda: self.store)
        for name in ("xn--bcher-kva.example", "Bücher.example."):
            page = self.successResultOf(Deferred.fromCoroutine(gather_domain(sources, name)))
            assert page.row is not None and page.verdict is not None
            self.assertEqual((page.row.mode, page.verdict.domain, page.verdict.answer),
                             ("enforce", "xn--bcher-kva.example",
                              "OK secure match=mx1.example.com:mx2.example.com servername=hostname"), name)

    def test_without_socketmap_or_overrides(self) -> None:
        """Without a socketmap the service's settings render the answer; without overrides the cache's stands."""
        self.publish("exact.example", EXACT)
        self.successResultOf(self.cache.get("exact.example"))
        sources = WebSources(clock=self.clock, stats=None, cache=lambda: self.cache,
                             answer_settings=SocketmapSettings(dane=True), dane=True)
        verdict = self.successResultOf(Deferred.fromCoroutine(gather_verdict(sources, "exact.example")))
        self.assertEqual((verdict.answer, verdict.mode), (None, "enforce"))
        self.assertIn("DANE verdict", verdict.how)
        pinned = self.successResultOf(Deferred.fromCoroutine(gather_verdict(sources, "pinned.example")))
        self.assertIsNone(pinned.answer)  # no overrides in these sources: nothing cached


class VerdictPageTests(SynchronousTestCase):
    """The verdict on the domain page: labelled, and every peer value in it escaped."""

    def test_labelled(self) -> None:
        verdict = verdict_of("example.com", lookup_of(EXACT), SocketmapSettings())
        html = render(domain_html(domain_page("example.com", None, {}, [], "2025-12-03", verdict))).decode()
        self.assertIn(f"Verdict now ({NO_LOOKUP})", html)
        self.assertIn("<code>OK secure match=mx1.example.com:mx2.example.com servername=hostname</code>", html)
        self.assertIn("mode enforce, mx mx1.example.com mx2.example.com (confirmed by DNS within its TTL)", html)

    def test_escaped(self) -> None:
        """MX patterns and names (in the answer), a memoised reply and a lookup's problem come out as text."""
        evil = " ".join(EVIL)
        policy = Policy(mode=Mode.ENFORCE, max_age=86400, mx=(evil, "*." + evil), text=evil)
        failure = FailureDetails(ResultType.STS_POLICY_FETCH_ERROR, failure_reason_code=evil)
        lookup = Lookup(policy, Result(PolicyDescriptor(PolicyType.STS, evil), failures=(failure,)), False, evil,
                        CacheEntry(evil, evil, NOW, NOW, NOW), error=evil)
        for verdict in (verdict_of(evil, lookup, SocketmapSettings()),
                        verdict_of(evil, lookup, SocketmapSettings(), (f"OK secure match={evil}", NOW)),
                        verdict_of(evil, Lookup(Policy(mode=Mode.ENFORCE, max_age=1, mx=(evil,), text=""),
                                                lookup.result, True), SocketmapSettings())):
            html = render(domain_html(domain_page(evil, None, {}, [], "2025-12-03", verdict)))
            assert_escaped(self, html)
            self.assertGreaterEqual(html.count(b"&lt;script&gt;"), 3)
