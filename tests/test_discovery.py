"""
End to end over the loopback world (real DNS, real HTTPS, real TLS) and a
real SQLite file: discovery, and the policy cache above it.
"""

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.dns import DNSTemporaryError
from mtasts_twisted.dns.records import lookup_sts_record
from mtasts_twisted.fetch import NoPolicyServedError, PolicyFetchError, discover
from mtasts_twisted.policy import Mode, NoRecordError, select_tlsrpt_record
from mtasts_twisted.results import PolicyType, ResultType
from mtasts_twisted.store import open_store
from mtasts_twisted.testing.dns import Behaviour
from mtasts_twisted.testing.https import Route
from mtasts_twisted.testing.world import LoopbackWorld
from tests.vectors import load_vectors

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"


class WorldTestCase(TestCase):
    def setUp(self):
        self.world = LoopbackWorld.start(reactor)
        self.addCleanup(self.world.stop)


class DiscoverTests(WorldTestCase):
    async def test_discover(self):
        self.world.publish("example.com", ENFORCE, record_id="20240101")
        found = await discover(self.world.resolver, self.world.fetcher, "EXAMPLE.com.")
        self.assertEqual((found.domain, found.record.id, found.policy.mode), ("example.com", "20240101", Mode.ENFORCE))
        self.assertEqual(found.text, ENFORCE)
        self.assertEqual(self.world.https.servernames, ["mta-sts.example.com"])

    async def test_idn(self):
        self.world.publish("xn--bcher-kva.example", ENFORCE)
        found = await discover(self.world.resolver, self.world.fetcher, "bücher.example")
        self.assertEqual(found.domain, "xn--bcher-kva.example")

    async def test_vector_sts_txt_lookup(self):
        """sts_txt_lookup:0 — NXDOMAIN at _mta-sts means no record."""
        for vector in load_vectors("sts_txt_lookup"):
            name = vector["name"].rstrip(".")
            domain = name.split(".", 1)[1]
            self.assertEqual(vector["dns"], "NXDOMAIN")
            with self.assertRaises(NoRecordError):
                await lookup_sts_record(self.world.resolver, domain)
            self.assertEqual(self.world.dns.count(name, "TXT"), 1)

    async def test_vector_tlsrpt_txt_lookup(self):
        for vector in load_vectors("tlsrpt_txt_lookup"):
            name = vector["name"].rstrip(".")
            self.world.dns.add_txt(name, *vector["txt"])
            answer = await self.world.resolver.lookup_txt(name)
            record = select_tlsrpt_record(answer.strings)
            self.assertEqual(list(record.rua), [u for rua in vector["expected"]["rua"] for u in rua])

    async def test_vector_policy_fetch_4(self):
        """policy_fetch:4 — the policy host does not exist: no policy served; no TXT: no record."""
        with self.assertRaises(NoPolicyServedError):
            await self.world.fetcher.fetch("doesnotexist.example")
        with self.assertRaises(NoRecordError):
            await discover(self.world.resolver, self.world.fetcher, "doesnotexist.example")
        self.assertEqual(self.world.https.request_count(), 0)

    async def test_policy_host_dns_failure_is_not_no_policy(self):
        """A temporary DNS failure for mta-sts.<domain> is cannot-fetch-policy, not no-policy-served."""
        self.world.publish("example.com", ENFORCE)
        self.world.dns.set_behaviour("mta-sts.example.com", Behaviour.SERVFAIL)
        with self.assertRaises(PolicyFetchError) as caught:
            await self.world.fetcher.fetch("example.com")
        self.assertNotIsInstance(caught.exception, NoPolicyServedError)
        self.assertEqual(caught.exception.reason, "cannot-fetch-policy")
        self.assertIn("temporary DNS failure", str(caught.exception))
        self.assertEqual(self.world.https.request_count(), 0)

    async def test_dns_servfail(self):
        self.world.dns.set_behaviour("_mta-sts.example.com", Behaviour.SERVFAIL)
        with self.assertRaises(DNSTemporaryError):
            await discover(self.world.resolver, self.world.fetcher, "example.com")


class CacheEndToEndTests(WorldTestCase):
    async def make_cache(self, path=None):
        store = await open_store("sqlite:" + (path or self.mktemp()), reactor)
        self.addCleanup(store.close)
        cache = PolicyCache(store, self.world.resolver, self.world.fetcher, reactor)
        self.addCleanup(cache.stop)
        return cache

    async def test_coalescing_counted_at_servers(self):
        """100 concurrent lookups of an uncached domain: 1 TXT query, 1 HTTPS fetch."""
        self.world.publish("example.com", ENFORCE)
        cache = await self.make_cache()
        lookups = await defer.gatherResults([cache.get("example.com") for _ in range(100)])
        self.assertEqual({lookup.policy.mode for lookup in lookups}, {Mode.ENFORCE})
        self.assertEqual(self.world.dns.count("_mta-sts.example.com", "TXT"), 1)
        self.assertEqual(self.world.https.request_count("mta-sts.example.com"), 1)

    async def test_failing_fetch_backs_off(self):
        self.world.publish("example.com", ENFORCE)
        self.world.https.serve("mta-sts.example.com", Route.status_only(500))
        cache = await self.make_cache()
        for _ in range(20):
            lookup = await cache.get("example.com")
            self.assertIsNone(lookup.policy)
        reasons = {lookup.result.failures[0].failure_reason_code}
        self.assertEqual(reasons, {"back-off-after-recent-fetch-error"})
        self.assertEqual(self.world.https.request_count("mta-sts.example.com"), 1)

    async def test_downgrade_resistance(self):
        """The TXT record vanishes: the cached enforce policy still applies."""
        self.world.publish("example.com", ENFORCE, ttl=0)  # no answer may be reused
        cache = await self.make_cache()
        await cache.get("example.com")
        self.world.unpublish("example.com")
        self.world.https.serve("mta-sts.example.com", Route.policy("version: STSv1\nmode: none\nmax_age: 1\n"))
        self.world.resolver.clear_cache()
        lookup = await cache.get("example.com")
        self.assertEqual((lookup.policy.mode, lookup.fresh), (Mode.ENFORCE, False))
        self.assertEqual(lookup.result.failures[0].result_type, ResultType.STS_POLICY_FETCH_ERROR)
        self.assertTrue(lookup.result.failures[0].failure_reason_code.endswith("+fallback-to-cached-policy"))

    async def test_persists_across_restart(self):
        """A new cache on the same SQLite file serves the policy without HTTPS."""
        self.world.publish("example.com", ENFORCE)
        path = self.mktemp()
        first = await self.make_cache(path)
        await first.get("example.com")
        second = await self.make_cache(path)
        lookup = await second.get("example.com")
        self.assertEqual(lookup.policy.mode, Mode.ENFORCE)
        self.assertEqual(lookup.result.policy.policy_type, PolicyType.STS)
        self.assertEqual(self.world.https.request_count("mta-sts.example.com"), 1)

    async def test_certificate_failure_classified(self):
        self.world.publish("example.com", ENFORCE)
        self.world.https.set_certificate("mta-sts.example.com", self.world.pki.expired("mta-sts.example.com"))
        cache = await self.make_cache()
        lookup = await cache.get("example.com")
        [failure] = lookup.result.failures
        self.assertEqual((failure.result_type, failure.failure_reason_code),
                         (ResultType.STS_WEBPKI_INVALID, "certificate-expired"))

    async def test_fetch_error_types(self):
        self.world.publish("example.com", ENFORCE)
        self.world.https.serve("mta-sts.example.com", Route.redirect("https://mta-sts.example.com/x"))
        with self.assertRaises(PolicyFetchError):
            await self.world.fetcher.fetch("example.com")
