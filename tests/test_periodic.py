"""
Every periodic task of the service survives its own errors (log, back
off, go on): L{mtasts_twisted.periodic.Periodic} itself, and each loop
that uses it — the relay's queue poll, the policy refresher, the cache's
C{last_use} flush, the TLSRPT aggregator's flush and the report
scheduler's timer — on a L{Clock}.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.cache import PolicyCache, PolicyRefresher, RefresherSettings
from mtasts_twisted.cache.settings import CacheSettings
from mtasts_twisted.delivery import Status
from mtasts_twisted.periodic import Periodic
from mtasts_twisted.relay import RelayService
from mtasts_twisted.relay import queue as queue_module
from mtasts_twisted.results import PolicyDescriptor, PolicyType, Result
from mtasts_twisted.testing.memory import FakeFetcher, FakeResolver, MemoryStore
from mtasts_twisted.tlsrpt import aggregate
from mtasts_twisted.tlsrpt.aggregate import ResultAggregator
from mtasts_twisted.tlsrpt.schedule import ReportScheduler, SchedulerSettings
from tests.test_relay import MESSAGE, FakeDeliverer, settings
from tests.test_tlsrpt_report import SETTINGS

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"


class Flaky:
    """A task that fails its first C{failures} calls (raising, or a failed Deferred)."""

    def __init__(self, failures: int, deferred: bool = False) -> None:
        self.left = failures
        self.deferred = deferred
        self.calls = 0

    def __call__(self) -> Deferred[None] | None:
        self.calls += 1
        if self.left:
            self.left -= 1
            if self.deferred:
                return fail(OSError(errno.EMFILE, "Too many open files"))
            raise OSError(errno.EMFILE, "Too many open files")
        return succeed(None) if self.deferred else None


class PeriodicTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_runs_every_interval(self) -> None:
        task = Flaky(0)
        p = Periodic("test", task, 10, self.clock)
        p.start()
        self.assertEqual(task.calls, 1)
        self.clock.advance(9)
        self.assertEqual(task.calls, 1)
        self.clock.advance(1)
        self.assertEqual(task.calls, 2)
        p.stop()
        self.clock.advance(100)
        self.assertEqual((task.calls, self.clock.getDelayedCalls()), (2, []))

    def test_start_later(self) -> None:
        task = Flaky(0)
        p = Periodic("test", task, 10, self.clock)
        p.start(now=False)
        self.assertEqual(task.calls, 0)
        self.clock.advance(10)
        self.assertEqual(task.calls, 1)
        p.stop()

    def test_survives_and_backs_off(self) -> None:
        """Failures (raised or failed Deferreds) are logged; the waits double up to the cap."""
        for deferred in (False, True):
            task = Flaky(5, deferred)
            p = Periodic("test", task, 10, self.clock, max_backoff=35)
            p.start()
            times = [self.clock.seconds()]
            while task.calls < 7:
                before = task.calls
                self.clock.advance(1)
                if task.calls > before:
                    times.append(self.clock.seconds())
            gaps = [b - a for a, b in zip(times, times[1:])]
            # calls 1-5 fail: waits 10, 20, 35 (capped), 35, 35; then 10 again
            self.assertEqual(gaps, [10, 20, 35, 35, 35, 10])
            self.assertEqual((p.failures, p.total_failures, p.running), (0, 5, True))
            self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)  # one traceback per streak
            p.stop()

    def test_waits_for_a_call_under_way(self) -> None:
        """A slow call is not overlapped; the next one is due an interval after it began."""
        pending: list[Deferred[None]] = []

        def slow() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            pending.append(d)
            return d

        p = Periodic("test", slow, 10, self.clock)
        p.start()
        self.clock.advance(25)
        self.assertEqual(len(pending), 1)
        pending[0].callback(None)
        self.clock.advance(0)  # overdue: at once
        self.assertEqual(len(pending), 2)
        p.stop()
        pending[1].callback(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_interval(self) -> None:
        self.assertRaises(ValueError, Periodic, "test", Flaky(0), 0, self.clock)
        self.assertRaises(ValueError, Periodic, "test", Flaky(0), float("nan"), self.clock)


class RelayPollTests(SynchronousTestCase):
    """The relay's periodic queue poll goes on after an C{OSError} (issue 17.1)."""

    def test_listing_fails_once(self) -> None:
        directory = tempfile.mkdtemp(prefix="mtasts-relay-")
        self.addCleanup(shutil.rmtree, directory, True)
        clock = Clock()
        clock.advance(1_700_000_000)
        s = settings(poll_interval=5, retry_base=3600)
        queue = s.make_queue(directory, clock=clock)
        deliverer = FakeDeliverer()
        service = RelayService(queue, deliverer, s, clock)
        self.addCleanup(service.stopService)
        m = queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        service.startService()
        deliverer.fire(0, Status.TRANSIENT, 421, "4.7.0 later")
        real = os.listdir
        broken = [True]

        def listdir(path: str) -> list[str]:
            if broken[0] and path == queue.directory:
                raise OSError(errno.EMFILE, "Too many open files")
            return real(path)

        self.patch(queue_module.os, "listdir", listdir)
        clock.advance(5)  # the poll fails: file descriptors exhausted
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        broken[0] = False
        # `mtasts-twisted queue retry` from another process
        from mtasts_twisted.cli.queue import queue_retry
        from mtasts_twisted.relay import Queue

        queue_retry(Queue(directory, clock=clock), m.id)
        for _ in range(12):  # at most a minute of polls
            clock.advance(5)
        self.assertEqual(len(deliverer.calls), 2)

    def test_wake_error_logged(self) -> None:
        """A failing wake-up (no poll) is logged, and the next one works."""
        directory = tempfile.mkdtemp(prefix="mtasts-relay-")
        self.addCleanup(shutil.rmtree, directory, True)
        clock = Clock()
        s = settings(poll_interval=1000)
        queue = s.make_queue(directory, clock=clock)
        deliverer = FakeDeliverer()
        service = RelayService(queue, deliverer, s, clock)
        self.addCleanup(service.stopService)
        service.startService()
        real = service._update_stats
        calls = [0]

        def update(now: float) -> None:
            calls[0] += 1
            if calls[0] == 1:
                raise OSError(errno.EMFILE, "Too many open files")
            real(now)

        self.patch(service, "_update_stats", update)
        queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        queue.enqueue("a@example.org", ["c@example.com"], MESSAGE)
        clock.advance(0)
        self.assertEqual(len(deliverer.calls), 2)


class CacheLoopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        self.resolver = FakeResolver(ttl=0)
        self.fetcher = FakeFetcher()
        self.cache = PolicyCache(self.store, self.resolver, self.fetcher, self.clock,
                                 CacheSettings(flush_interval=60))
        self.resolver.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
        self.fetcher.policies["example.com"] = ENFORCE
        self.successResultOf(self.cache.get("example.com"))

    def test_refresher_survives_store_failure(self) -> None:
        """One run that cannot read the store does not end the refresher."""
        refresher = PolicyRefresher(self.cache, self.clock, RefresherSettings(interval=3600),
                                    rng=random.Random(1))
        real = self.cache.entry_pages
        broken = [True]

        def entry_pages(size: int = 500) -> Any:
            if broken[0]:
                raise OSError(errno.EMFILE, "unable to open database file")
            return real(size)

        self.patch(self.cache, "entry_pages", entry_pages)
        refresher.startService()
        self.addCleanup(refresher.stopService)
        self.assertEqual(refresher.runs, [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        broken[0] = False
        self.clock.advance(3600)
        self.assertEqual(len(refresher.runs), 1)

    def test_last_use_flusher_survives(self) -> None:
        """A flush whose store write raises does not end the C{last_use} flusher."""
        shelf = self.cache._shelf
        real = shelf.update
        broken = [True]
        writes: list[str] = []

        def update(key: str, function: Any) -> Any:
            if broken[0]:
                raise OSError(errno.EMFILE, "unable to open database file")
            writes.append(key)
            return real(key, function)

        self.patch(shelf, "update", update)
        self.cache.start()
        self.addCleanup(self.cache.stop)
        self.successResultOf(self.cache.get("example.com"))
        self.clock.advance(60)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        broken[0] = False
        self.successResultOf(self.cache.get("example.com"))
        self.clock.advance(60)
        self.clock.advance(60)
        self.assertEqual(writes, ["example.com"])


POLICY = PolicyDescriptor(PolicyType.NO_POLICY_FOUND, "example.net")


class TLSRPTLoopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_714_521_600 + 3600)
        self.store = MemoryStore()

    def test_aggregator_survives(self) -> None:
        """A flush that raises does not end the aggregator's timer."""
        aggregator = ResultAggregator(self.store, self.clock, aggregate.AggregatorSettings(interval=60))
        real = aggregate.merge_results
        broken = [True]

        def merge(results: Any) -> Any:
            if broken[0]:
                broken[0] = False
                raise MemoryError("no memory for a moment")
            return real(results)

        self.patch(aggregate, "merge_results", merge)
        aggregator.startService()
        self.addCleanup(aggregator.stopService)
        aggregator.record(Result(POLICY, success_count=1))
        self.clock.advance(60)
        self.assertEqual(len(self.flushLoggedErrors(MemoryError)), 1)
        aggregator.record(Result(POLICY, success_count=2))
        for _ in range(4):
            self.clock.advance(60)
        stored = self.successResultOf(aggregator.shelf.items())
        self.assertEqual(len(stored), 1)

    def test_scheduler_survives(self) -> None:
        """A report run that fails is logged and tried again later."""
        scheduler = ReportScheduler(self.store, SETTINGS, FakeResolver(), self.clock,
                                    schedule=SchedulerSettings(max_sleep=600), rng=random.Random(1))
        shelf = scheduler._results
        real = shelf.items
        calls = [0]

        def items(after: Any = None, limit: Any = None) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise OSError(errno.EMFILE, "unable to open database file")
            return real(after, limit)

        self.patch(shelf, "items", items)
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.clock.advance(600)
        self.clock.advance(600)
        self.assertEqual(calls[0], 3)
