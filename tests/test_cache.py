"""
Tests for L{mtasts_twisted.cache}: every row of docs/design.rst's policy cache
table, coalescing, backoff, downgrade resistance and the refresher, with a
fake clock and in-memory fakes (the loopback end-to-end tests are in
C{tests.test_discovery_cache}).
"""

import random

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.cache import (
    CacheEntry,
    CacheSettings,
    PolicyCache,
    PolicyLookupTemporaryError,
    PolicyRefresher,
    RefresherSettings,
)
from mtasts_twisted.dns import DNSTemporaryError
from mtasts_twisted.fetch import FetchedPolicy, PolicyCertificateError, PolicyFetchError
from mtasts_twisted.policy import DomainError, Mode, parse_policy
from mtasts_twisted.results import PolicyType, ResultType
from mtasts_twisted.testing.memory import FakeFetcher, FakeResolver, MemoryStore

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"
ENFORCE2 = "version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 86400\n"
NONE = "version: STSv1\nmode: none\nmax_age: 86400\n"
TXT = "_mta-sts.example.com"


class CacheTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        # TTL 0: every get() asks DNS, so each row of the table is exercised;
        # ConfirmedAnswerTests covers reuse within a TTL.
        self.resolver = FakeResolver(ttl=0)
        self.fetcher = FakeFetcher()
        self.cache = PolicyCache(self.store, self.resolver, self.fetcher, self.clock, CacheSettings())

    def get(self, domain="example.com"):
        return self.successResultOf(self.cache.get(domain))

    def publish(self, record_id="1", text=ENFORCE, domain="example.com"):
        self.resolver.txt["_mta-sts." + domain] = [f"v=STSv1; id={record_id}"]
        self.fetcher.policies[domain] = text

    def failure(self, lookup):
        [detail] = lookup.result.failures
        return detail.result_type, detail.failure_reason_code


class EmptyCacheTests(CacheTestCase):
    def test_no_txt(self):
        lookup = self.get()
        self.assertEqual((lookup.policy, lookup.fresh), (None, True))
        self.assertEqual(lookup.result.policy.policy_type, PolicyType.NO_POLICY_FOUND)
        self.assertEqual(lookup.result.failures, ())
        self.assertEqual(self.fetcher.fetches["example.com"], 0)

    def test_several_records(self):
        self.resolver.txt[TXT] = ["v=STSv1; id=1", "v=STSv1; id=2"]
        lookup = self.get()
        self.assertIsNone(lookup.policy)
        self.assertEqual(self.failure(lookup), (ResultType.STS_POLICY_FETCH_ERROR, "multiple-mta-sts-records"))

    def test_record_syntax_error(self):
        self.resolver.txt[TXT] = ["v=STSv1; id=bad-id"]
        lookup = self.get()
        self.assertIsNone(lookup.policy)
        self.assertEqual(self.failure(lookup), (ResultType.STS_POLICY_FETCH_ERROR, "record-syntax-error"))
        self.assertEqual(self.fetcher.fetches["example.com"], 0)

    def test_dns_temporary_failure(self):
        self.resolver.txt[TXT] = DNSTemporaryError("SERVFAIL", name=TXT, rdtype="TXT")
        f = self.failureResultOf(self.cache.get("example.com"), PolicyLookupTemporaryError)
        self.assertEqual(self.failure(f.value), (ResultType.STS_POLICY_FETCH_ERROR, "dns-lookup"))

    def test_fetch_failure_backs_off(self):
        self.publish()
        self.fetcher.policies["example.com"] = PolicyFetchError("https://x", "500")
        lookup = self.get()
        self.assertIsNone(lookup.policy)
        self.assertEqual(self.failure(lookup), (ResultType.STS_POLICY_FETCH_ERROR, "cannot-fetch-policy"))
        # Within 5 minutes: no DNS, no HTTPS.
        self.clock.advance(299)
        lookup = self.get()
        self.assertEqual(self.failure(lookup), (ResultType.STS_POLICY_FETCH_ERROR,
                                                "back-off-after-recent-fetch-error"))
        self.assertEqual(self.fetcher.fetches["example.com"], 1)
        self.assertEqual(self.resolver.queries[("TXT", TXT)], 1)
        # After the backoff: fetched again.
        self.clock.advance(2)
        self.publish()
        self.assertEqual(self.get().policy.mode, Mode.ENFORCE)
        self.assertEqual(self.fetcher.fetches["example.com"], 2)

    def test_certificate_failure(self):
        self.publish()
        self.fetcher.policies["example.com"] = PolicyCertificateError(
            "https://x", "expired", reason="certificate-expired")
        lookup = self.get()
        self.assertEqual(self.failure(lookup), (ResultType.STS_WEBPKI_INVALID, "certificate-expired"))

    def test_no_policy_served(self):
        self.resolver.txt[TXT] = ["v=STSv1; id=1"]
        lookup = self.get()
        self.assertEqual(self.failure(lookup), (ResultType.STS_POLICY_FETCH_ERROR, "no-policy-served"))

    def test_ok(self):
        self.publish()
        lookup = self.get()
        self.assertEqual((lookup.policy.mode, lookup.fresh, lookup.record_id), (Mode.ENFORCE, True, "1"))
        self.assertEqual(lookup.result.policy.policy_type, PolicyType.STS)
        self.assertEqual(lookup.result.policy.policy_strings, tuple(ENFORCE.splitlines()))
        row = self.successResultOf(self.store.shelf("policies").get("example.com"))
        self.assertEqual((row["record_id"], row["mode"], row["policy_text"]), ("1", "enforce", ENFORCE))
        self.assertEqual(row["valid_end"], self.clock.seconds() + 86400)

    def test_ok_mode_none(self):
        self.publish(text=NONE)
        lookup = self.get()
        self.assertEqual(lookup.policy.mode, Mode.NONE)
        self.assertEqual(lookup.result.policy.policy_type, PolicyType.NO_POLICY_FOUND)

    def test_unpacks(self):
        self.publish()
        policy, result, fresh = self.get()
        self.assertEqual((policy.mode, fresh), (Mode.ENFORCE, True))

    def test_address_literal(self):
        lookup = self.get("[192.0.2.1]")
        self.assertIsNone(lookup.policy)
        self.assertEqual(sum(self.resolver.queries.values()), 0)

    def test_bad_domain(self):
        self.failureResultOf(self.cache.get("exa mple.com"), DomainError)

    def test_idn_key(self):
        self.publish(domain="xn--bcher-kva.example")
        self.assertEqual(self.get("BÜCHER.example.").policy.mode, Mode.ENFORCE)
        self.assertIsNotNone(self.successResultOf(self.store.shelf("policies").get("bücher.example")))


class CachedPolicyTests(CacheTestCase):
    def setUp(self):
        super().setUp()
        self.publish()
        self.get()
        self.clock.advance(60)

    def test_same_id(self):
        lookup = self.get()
        self.assertEqual((lookup.policy.mode, lookup.fresh), (Mode.ENFORCE, True))
        self.assertEqual(lookup.result.failures, ())
        self.assertEqual(self.fetcher.fetches["example.com"], 1)

    def test_txt_gone(self):
        del self.resolver.txt[TXT]
        lookup = self.get()
        self.assertEqual((lookup.policy.mode, lookup.fresh), (Mode.ENFORCE, False))
        self.assertEqual(self.failure(lookup), (ResultType.STS_POLICY_FETCH_ERROR,
                                                "no-record+fallback-to-cached-policy"))

    def test_dns_error(self):
        self.resolver.txt[TXT] = DNSTemporaryError("timeout", name=TXT, rdtype="TXT")
        lookup = self.get()
        self.assertEqual(lookup.policy.mode, Mode.ENFORCE)
        self.assertEqual(self.failure(lookup)[1], "dns-lookup+fallback-to-cached-policy")

    def test_new_id_fetch_fails(self):
        self.publish(record_id="2")
        self.fetcher.policies["example.com"] = PolicyFetchError("https://x", "reset")
        lookup = self.get()
        self.assertEqual((lookup.policy.mode, lookup.fresh), (Mode.ENFORCE, False))
        self.assertEqual(self.failure(lookup)[1], "cannot-fetch-policy+fallback-to-cached-policy")
        # Backoff for id 2: no second fetch within 5 minutes.
        self.clock.advance(100)
        self.assertEqual(self.get().policy.mode, Mode.ENFORCE)
        self.assertEqual(self.fetcher.fetches["example.com"], 2)
        # A third id is fetched at once.
        self.publish(record_id="3", text=ENFORCE2)
        self.assertEqual(self.get().policy.mx, ("*.example.com",))
        self.assertEqual(self.fetcher.fetches["example.com"], 3)

    def test_new_id_fetch_ok(self):
        self.publish(record_id="2", text=ENFORCE2)
        lookup = self.get()
        self.assertEqual((lookup.policy.mx, lookup.fresh, lookup.record_id), (("*.example.com",), True, "2"))

    def test_downgrade_until_valid_end(self):
        """A vanished TXT record never replaces the policy before valid_end."""
        del self.resolver.txt[TXT]
        self.clock.advance(86400 - 60 - 1)
        self.assertEqual(self.get().policy.mode, Mode.ENFORCE)
        self.clock.advance(1)
        lookup = self.get()
        self.assertIsNone(lookup.policy)
        self.assertEqual(lookup.result.policy.policy_type, PolicyType.NO_POLICY_FOUND)

    def test_cached_lookup_reads_no_store(self):
        shelf = self.store.shelf("policies")
        calls = []
        self.patch(shelf, "get", lambda key: calls.append(key))
        self.assertEqual(self.get().policy.mode, Mode.ENFORCE)
        self.assertEqual(calls, [])

    def test_survives_restart(self):
        cache = PolicyCache(self.store, self.resolver, self.fetcher, self.clock)
        lookup = self.successResultOf(cache.get("example.com"))
        self.assertEqual(lookup.policy.mode, Mode.ENFORCE)
        self.assertEqual(self.fetcher.fetches["example.com"], 1)


class LastUseTests(CacheTestCase):
    def test_batched(self):
        self.publish()
        self.get()
        shelf = self.store.shelf("policies")
        before = self.successResultOf(shelf.get("example.com"))["last_use"]
        self.cache.start()
        self.addCleanup(self.cache.stop)
        for _ in range(10):
            self.clock.advance(1)
            self.get()
        self.assertEqual(self.successResultOf(shelf.get("example.com"))["last_use"], before)
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(shelf.get("example.com"))["last_use"], before + 10)

    def test_flushed_on_stop(self):
        self.publish()
        self.get()
        self.clock.advance(5)
        self.get()
        self.successResultOf(self.cache.stop())
        row = self.successResultOf(self.store.shelf("policies").get("example.com"))
        self.assertEqual(row["last_use"], self.clock.seconds())


class _HeldUpdates:
    """A shelf whose update()s wait until the test releases them."""

    def __init__(self, shelf):
        self._shelf = shelf
        self.held = []
        self.most_in_flight = 0

    def __getattr__(self, name):
        return getattr(self._shelf, name)

    def update(self, key, function):
        d = Deferred()
        self.held.append((key, function, d))
        self.most_in_flight = max(self.most_in_flight, len(self.held))
        return d

    def release(self, error=None):
        held, self.held = self.held, []
        for key, function, d in held:
            if error is not None:
                d.errback(error)
            else:
                self._shelf.update(key, function).chainDeferred(d)


class FlushTests(CacheTestCase):
    def setUp(self):
        super().setUp()
        self.cache = PolicyCache(self.store, self.resolver, self.fetcher, self.clock, CacheSettings(flush_batch=3))
        self.domains = [f"d{i}.example" for i in range(8)]
        for domain in self.domains:
            self.publish(domain=domain)
            self.get(domain)
        self.clock.advance(5)
        for domain in self.domains:
            self.get(domain)
        self.shelf = _HeldUpdates(self.cache._shelf)
        # The batched last_use writes go through the cache's UseTimes.
        self.cache._shelf = self.cache._uses._shelf = self.shelf

    def test_bounded_batches(self):
        """A flush keeps at most flush_batch writes in flight and writes every domain."""
        done = self.cache.flush()
        rounds = 0
        while self.shelf.held and rounds < 10:
            self.assertLessEqual(len(self.shelf.held), 3)
            self.shelf.release()
            rounds += 1
        self.successResultOf(done)
        self.assertEqual(rounds, 3)  # 8 domains in batches of 3
        self.assertEqual(self.shelf.most_in_flight, 3)
        for domain in self.domains:
            row = self.successResultOf(self.store.shelf("policies").get(domain))
            self.assertEqual(row["last_use"], self.clock.seconds())

    def test_early_flush_when_many_domains(self):
        """Pending last_use times of max_pending_use domains are written before the interval ends."""
        self.cache._shelf = self.cache._uses._shelf = self.shelf._shelf
        self.successResultOf(self.cache.flush())
        self.cache = PolicyCache(self.store, self.resolver, self.fetcher, self.clock,
                                 CacheSettings(max_pending_use=5, flush_batch=3))
        shelf = _HeldUpdates(self.cache._shelf)
        self.cache._shelf = self.cache._uses._shelf = shelf
        for domain in self.domains[:4]:
            self.get(domain)
        self.assertEqual(shelf.held, [])  # 4 < max_pending_use: batched until the interval
        self.get(self.domains[4])
        self.assertEqual(len(shelf.held), 3)  # the fifth domain started a flush
        self.get(self.domains[5])
        self.assertEqual(self.cache._pending_use.keys(), {self.domains[5]})
        shelf.release()
        shelf.release()
        self.assertEqual(shelf.held, [])
        self.assertIsNone(self.cache._uses._early)

    def test_failures_logged_once(self):
        """A store that fails every write gives one log event per flush, not one per domain."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        done = self.cache.flush()
        for _ in range(3):
            self.shelf.release(RuntimeError("disk gone"))
        self.successResultOf(done)
        failures = [e for e in events if "log_failure" in e and "last_use" in e.get("log_format", "")]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["count"], 8)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class CoalescingTests(CacheTestCase):
    def test_concurrent_gets_share_work(self):
        txt, fetch = Deferred(), Deferred()
        self.resolver.txt[TXT] = txt
        self.fetcher.policies["example.com"] = fetch
        pending = [self.cache.get("example.com") for _ in range(100)]
        for d in pending:
            self.assertNoResult(d)
        from mtasts_twisted.dns import TXTAnswer

        txt.callback(TXTAnswer(name=TXT, strings=("v=STSv1; id=1",), ttl=60))
        fetch.callback(FetchedPolicy(parse_policy(ENFORCE), ENFORCE))
        modes = {self.successResultOf(d).policy.mode for d in pending}
        self.assertEqual(modes, {Mode.ENFORCE})
        self.assertEqual(self.resolver.queries[("TXT", TXT)], 1)
        self.assertEqual(self.fetcher.fetches["example.com"], 1)

    def test_concurrent_failures_reach_everyone(self):
        txt = Deferred()
        self.resolver.txt[TXT] = txt
        pending = [self.cache.get("example.com") for _ in range(3)]
        txt.errback(DNSTemporaryError("timeout", name=TXT, rdtype="TXT"))
        for d in pending:
            self.failureResultOf(d, PolicyLookupTemporaryError)
        self.resolver.txt[TXT] = ["v=STSv1; id=1"]
        self.fetcher.policies["example.com"] = ENFORCE
        self.assertEqual(self.get().policy.mode, Mode.ENFORCE)


class RefresherTests(CacheTestCase):
    def setUp(self):
        super().setUp()
        self.publish()
        self.get()
        self.refresher = PolicyRefresher(
            self.cache, self.clock,
            RefresherSettings(interval=3600, stale_after=12 * 3600, spread=3 * 3600),
            rng=random.Random(1))

    def entry(self):
        row = self.successResultOf(self.store.shelf("policies").get("example.com"))
        return None if row is None else CacheEntry.from_json(row)

    def test_same_id_extends_without_https(self):
        self.refresher.startService()
        self.addCleanup(self.refresher.stopService)
        self.assertEqual(self.refresher.runs[-1]["scheduled"], 0)  # fresh at start
        self.clock.advance(12 * 3600)  # the run at 12h finds it stale
        self.assertEqual(self.refresher.runs[-1]["scheduled"], 1)
        self.clock.advance(3 * 3600)  # within the spread window
        entry = self.entry()
        self.assertGreater(entry.last_update, 1_700_000_000 + 12 * 3600)
        self.assertEqual(entry.valid_end, entry.last_update + 86400)
        self.assertEqual(self.fetcher.fetches["example.com"], 1)

    def test_spread(self):
        for i in range(20):
            self.publish(domain=f"d{i}.example")
            self.get(f"d{i}.example")
        self.clock.advance(12 * 3600)
        self.refresher.startService()
        self.addCleanup(self.refresher.stopService)
        times = sorted(call.getTime() for call in self.clock.getDelayedCalls()
                       if call.func == self.refresher._refresh)
        self.assertEqual(len(times), 21)
        self.assertGreater(times[-1] - times[0], 3600)  # not all at once

    def test_pages_through_a_large_cache(self):
        """A run visits every entry, reading the store a page at a time."""
        shelf = self.store.shelf("policies")
        row = self.successResultOf(shelf.get("example.com"))
        for i in range(1200):
            self.successResultOf(shelf.put(f"d{i:04}.example", dict(row, domain=f"d{i:04}.example",
                                                                    alabel=f"d{i:04}.example")))
        pages = []
        real_items = shelf.items
        self.patch(shelf, "items", lambda after=None, limit=None: pages.append(limit) or real_items(after, limit))
        self.clock.advance(12 * 3600)
        summary = self.successResultOf(self.refresher.run())
        self.assertEqual((summary["entries"], summary["scheduled"]), (1201, 1201))
        self.assertEqual(pages, [500, 500, 500])
        self.refresher.stopService()

    def test_new_id_fetched(self):
        self.clock.advance(12 * 3600)
        self.publish(record_id="2", text=ENFORCE2)
        self.successResultOf(self.cache.refresh("example.com"))
        self.assertEqual((self.entry().record_id, self.entry().policy.mx), ("2", ("*.example.com",)))

    def test_failure_keeps_policy(self):
        self.publish(record_id="2")
        self.fetcher.policies["example.com"] = PolicyFetchError("https://x", "500")
        self.successResultOf(self.cache.refresh("example.com"))
        entry = self.entry()
        self.assertEqual((entry.record_id, entry.policy.mode, entry.backoff_id), ("1", Mode.ENFORCE, "2"))

    def alerts(self):
        """Capture the warnings of failed refreshes: (formatted text, event)."""
        from twisted.logger import LogLevel, formatEvent, globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return lambda: [(formatEvent(e), e) for e in events
                        if e.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical)
                        and "policy refresh failed" in e.get("log_format", "")]

    def scrape(self):
        """The service's metrics page, with this cache."""
        from prometheus_client.exposition import generate_latest

        from mtasts_twisted.metrics import ServiceStats, make_registry

        stats = ServiceStats()
        stats.cache = self.cache
        return generate_latest(make_registry(stats)).decode()

    def test_refresh_failure_alerts(self):
        """
        A failed refresh (here through the refresher: a new id whose policy
        cannot be fetched, then a TXT lookup that fails) is a warning an
        operator can grep and a metric by reason; the policy is kept.
        """
        alerts = self.alerts()
        self.publish(record_id="2")
        self.fetcher.policies["example.com"] = PolicyFetchError("https://x", "HTTP 500")
        self.clock.advance(12 * 3600)
        self.refresher.startService()
        self.addCleanup(self.refresher.stopService)
        self.clock.advance(3 * 3600)  # the refresh, spread within 3 h, has run
        self.assertEqual(self.fetcher.fetches["example.com"], 2)
        [(text, event)] = alerts()
        self.assertTrue(text.startswith("policy refresh failed for example.com (cannot-fetch-policy): "
                                        "cannot fetch policy id 2: "), text)
        self.assertIn("HTTP 500", text)
        self.assertIn("the cached enforce policy (id 1) stays in use until 2023-11-1", text)
        self.assertEqual((event["domain"], event["reason"]), ("example.com", "cannot-fetch-policy"))
        self.assertEqual(dict(self.cache.refresh_failures), {"cannot-fetch-policy": 1})
        self.assertEqual(self.entry().policy.mode, Mode.ENFORCE)
        self.resolver.txt[TXT] = DNSTemporaryError("SERVFAIL", name=TXT, rdtype="TXT")
        self.successResultOf(self.cache.refresh("example.com"))
        self.assertEqual(dict(self.cache.refresh_failures), {"cannot-fetch-policy": 1, "dns-lookup": 1})
        self.assertEqual(len(alerts()), 2)
        page = self.scrape()
        self.assertIn('mtasts_policy_refresh_failures_total{reason="cannot-fetch-policy"} 1.0', page)
        self.assertIn('mtasts_policy_refresh_failures_total{reason="dns-lookup"} 1.0', page)

    def test_txt_gone_alerts(self):
        """An enforce policy whose TXT record is gone is kept, and the operator is told."""
        alerts = self.alerts()
        del self.resolver.txt[TXT]
        self.successResultOf(self.cache.refresh("example.com"))
        [(text, _)] = alerts()
        self.assertTrue(text.startswith("policy refresh failed for example.com (no-record): "), text)
        self.assertEqual(dict(self.cache.refresh_failures), {"no-record": 1})

    def test_store_failure_alerts(self):
        """A refresh that fails unexpectedly (the store) is counted as internal-error and logged."""
        alerts = self.alerts()
        self.clock.advance(12 * 3600)
        self.patch(self.cache, "_save", lambda entry: Deferred.fromCoroutine(_raise(OSError("disk gone"))))
        self.refresher.startService()
        self.addCleanup(self.refresher.stopService)
        self.clock.advance(3 * 3600)
        [(text, _)] = alerts()
        self.assertTrue(text.startswith("policy refresh failed for example.com (internal-error)"), text)
        self.assertEqual(dict(self.cache.refresh_failures), {"internal-error": 1})
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_none_policy_no_alert(self):
        """A policy in mode none protects nothing: its failed refresh is no alert."""
        alerts = self.alerts()
        self.publish(domain="n.example", text=NONE)
        self.get("n.example")
        self.resolver.txt["_mta-sts.n.example"] = DNSTemporaryError("SERVFAIL", name=TXT, rdtype="TXT")
        self.successResultOf(self.cache.refresh("n.example"))
        self.assertEqual((alerts(), dict(self.cache.refresh_failures)), ([], {}))

    def test_none_with_txt_gone_deleted(self):
        self.publish(domain="n.example", text=NONE)
        self.get("n.example")
        del self.resolver.txt["_mta-sts.n.example"]
        self.assertIsNone(self.successResultOf(self.cache.refresh("n.example")))
        self.assertIsNone(self.successResultOf(self.store.shelf("policies").get("n.example")))

    def test_enforce_with_txt_gone_kept(self):
        del self.resolver.txt[TXT]
        self.successResultOf(self.cache.refresh("example.com"))
        self.assertEqual(self.entry().policy.mode, Mode.ENFORCE)

    def test_unused_deleted(self):
        self.clock.advance(181 * 86400)
        summary = self.successResultOf(self.refresher.run())
        self.assertEqual(summary["deleted"], 1)
        self.assertIsNone(self.entry())

    def test_stop_cancels(self):
        self.clock.advance(12 * 3600)
        self.refresher.startService()
        self.assertTrue(self.clock.getDelayedCalls())
        self.refresher.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


async def _raise(error):
    raise error


class ConfirmedAnswerTests(CacheTestCase):
    """A confirmed answer is reused while the TXT answer's TTL holds."""

    def setUp(self):
        super().setUp()
        self.resolver.ttl = 60
        self.publish()

    def test_reused_within_ttl(self):
        first = self.get()
        self.clock.advance(59)
        self.assertIs(self.get(), first)
        self.assertEqual(self.resolver.queries[("TXT", TXT)], 1)
        self.clock.advance(1)
        self.assertEqual(self.get().policy.mode, Mode.ENFORCE)
        self.assertEqual(self.resolver.queries[("TXT", TXT)], 2)

    def test_not_past_valid_end(self):
        self.resolver.ttl = 10 * 86400
        self.get()
        self.clock.advance(86400)
        lookup = self.get()
        self.assertEqual(self.resolver.queries[("TXT", TXT)], 2)
        self.assertEqual(lookup.policy.mode, Mode.ENFORCE)

    def test_fallback_not_reused(self):
        """Downgrade-resistance answers are not memoised: DNS is asked again."""
        self.get()
        self.clock.advance(60)
        del self.resolver.txt[TXT]
        self.assertFalse(self.get().fresh)
        self.assertFalse(self.get().fresh)
        self.assertEqual(self.resolver.queries[("TXT", TXT)], 3)

    def test_new_policy_forgets(self):
        self.get()
        self.successResultOf(self.cache.delete("example.com"))
        self.get()
        self.assertEqual(self.fetcher.fetches["example.com"], 2)

    def test_last_use_still_batched(self):
        self.get()
        self.clock.advance(30)
        self.get()
        self.successResultOf(self.cache.flush())
        row = self.successResultOf(self.store.shelf("policies").get("example.com"))
        self.assertEqual(row["last_use"], self.clock.seconds())


class PeekTests(CacheTestCase):
    """C{peek}: what C{get} would answer from the cache alone, asking no one and counting nothing."""

    def asked(self):
        return (sum(self.resolver.queries.values()), sum(self.fetcher.fetches.values()), dict(self.cache.stats))

    def peek(self, domain="example.com"):
        before = self.asked()
        lookup = self.successResultOf(Deferred.fromCoroutine(self.cache.peek(domain)))
        self.assertEqual(self.asked(), before)
        return lookup

    def test_not_cached(self):
        self.publish()
        self.assertIsNone(self.peek())
        self.assertEqual(self.resolver.queries[("TXT", TXT)], 0)

    def test_confirmed_then_cached(self):
        """Within the TXT TTL the confirmed answer itself; after it the cached policy, not confirmed now."""
        self.resolver.ttl = 60
        self.publish()
        first = self.get()
        self.assertIs(self.peek(), first)
        self.clock.advance(60)
        lookup = self.peek()
        self.assertEqual((lookup.policy, lookup.fresh, lookup.record_id, lookup.result),
                         (first.policy, False, "1", first.result))
        self.assertEqual(self.get().fresh, True)  # get asks DNS again, as before

    def test_ended_and_backoff(self):
        """An ended policy peeks as not cached; a backoff as get answers it, until it ends."""
        self.publish()
        self.get()
        self.clock.advance(86400)
        self.assertIsNone(self.peek())
        self.fetcher.policies["example.com"] = PolicyFetchError("https://x", "500")
        self.successResultOf(self.cache.delete("example.com"))
        self.get()
        lookup = self.peek()
        self.assertEqual((lookup.policy, lookup.fresh), (None, False))
        self.assertEqual(self.failure(lookup), self.failure(self.get()))
        self.clock.advance(301)
        self.assertIsNone(self.peek())

    def test_idn_and_bad_domain(self):
        self.publish(domain="xn--bcher-kva.example")
        self.get("bücher.example")
        self.assertEqual(self.peek("xn--bcher-kva.example").policy.mode, Mode.ENFORCE)
        self.failureResultOf(Deferred.fromCoroutine(self.cache.peek("not a domain")), DomainError)


class ReportingTests(SynchronousTestCase):
    """The TLSRPT helpers of mtasts_twisted.cache.reporting."""

    def test_fallback(self):
        """_fallback marks a failure as answered by the cached policy."""
        from mtasts_twisted.cache import FALLBACK
        from mtasts_twisted.cache.reporting import _fallback
        from mtasts_twisted.results import FailureDetails

        detail = FailureDetails(ResultType.STS_POLICY_FETCH_ERROR, failure_reason_code="dns-lookup",
                                additional_information="https://r.example/x")
        marked = _fallback(detail)
        self.assertEqual(marked.failure_reason_code, "dns-lookup" + FALLBACK)
        self.assertEqual(marked.additional_information, "https://r.example/x")
        self.assertEqual(_fallback(FailureDetails(ResultType.STS_POLICY_FETCH_ERROR)).failure_reason_code,
                         FALLBACK)


class FakeTests(SynchronousTestCase):
    """The shipped fakes these tests use provide the interfaces they stand in for."""

    def test_fake_resolver(self):
        from zope.interface.verify import verifyObject

        from mtasts_twisted.interfaces import IDNSResolver

        self.assertTrue(verifyObject(IDNSResolver, FakeResolver()))
