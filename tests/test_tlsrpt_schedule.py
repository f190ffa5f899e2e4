"""
Tests for L{mtasts_twisted.tlsrpt.schedule}: the daily run driven by a
L{Clock} over a memory store (release time, DNS outcomes, https and mailto
delivery, retries and giving up, restarts, claims by two schedulers, the
CLI helpers), and exactly-once sending by two schedulers sharing a real
PostgreSQL database and posting to a loopback HTTPS receiver.
"""

from __future__ import annotations

import calendar
import email
import email.policy
import gzip
import json
import random

import dkim
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtasts_twisted.dns import DNSTemporaryError
from mtasts_twisted.results import (
    FailureDetails,
    PolicyDescriptor,
    PolicyType,
    Result,
    ResultType,
)
from mtasts_twisted.store import open_store
from mtasts_twisted.testing import postgres
from mtasts_twisted.testing.memory import FakeResolver, MemoryStore
from mtasts_twisted.testing.pki import PKI
from mtasts_twisted.tlsrpt.aggregate import RESULTS_TABLE, ResultAggregator
from mtasts_twisted.tlsrpt.https import HTTPSReportSender, ReportDeliveryError
from mtasts_twisted.tlsrpt.report import Report, ReportSettings
from mtasts_twisted.tlsrpt.schedule import (
    SENDS_TABLE,
    TABLES,
    NoResultsError,
    ReportScheduler,
    SchedulerSettings,
    SendState,
)
from mtasts_twisted.tlsrpt.pending import pending_reports, preview_report
from mtasts_twisted.tlsrpt.rua import RuaSender
from mtasts_twisted.testing.tlsrpt import RecordingMailer, ReportReceiver
from tests.test_tlsrpt_mail import _KEY, _RECORD, dns_for
from tests.test_tlsrpt_report import SETTINGS, assert_independent_parse, validate_report

DAY1 = calendar.timegm((2024, 5, 1, 0, 0, 0))
DAY2 = DAY1 + 86400
HOUR = 3600.0

POLICY = PolicyDescriptor(PolicyType.STS, "example.net", ["version: STSv1", "mode: enforce",
                          "mx: mx.example.net", "max_age: 86400"], ["mx.example.net"])
FAILURE = FailureDetails(ResultType.CERTIFICATE_EXPIRED, sending_mta_ip="192.0.2.25",
                         receiving_mx_hostname="mx.example.net", receiving_ip="198.51.100.1",
                         failure_reason_code="certificate-expired")
RUA_HTTPS = "https://reports.example.net/v1/tlsrpt"
TXT = "_smtp._tls.example.net"


class FakePoster:
    """A fake L{HTTPSReportSender}: scripted outcomes, records posts."""

    def __init__(self, outcomes=()):
        self.outcomes = list(outcomes)
        self.posts: list[tuple[float, str, Report]] = []
        self.clock = None

    def send(self, uri, report):
        self.posts.append((self.clock.seconds() if self.clock else 0, uri, report))
        outcome = self.outcomes.pop(0) if self.outcomes else 200
        if isinstance(outcome, Deferred):
            return outcome
        if isinstance(outcome, int) and not 200 <= outcome < 300:
            return fail(ReportDeliveryError(uri, f"HTTP {outcome}", "http-status"))
        if isinstance(outcome, Exception):
            return fail(outcome)
        return succeed(outcome)


class SchedulerTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(DAY1 + HOUR)
        self.store = MemoryStore()
        self.resolver = FakeResolver()
        self.resolver.txt[TXT] = [f"v=TLSRPTv1; rua={RUA_HTTPS}", "v=spf1 -all"]
        self.poster = FakePoster()
        self.poster.clock = self.clock
        self.mailer = RecordingMailer()
        self.aggregator = ResultAggregator(self.store, self.clock)

    def scheduler(self, settings=SETTINGS, seed=1, **schedule):
        s = ReportScheduler(self.store, settings, self.resolver, self.clock,
                            schedule=SchedulerSettings(**schedule), https_sender=self.poster,
                            send_mail=self.mailer, rng=random.Random(seed))
        self.addCleanup(lambda: self.successResultOf(s.stopService()) if s.running else None)
        return s

    def record_day1(self, successes=3, failures=2, domain_policy=POLICY, day=DAY1, then=DAY2 + 60):
        """Store results of the day starting at C{day}; move the clock to C{then}."""
        for _ in range(successes):
            self.aggregator.record(Result(domain_policy, success_count=1), when=day + 600)
        for _ in range(failures):
            self.aggregator.record(Result(domain_policy, failures=[FAILURE]), when=day + 700)
        self.successResultOf(self.aggregator.flush())
        if then is not None and then > self.clock.seconds():
            self.advance_to(then)

    def sends(self):
        return dict(self.successResultOf(self.store.shelf(SENDS_TABLE).items()))

    def results(self):
        return dict(self.successResultOf(self.store.shelf(RESULTS_TABLE).items()))

    def state(self, key="2024-05-01|example.net"):
        return self.sends()[key]["state"]

    def advance_to(self, when):
        self.clock.advance(when - self.clock.seconds())


class SchedulerSettingsTests(SynchronousTestCase):
    def test_keep_longer_than_catch_up(self):
        """Finished rows must outlive the catch-up window, or a report could be sent twice."""
        self.assertRaises(ValueError, SchedulerSettings, catch_up_days=3, keep_days=3)
        self.assertEqual(SchedulerSettings(catch_up_days=3, keep_days=4).keep_days, 4)

    def test_node(self):
        """The node name comes from the settings, or is random."""
        store, resolver = MemoryStore(), FakeResolver()
        named = ReportScheduler(store, SETTINGS, resolver, Clock(), schedule=SchedulerSettings(node="n1"))
        self.assertEqual(named.node, "n1")
        self.assertRegex(ReportScheduler(store, SETTINGS, resolver, Clock()).node, "^[0-9a-f]{8}$")


class DailyRunTests(SchedulerTestCase):
    def test_waits_for_release_time(self):
        """RFC 8460 §4.1: reports go out a random delay (< 4 h) after 00:00 UTC."""
        self.record_day1(then=None)
        s = self.scheduler()
        release = s.release_time("2024-05-01")
        self.assertTrue(DAY2 + 300 <= release <= DAY2 + 4 * HOUR, release)
        s.startService()
        self.advance_to(DAY2)
        self.assertEqual(self.poster.posts, [])
        self.advance_to(release - 1)
        self.assertEqual(self.poster.posts, [])
        self.advance_to(release)
        [(when, uri, report)] = self.poster.posts
        self.assertEqual((when, uri), (release, RUA_HTTPS))
        self.assertEqual((report.policy_domain, report.day), ("example.net", "2024-05-01"))
        self.assertEqual((report.success_count, report.failure_count), (3, 2))
        validate_report(report.to_json())
        assert_independent_parse(self, report, report.json_bytes())
        self.assertEqual(self.state(), "sent")
        self.assertEqual(self.results(), {})
        # Nothing more is sent, however long it runs.
        self.advance_to(DAY2 + 3 * 86400)
        self.assertEqual(len(self.poster.posts), 1)

    def test_random_delay_differs_per_day(self):
        """Each day draws its own delay; a fixed delay can be configured."""
        s = self.scheduler()
        delays = {s.release_time(f"2024-05-{d:02d}") % 86400 for d in range(1, 11)}
        self.assertGreater(len(delays), 5)
        fixed = self.scheduler(send_delay=1800)
        self.assertEqual(fixed.release_time("2024-05-01"), DAY2 + 1800)

    def test_today_not_reported(self):
        """Results of the day under way wait for the day to end."""
        self.aggregator.record(Result(POLICY, failures=[FAILURE]))
        self.successResultOf(self.aggregator.flush())
        self.assertEqual(self.successResultOf(self.scheduler().send_now()), [])
        self.assertEqual(self.poster.posts, [])

    def test_no_record_dropped(self):
        """RFC 8460 §3: no TLSRPT record: the report is dropped, not retried."""
        del self.resolver.txt[TXT]
        self.record_day1()
        [outcome] = self.successResultOf(self.scheduler(send_delay=60).send_now())
        self.assertEqual(outcome.state, SendState.DROPPED)
        self.assertEqual(self.state(), "dropped")
        self.assertEqual(self.results(), {})
        self.assertEqual(self.poster.posts, [])

    def test_multiple_records_dropped(self):
        """RFC 8460 §3: not exactly one record: no TLSRPT."""
        self.resolver.txt[TXT] = [f"v=TLSRPTv1; rua={RUA_HTTPS}", "v=TLSRPTv1; rua=mailto:a@b.example"]
        self.record_day1()
        [outcome] = self.successResultOf(self.scheduler().send_now())
        self.assertEqual(outcome.state, SendState.DROPPED)
        self.assertEqual(self.poster.posts, [])

    def test_unsupported_rua_dropped(self):
        """Only https: and mailto: rua are used."""
        self.resolver.txt[TXT] = ["v=TLSRPTv1; rua=ftp://reports.example.net/x"]
        self.record_day1()
        [outcome] = self.successResultOf(self.scheduler().send_now())
        self.assertEqual(outcome.state, SendState.DROPPED)
        self.assertIn("no usable rua", outcome.errors[-1])

    def test_temporary_dns_error_retried(self):
        """A temporary DNS failure is retried later."""
        self.resolver.txt[TXT] = DNSTemporaryError("SERVFAIL", name=TXT, rdtype="TXT")
        self.record_day1()
        s = self.scheduler(send_delay=600)
        s.startService()
        self.advance_to(DAY2 + 600)
        self.assertEqual(self.state(), "retry")
        self.assertEqual(self.poster.posts, [])
        self.resolver.txt[TXT] = [f"v=TLSRPTv1; rua={RUA_HTTPS}"]
        self.clock.advance(300)
        self.assertEqual(self.state(), "sent")
        self.assertEqual(len(self.poster.posts), 1)

    def test_successes_only_skipped(self):
        """Days with only successes are not reported by default."""
        self.record_day1(failures=0)
        [outcome] = self.successResultOf(self.scheduler().send_now())
        self.assertEqual(outcome.state, SendState.SKIPPED)
        self.assertEqual(self.poster.posts, [])
        self.assertEqual(self.results(), {})

    def test_successes_only_reported_when_configured(self):
        """report_successes_only_days=True reports them (the RFC's heartbeat)."""
        self.record_day1(failures=0)
        settings = ReportSettings(SETTINGS.organization, SETTINGS.submitter_domain,
                                  SETTINGS.contact, SETTINGS.from_address,
                                  report_successes_only_days=True)
        [outcome] = self.successResultOf(self.scheduler(settings).send_now())
        self.assertEqual(outcome.state, SendState.SENT)
        [(_, _, report)] = self.poster.posts
        self.assertEqual((report.success_count, report.failure_count), (3, 0))

    def test_disabled(self):
        """The off switch: nothing scheduled, nothing sent."""
        self.record_day1()
        settings = ReportSettings(SETTINGS.organization, SETTINGS.submitter_domain,
                                  SETTINGS.contact, SETTINGS.from_address, enabled=False)
        s = self.scheduler(settings)
        s.startService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.advance_to(DAY2 + 86400)
        self.assertEqual(self.successResultOf(s.send_now()), [])
        self.assertEqual(self.poster.posts, [])
        self.assertEqual(self.sends(), {})

    def test_late_results_not_resent(self):
        """Results flushed after the report was sent do not cause a second one."""
        self.record_day1()
        s = self.scheduler()
        self.successResultOf(s.send_now())
        self.record_day1()
        self.assertEqual(list(self.results()), ["2024-05-01|example.net"])
        self.successResultOf(s.send_now())
        self.assertEqual(len(self.poster.posts), 1)
        self.assertEqual(self.results(), {})

    def test_store_failure_retried(self):
        """A failing store is logged and the run tried again later."""
        self.record_day1(then=None)
        results = self.store.shelf(RESULTS_TABLE)
        real_items = results.items
        results.items = lambda: fail(OSError("database unavailable"))
        s = self.scheduler(send_delay=600, max_sleep=HOUR)
        s.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.clock.advance(HOUR)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1, "tried again an hour later")
        results.items = real_items
        self.advance_to(DAY2 + 600)
        self.assertEqual(len(self.poster.posts), 1)

    def test_bad_domain_dropped(self):
        """Results whose policy domain is no domain are dropped, not retried forever."""
        bad = PolicyDescriptor(PolicyType.NO_POLICY_FOUND, "192.0.2.1")
        self.record_day1(domain_policy=bad)
        self.assertEqual(self.successResultOf(self.scheduler().send_now()), [])
        self.assertEqual((self.results(), self.sends(), self.poster.posts), ({}, {}, []))

    def test_old_rows(self):
        """Unsent results past catch_up_days are dropped; old sends rows removed."""
        self.record_day1(then=DAY1 + 4 * 86400)
        s = self.scheduler(catch_up_days=2, keep_days=3)
        self.successResultOf(s.run_once())
        self.assertEqual((self.results(), self.sends(), self.poster.posts), ({}, {}, []))
        day4 = DAY1 + 3 * 86400
        self.record_day1(day=day4, then=None)
        self.successResultOf(s.send_now())
        self.assertEqual(self.state("2024-05-04|example.net"), "sent")
        self.advance_to(day4 + 3 * 86400)
        self.successResultOf(s.run_once())
        self.assertEqual(self.state("2024-05-04|example.net"), "sent")
        self.advance_to(day4 + 4 * 86400)
        self.successResultOf(s.run_once())
        self.assertEqual(self.sends(), {})


class DeliveryTests(SchedulerTestCase):
    def test_mailto_dkim(self):
        """A mailto: rua gets a DKIM-signed §5.3 message via send_mail."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(_KEY)
        settings = ReportSettings(SETTINGS.organization, SETTINGS.submitter_domain,
                                  SETTINGS.contact, SETTINGS.from_address,
                                  dkim_key_file=path, dkim_selector="sel1")
        self.resolver.txt[TXT] = ["v=TLSRPTv1; rua=mailto:tlsrpt@example.net"]
        self.record_day1()
        [outcome] = self.successResultOf(self.scheduler(settings).send_now())
        self.assertEqual(outcome.state, SendState.SENT)
        self.assertEqual(outcome.delivered_to, ("mailto:tlsrpt@example.net",))
        [mail] = self.mailer.sent
        self.assertEqual((mail.sender, mail.recipient),
                         (SETTINGS.from_address, "tlsrpt@example.net"))
        self.assertTrue(dkim.verify(mail.message, dnsfunc=dns_for(_RECORD), tlsrpt="strict"))
        msg = email.message_from_bytes(mail.message, policy=email.policy.default)
        self.assertEqual(msg["TLS-Report-Domain"], "example.net")
        [_, attachment] = msg.iter_parts()
        report = json.loads(gzip.decompress(attachment.get_content()))
        validate_report(report)
        self.assertEqual(report["policies"][0]["summary"]["total-failure-session-count"], 2)

    def test_every_rua_gets_it_one_acceptance_suffices(self):
        """Every usable rua is tried; one acceptance makes it delivered (§3)."""
        self.resolver.txt[TXT] = [
            f"v=TLSRPTv1; rua={RUA_HTTPS},mailto:tlsrpt@example.net,https://b.example.net/r"
        ]
        self.poster.outcomes = [503, 200]
        self.mailer.failures = 1
        self.record_day1()
        [outcome] = self.successResultOf(self.scheduler().send_now())
        self.assertEqual(outcome.state, SendState.SENT)
        self.assertEqual(outcome.delivered_to, ("https://b.example.net/r",))
        self.assertEqual(len(outcome.errors), 2)
        self.assertEqual([uri for _, uri, _ in self.poster.posts], [RUA_HTTPS, "https://b.example.net/r"])
        self.assertEqual(len(self.mailer.attempts), 1)

    def test_fail_fail_succeed(self):
        """RFC 8460 §5.5: failed deliveries are retried with exponential backoff."""
        self.poster.outcomes = [500, ReportDeliveryError(RUA_HTTPS, "timeout", "timeout"), 200]
        self.record_day1()
        s = self.scheduler(send_delay=600)
        s.startService()
        self.advance_to(DAY2 + 600)
        self.assertEqual(self.state(), "retry")
        self.clock.advance(300)
        self.assertEqual(self.state(), "retry")
        self.assertEqual(len(self.poster.posts), 2)
        self.clock.advance(599)
        self.assertEqual(len(self.poster.posts), 2)
        self.clock.advance(1)
        self.assertEqual(self.state(), "sent")
        times = [when for when, _, _ in self.poster.posts]
        self.assertEqual([b - a for a, b in zip(times, times[1:])], [300, 600])
        # The same report (same id) each time.
        self.assertEqual(len({r.report_id for _, _, r in self.poster.posts}), 1)
        self.assertEqual(self.sends()["2024-05-01|example.net"]["attempts"], 3)
        self.advance_to(DAY2 + 5 * 86400)
        self.assertEqual(len(self.poster.posts), 3)

    def test_give_up_after_24_hours(self):
        """RFC 8460 §5.5: redelivery stops 24 h after the first attempt."""
        self.poster.outcomes = [500] * 100
        self.record_day1()
        s = self.scheduler(send_delay=600)
        s.startService()
        self.advance_to(DAY2 + 600)
        for _ in range(30 * 12):
            self.clock.advance(300)
        self.assertEqual(self.state(), "failed")
        times = [when for when, _, _ in self.poster.posts]
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertEqual(gaps[:7], [300, 600, 1200, 2400, 4800, 9600, 14400])
        self.assertTrue(all(g == 14400 for g in gaps[6:]))
        self.assertLessEqual(times[-1], times[0] + 86400)
        self.assertGreater(times[-1] + 14400, times[0] + 86400)
        row = self.sends()["2024-05-01|example.net"]
        self.assertEqual(row["attempts"], len(times))
        self.assertIn("HTTP 500", row["last_error"])

    def test_restart_continues_retries(self):
        """The retry schedule is in the store: a new scheduler carries on."""
        self.poster.outcomes = [500]
        self.record_day1()
        first = self.scheduler(send_delay=600)
        first.startService()
        self.advance_to(DAY2 + 600)
        self.successResultOf(first.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.state(), "retry")
        second = self.scheduler(seed=2, send_delay=600)
        self.clock.advance(100)
        second.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.poster.posts), 1, "not before the retry is due")
        self.clock.advance(200)
        self.assertEqual(len(self.poster.posts), 2)
        self.assertEqual(self.state(), "sent")
        self.assertEqual(self.sends()["2024-05-01|example.net"]["node"], second.node)

    def test_crashed_claim_taken_over_after_lease(self):
        """A claim whose node died mid-attempt is retried once its lease ends."""
        stuck = Deferred()
        self.poster.outcomes = [stuck]
        self.record_day1()
        first = self.scheduler(lease=HOUR)
        first.send_now()
        self.assertEqual(self.state(), "sending")
        second = self.scheduler(seed=2, lease=HOUR)
        self.assertEqual(self.successResultOf(second.send_now()), [])
        self.assertEqual(len(self.poster.posts), 1)
        self.clock.advance(HOUR)
        [outcome] = self.successResultOf(second.run_once())
        self.assertEqual(outcome.state, SendState.SENT)
        self.assertEqual(len(self.poster.posts), 2)
        # The first node's late outcome does not overwrite the second's.
        stuck.errback(ReportDeliveryError(RUA_HTTPS, "reset", "connection-failed"))
        self.assertEqual(self.state(), "sent")
        self.flushLoggedErrors()


class RuaSenderTests(SchedulerTestCase):
    """Delivering one report to its rua endpoints, apart from claims and timers (tlsrpt.rua)."""

    def test_send(self):
        self.resolver.txt[TXT] = [f"v=TLSRPTv1; rua={RUA_HTTPS},mailto:tlsrpt@example.net,ftp://x.example"]
        report = Report.build(SETTINGS, "example.net", "2024-05-01", "u1", [Result(POLICY, failures=[FAILURE])])
        sender = RuaSender(SETTINGS, self.resolver, self.clock, random.Random(1), self.poster, self.mailer)
        outcome = self.successResultOf(Deferred.fromCoroutine(sender.send(report, 2)))
        self.assertEqual((outcome.state, outcome.delivered, outcome.errors),
                         (SendState.SENT, (RUA_HTTPS, "mailto:tlsrpt@example.net"), ()))
        [mail] = self.mailer.sent
        self.assertIn(b"Message-ID: <u1.2.", mail.message)

    def test_no_record(self):
        del self.resolver.txt[TXT]
        report = Report.build(SETTINGS, "example.net", "2024-05-01", "u1", [Result(POLICY, failures=[FAILURE])])
        sender = RuaSender(SETTINGS, self.resolver, self.clock, random.Random(1), self.poster, self.mailer)
        outcome = self.successResultOf(Deferred.fromCoroutine(sender.send(report, 1)))
        self.assertEqual((outcome.state, outcome.delivered), (SendState.DROPPED, ()))

    def test_package_names(self):
        """The package re-exports the split modules' names; schedule keeps its old ones."""
        import mtasts_twisted.tlsrpt as tlsrpt
        from mtasts_twisted.tlsrpt import schedule

        for name in ("RuaSender", "RuaOutcome", "ReportPoster", "pending_reports", "preview_report",
                     "SendState", "SendOutcome", "PendingReport", "NoResultsError", "SENDS_TABLE", "TABLES",
                     "SchedulerSettings"):
            self.assertTrue(hasattr(tlsrpt, name), name)
        for name in schedule.__all__:
            self.assertTrue(hasattr(schedule, name), name)


class ClaimTests(SchedulerTestCase):
    def test_two_schedulers_one_send(self):
        """Two schedulers on one store: each report is sent once."""
        self.record_day1()
        other = PolicyDescriptor(PolicyType.NO_POLICY_FOUND, "other.example")
        self.record_day1(domain_policy=other)
        self.resolver.txt["_smtp._tls.other.example"] = [f"v=TLSRPTv1; rua={RUA_HTTPS}"]
        a, b = self.scheduler(seed=1), self.scheduler(seed=2)
        self.assertNotEqual(a.node, b.node)
        self.successResultOf(a.send_now())
        self.successResultOf(b.send_now())
        self.assertEqual(sorted(r.policy_domain for _, _, r in self.poster.posts),
                         ["example.net", "other.example"])

    def test_concurrent_claims(self):
        """While one node is delivering, the other sees the claim and skips."""
        slow = Deferred()
        self.poster.outcomes = [slow]
        self.record_day1()
        a, b = self.scheduler(seed=1), self.scheduler(seed=2)
        running = a.send_now()
        self.assertNoResult(running)
        self.assertEqual(self.successResultOf(b.send_now()), [])
        slow.callback(200)
        [outcome] = self.successResultOf(running)
        self.assertEqual(outcome.state, SendState.SENT)
        self.assertEqual(len(self.poster.posts), 1)


    def test_racing_claims(self):
        """Both nodes read the results before either claims: the claim decides."""
        self.record_day1()
        sends = self.store.shelf(SENDS_TABLE)
        gate: list[tuple[Deferred, str, object]] = []
        real_update = sends.update

        def gated_update(key, function):
            d = Deferred()
            gate.append((d, key, function))
            return d

        sends.update = gated_update
        a, b = self.scheduler(seed=1), self.scheduler(seed=2)
        runs = [a.send_now(), b.send_now()]
        self.assertEqual(len(gate), 2, "both nodes try to claim")
        sends.update = real_update
        for d, key, function in gate:
            real_update(key, function).chainDeferred(d)
        outcomes = [self.successResultOf(r) for r in runs]
        self.assertEqual(sorted(len(o) for o in outcomes), [0, 1])
        self.assertEqual(len(self.poster.posts), 1)


class CLITests(SchedulerTestCase):
    def test_pending_and_preview(self):
        """pending lists unfinished reports; preview shows the JSON to be sent."""
        self.record_day1()
        self.aggregator.record(Result(POLICY, success_count=1), when=DAY2 + 10)
        self.successResultOf(self.aggregator.flush())
        self.advance_to(DAY2 + 20)
        s = self.scheduler()
        pending = self.successResultOf(s.pending())
        self.assertEqual([(p.day, p.policy_domain, p.state) for p in pending],
                         [("2024-05-01", "example.net", "due"), ("2024-05-02", "example.net", "collecting")])
        self.assertEqual(len(self.successResultOf(s.pending(day="2024-05-02"))), 1)
        self.assertEqual(self.successResultOf(s.pending(domain="nope.example")), [])
        preview = self.successResultOf(s.preview("2024-05-01", "example.net"))
        validate_report(preview)
        self.assertEqual(preview["policies"][0]["summary"],
                         {"total-successful-session-count": 3, "total-failure-session-count": 2})
        self.failureResultOf(s.preview("2024-04-30", "example.net"), NoResultsError)
        # Nothing was sent or claimed by looking.
        self.assertEqual((self.poster.posts, self.sends()), ([], {}))

    def test_view_without_a_scheduler(self):
        """
        The view reads the shelves only (tlsrpt.pending): what the CLI
        needs without a scheduler.
        """
        self.record_day1()
        results, sends = self.store.shelf(RESULTS_TABLE), self.store.shelf(SENDS_TABLE)
        pending = self.successResultOf(pending_reports(results, sends, "2024-05-02"))
        self.assertEqual([(p.day, p.state) for p in pending], [("2024-05-01", "due")])
        preview = self.successResultOf(preview_report(results, sends, SETTINGS, "2024-05-01", "example.net",
                                                      random.Random(1)))
        validate_report(preview)

    def test_send_now_ignores_delay_and_backoff(self):
        """send --now sends at once, and retries at once."""
        self.poster.outcomes = [500]
        self.record_day1()
        self.advance_to(DAY2 + 1)
        s = self.scheduler()
        self.assertGreater(s.release_time("2024-05-01"), DAY2 + 1)
        [outcome] = self.successResultOf(s.send_now())
        self.assertEqual(outcome.state, SendState.RETRY)
        [p] = self.successResultOf(s.pending())
        self.assertEqual((p.state, p.attempts, p.next_attempt), ("retry", 1, DAY2 + 301))
        self.assertIn("HTTP 500", p.last_error)
        # A claimed report previews as its snapshot, with its report id.
        preview = self.successResultOf(s.preview("2024-05-01", "example.net"))
        self.assertEqual(preview["report-id"], self.poster.posts[0][2].report_id)
        [outcome] = self.successResultOf(s.send_now())
        self.assertEqual(outcome.state, SendState.SENT)
        self.assertEqual(self.successResultOf(s.pending()), [])


class PostgreSQLClaimTests(TestCase):
    """Two schedulers, two connections to one real PostgreSQL: one POST each."""

    timeout = 60

    def setUp(self):
        self.url = postgres.require_server().create_database()
        self.pki = PKI()
        self.receiver = ReportReceiver(reactor, self.pki, host="reports.example.net")
        self.receiver.start()
        self.addCleanup(self.receiver.stop)
        return Deferred.fromCoroutine(self._open())

    async def _open(self):
        self.stores = []
        for _ in range(2):
            store = await open_store(self.url, reactor, tables=TABLES)
            self.addCleanup(store.close)
            self.stores.append(store)

    async def _scenario(self):
        domains = [f"d{i}.example" for i in range(4)]
        clock = Clock()
        clock.advance(DAY1 + HOUR)
        resolver = FakeResolver()
        for domain in domains:
            resolver.txt[f"_smtp._tls.{domain}"] = [f"v=TLSRPTv1; rua={self.receiver.url()}"]
        # Results from both nodes, merged in the database.
        for store in self.stores:
            aggregator = ResultAggregator(store, clock)
            for domain in domains:
                policy = PolicyDescriptor(PolicyType.NO_POLICY_FOUND, domain)
                aggregator.record(Result(policy, success_count=2))
                aggregator.record(Result(policy, failures=[FAILURE]))
            await aggregator.flush()
        clock.advance(86400)
        schedulers = [
            ReportScheduler(
                store, SETTINGS, resolver, clock, rng=random.Random(seed),
                https_sender=HTTPSReportSender(reactor, trust_roots=self.pki.ca_pem,
                                               name_resolver=self.receiver.resolver(), timeout=20),
            )
            for seed, store in enumerate(self.stores)
        ]
        outcomes = await gatherResults([s.send_now() for s in schedulers])
        again = await gatherResults([s.send_now() for s in schedulers])
        return domains, outcomes, again

    def test_exactly_once(self):
        """Each (domain, day) report is POSTed exactly once."""

        def check(result):
            domains, outcomes, again = result
            posted = sorted(r.report()["policies"][0]["policy"]["policy-domain"]
                            for r in self.receiver.posts)
            self.assertEqual(posted, domains)
            sent = [o for node in outcomes for o in node]
            self.assertEqual(sorted(o.policy_domain for o in sent), domains)
            self.assertTrue(all(o.state is SendState.SENT for o in sent))
            self.assertEqual(again, [[], []])
            for request in self.receiver.posts:
                report = request.report()
                validate_report(report)
                self.assertEqual(report["policies"][0]["summary"],
                                 {"total-successful-session-count": 4,
                                  "total-failure-session-count": 2})

        return Deferred.fromCoroutine(self._scenario()).addCallback(check)
