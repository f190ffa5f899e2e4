"""
Tests for L{mtasts_twisted.tlsrpt.aggregate}: merging results, batching
writes to the store, flushing on a timer and on stop, and merging into what
another node stored (memory store, and a real SQLite store).
"""

from __future__ import annotations

import calendar
import os
from collections import Counter
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtasts_twisted.interfaces import IResultSink, IShelf, IStore
from mtasts_twisted.results import (
    FailureDetails,
    PolicyDescriptor,
    PolicyType,
    Result,
    ResultType,
)
from mtasts_twisted.store import open_store
from mtasts_twisted.testing.memory import MemoryStore
from mtasts_twisted.tlsrpt.aggregate import (
    DEFAULT_FLUSH_INTERVAL,
    NULL_SINK,
    RESULTS_TABLE,
    AggregatorSettings,
    ResultAggregator,
    decode_results,
    encode_results,
    merge_results,
    results_key,
    split_key,
)

DAY1 = calendar.timegm((2024, 5, 1, 0, 0, 0))
DAY2 = DAY1 + 86400

STS = PolicyDescriptor(PolicyType.STS, "example.net", ["version: STSv1", "mode: enforce",
                       "mx: mx.example.net", "max_age: 86400"], ["mx.example.net"])
STS_OTHER = PolicyDescriptor(PolicyType.STS, "example.net", ["version: STSv1", "mode: testing",
                             "mx: mx.example.net", "max_age: 86400"], ["mx.example.net"])
OTHER_DOMAIN = PolicyDescriptor(PolicyType.NO_POLICY_FOUND, "other.example")
EXPIRED = FailureDetails(ResultType.CERTIFICATE_EXPIRED, receiving_mx_hostname="mx.example.net",
                         receiving_ip="198.51.100.1")
EXPIRED_OTHER_IP = FailureDetails(ResultType.CERTIFICATE_EXPIRED,
                                  receiving_mx_hostname="mx.example.net", receiving_ip="198.51.100.2")


def ok(policy=STS, n=1):
    return Result(policy, success_count=n)


def failed(detail=EXPIRED, policy=STS):
    return Result(policy, failures=[detail])


class MergeTests(SynchronousTestCase):
    def test_identical_policies_add_counts(self):
        """Equal policies become one element whose success count is the sum."""
        [merged] = merge_results([ok(n=2), ok(n=3), ok(n=0)])
        self.assertEqual((merged.policy, merged.success_count), (STS, 5))

    def test_different_policies_separate(self):
        """Policies that differ in any field stay apart, first seen first."""
        merged = merge_results([ok(STS), ok(STS_OTHER), ok(STS), ok(OTHER_DOMAIN)])
        self.assertEqual([m.policy for m in merged], [STS, STS_OTHER, OTHER_DOMAIN])
        self.assertEqual([m.success_count for m in merged], [2, 1, 1])

    def test_identical_failures_add_session_counts(self):
        """Failure details equal but for the count add failed-session-count."""
        [merged] = merge_results([failed(), failed(), ok(), failed(EXPIRED_OTHER_IP),
                                  Result(STS, failures=[FailureDetails(
                                      ResultType.CERTIFICATE_EXPIRED,
                                      receiving_mx_hostname="mx.example.net",
                                      receiving_ip="198.51.100.1", failed_session_count=4)])])
        self.assertEqual(merged.success_count, 1)
        self.assertEqual(
            [(f.receiving_ip, f.failed_session_count) for f in merged.failures],
            [("198.51.100.1", 6), ("198.51.100.2", 1)],
        )
        self.assertEqual(merged.failure_count, 7)

    def test_failed_sessions_apart_from_details(self):
        """
        A lookup problem that did not fail a session (failure_count 0) adds
        its detail but no failed session; sessions add theirs: the totals
        count sessions once, the details may overlap (RFC 8460 §4).
        """
        fetch = FailureDetails(ResultType.STS_POLICY_FETCH_ERROR,
                               failure_reason_code="no-policy-served+fallback-to-cached-policy")
        lookup = Result(STS, failures=[fetch], failure_count=0)
        [merged] = merge_results([lookup, ok(), lookup, failed()])
        self.assertEqual((merged.success_count, merged.failure_count), (1, 1))
        self.assertEqual([f.failed_session_count for f in merged.failures], [2, 1])
        [stored] = decode_results(encode_results([merged]))
        self.assertEqual(stored, merged)
        self.assertEqual(stored.to_json()["summary"],
                         {"total-successful-session-count": 1, "total-failure-session-count": 1})

    def test_additional_information_is_a_uri(self):
        """
        RFC 8460 §4.4: additional-information is a URI; free text is
        refused when made, and dropped when read from the store (written by
        an older version), so equal failures merge.
        """
        self.assertRaises(ValueError, FailureDetails, ResultType.STS_POLICY_FETCH_ERROR,
                          additional_information="HTTP 404 from mta-sts.example.net")
        uri = FailureDetails(ResultType.CERTIFICATE_EXPIRED, additional_information="https://r.example/1")
        self.assertEqual(uri.additional_information, "https://r.example/1")
        old = [{"result-type": "sts-policy-fetch-error", "failed-session-count": n,
                "failure-reason-code": "no-policy-served", "additional-information": text}
               for n, text in ((1, "HTTP 404 at 10:00"), (2, "HTTP 404 at 11:00"))]
        stored = {"policies": [{"policy": STS.to_json(), "summary": {
            "total-successful-session-count": 0, "total-failure-session-count": 3},
            "failure-details": old}]}
        [merged] = merge_results(decode_results(stored))
        self.assertEqual([(f.failed_session_count, f.additional_information) for f in merged.failures],
                         [(3, None)])

    def test_keys(self):
        """Keys round-trip."""
        self.assertEqual(split_key(results_key("2024-05-01", "example.net")), ("2024-05-01", "example.net"))
        self.assertRaises(ValueError, split_key, "nobar")


class AggregatorSettingsTests(SynchronousTestCase):
    def test_defaults(self):
        settings = AggregatorSettings()
        self.assertEqual((settings.interval, settings.exclude_domains, settings.table),
                         (DEFAULT_FLUSH_INTERVAL, frozenset(), RESULTS_TABLE))

    def test_excluded_domains_normalised(self):
        """Excluded domains are kept lower-case without the trailing dot."""
        settings = AggregatorSettings(exclude_domains=["Example.NET.", "b.example"])
        self.assertEqual(settings.exclude_domains, frozenset({"example.net", "b.example"}))


@implementer(IShelf)
class CountingShelf:
    """Wraps a shelf and counts C{update} calls per key; can fail them."""

    def __init__(self, shelf: Any) -> None:
        self._shelf = shelf
        self.name = shelf.name
        self.updates: Counter = Counter()
        self.fail_next = 0

    def get(self, key):
        return self._shelf.get(key)

    def put(self, key, value):
        raise AssertionError("the aggregator must merge with update, not put")

    def delete(self, key):
        return self._shelf.delete(key)

    def items(self, after=None, limit=None):
        return self._shelf.items(after, limit)

    def update(self, key, function):
        self.updates[key] += 1
        if self.fail_next:
            self.fail_next -= 1
            return fail(OSError("database went away"))
        return self._shelf.update(key, function)


@implementer(IStore)
class CountingStore:
    url = "memory:counting"

    def __init__(self) -> None:
        self.memory = MemoryStore()
        self.shelves: dict[str, CountingShelf] = {}

    def shelf(self, name):
        if name not in self.shelves:
            self.shelves[name] = CountingShelf(self.memory.shelf(name))
        return self.shelves[name]

    def close(self):
        return self.memory.close()


class AggregatorTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(DAY1 + 3600)
        self.store = CountingStore()
        self.shelf = self.store.shelf(RESULTS_TABLE)
        self.aggregator = ResultAggregator(self.store, self.clock, AggregatorSettings(interval=60))

    def stored(self, key):
        return decode_results(self.successResultOf(self.shelf.get(key)))

    def test_interface(self):
        """It is an IResultSink, as is NULL_SINK."""
        verifyObject(IResultSink, self.aggregator)
        verifyObject(IResultSink, NULL_SINK)
        self.assertIsNone(NULL_SINK.record(ok()))
        verifyObject(IShelf, self.shelf)

    def test_batching(self):
        """Many results of one key cost one write per flush."""
        for _ in range(500):
            self.aggregator.record(ok())
        for _ in range(300):
            self.aggregator.record(failed())
        self.assertEqual(self.shelf.updates, Counter())
        self.successResultOf(self.aggregator.flush())
        key = results_key("2024-05-01", "example.net")
        self.assertEqual(self.shelf.updates, Counter({key: 1}))
        [stored] = self.stored(key)
        self.assertEqual((stored.success_count, stored.failure_count), (500, 300))
        self.successResultOf(self.aggregator.flush())
        self.assertEqual(self.shelf.updates, Counter({key: 1}), "an empty flush writes nothing")

    def test_days_and_domains_separate(self):
        """Results of different UTC days or policy domains go to different keys."""
        self.aggregator.record(ok(n=2))
        self.aggregator.record(ok(n=3), when=DAY2 + 5)
        self.aggregator.record(ok(OTHER_DOMAIN, n=7), when=DAY1 + 86399)
        self.successResultOf(self.aggregator.flush())
        self.assertEqual(
            {k: [r.success_count for r in self.stored(k)] for k in self.shelf.updates},
            {
                "2024-05-01|example.net": [2],
                "2024-05-02|example.net": [3],
                "2024-05-01|other.example": [7],
            },
        )

    def test_flush_merges_into_stored(self):
        """A flush adds to what is stored (e.g. by another node), atomically."""
        other = ResultAggregator(self.store, self.clock)
        other.record(failed())
        other.record(ok(STS_OTHER))
        self.successResultOf(other.flush())
        self.aggregator.record(failed())
        self.aggregator.record(ok())
        self.successResultOf(self.aggregator.flush())
        merged = self.stored(results_key("2024-05-01", "example.net"))
        self.assertEqual([(r.policy, r.success_count, r.failure_count) for r in merged],
                         [(STS, 1, 2), (STS_OTHER, 1, 0)])
        self.assertEqual(merged[0].failures[0].failed_session_count, 2)

    def test_timer_flushes(self):
        """Started, it flushes every interval; stopping flushes the rest."""
        self.aggregator.startService()
        self.aggregator.record(ok())
        self.clock.advance(59)
        self.assertEqual(sum(self.shelf.updates.values()), 0)
        self.clock.advance(1)
        self.assertEqual(sum(self.shelf.updates.values()), 1)
        self.aggregator.record(ok(n=4))
        self.successResultOf(self.aggregator.stopService())
        self.assertEqual(sum(self.shelf.updates.values()), 2)
        [stored] = self.stored("2024-05-01|example.net")
        self.assertEqual(stored.success_count, 5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failed_write_kept(self):
        """A failed update keeps the batch for the next flush; nothing lost."""
        self.aggregator.record(ok(n=2))
        self.shelf.fail_next = 1
        self.successResultOf(self.aggregator.flush())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.aggregator.pending_keys, ["2024-05-01|example.net"])
        self.aggregator.record(ok(n=1))
        self.successResultOf(self.aggregator.flush())
        [stored] = self.stored("2024-05-01|example.net")
        self.assertEqual(stored.success_count, 3)
        self.assertEqual(self.aggregator.pending_keys, [])

    def test_excluded_domains(self):
        """RFC 8460 §3: results of excluded domains (report recipients) are dropped."""
        aggregator = ResultAggregator(self.store, self.clock, AggregatorSettings(exclude_domains=["Example.NET."]))
        aggregator.record(ok())
        aggregator.record(ok(OTHER_DOMAIN))
        self.assertEqual(aggregator.pending_keys, ["2024-05-01|other.example"])

    def test_record_never_fails(self):
        """A result that cannot be recorded is logged, not raised."""
        self.aggregator.record(object())  # type: ignore[arg-type]
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.assertEqual(self.aggregator.pending_keys, [])

    def test_memory_bounded(self):
        """A busy key is merged as it grows instead of keeping every result."""
        for _ in range(1000):
            self.aggregator.record(ok())
        self.assertLess(len(self.aggregator._pending["2024-05-01|example.net"]), 64)


class SQLiteAggregatorTests(TestCase):
    """Two aggregators ("nodes") flushing into one real SQLite store."""

    def setUp(self):
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        d = open_store(f"sqlite:{path}/db.sqlite", reactor, tables=(RESULTS_TABLE,))

        def opened(store):
            self.store = store
            self.addCleanup(store.close)

        return d.addCallback(opened)

    async def _both(self):
        clock = Clock()
        clock.advance(DAY1 + 10)
        a = ResultAggregator(self.store, clock)
        b = ResultAggregator(self.store, clock)
        for _ in range(20):
            a.record(failed())
            b.record(failed())
            b.record(ok())
        await a.flush()
        await b.flush()
        a.record(ok(n=5))
        await a.flush()
        return decode_results(await self.store.shelf(RESULTS_TABLE).get("2024-05-01|example.net"))

    def test_two_nodes_merge(self):
        """Counts from two writers add up in the database."""
        d = Deferred.fromCoroutine(self._both())

        def check(stored):
            [result] = stored
            self.assertEqual((result.success_count, result.failure_count), (25, 40))

        return d.addCallback(check)
