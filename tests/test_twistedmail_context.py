"""
Tests for L{MTASTSContext}: built from settings against the loopback
world, started and stopped as one service: SQLite in a data directory, the
drop-in delivering by policy, TLSRPT results collected and a report mailed
through twisted.mail's sender despite the report domain's policy
(RFC 8460 §5.3), a clean stop.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import os
import time

from twisted.internet import reactor
from twisted.trial import unittest

from mtasts_twisted.delivery import DeliverySettings, Status
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType
from mtasts_twisted.testing.sinks import ListSink
from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer
from mtasts_twisted.testing.world import LoopbackWorld
from mtasts_twisted.tlsrpt import RESULTS_TABLE, ReportSettings
from mtasts_twisted.twistedmail import ContextError, ContextSettings, MTASTSContext, MTASTSDeliveryError

MESSAGE = b"Subject: hi\n\nHello.\n"


def policy_text(mode: str, *mx: str) -> str:
    return "\n".join(["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]) + "\n"


class ContextTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.world = LoopbackWorld.start(reactor)
        self.addCleanup(self.world.stop)
        self.pki = self.world.pki
        self.ports: dict[str, int] = {}
        self.data_dir = os.path.abspath(self.mktemp())

    def server(self, host: str, domain: str, behaviour: Behaviour) -> SMTPTestServer:
        server = SMTPTestServer(behaviour, reactor=reactor)
        self.ports[host] = server.start()
        self.addCleanup(server.stop)
        self.world.add_mx(domain, host)
        return server

    def context(self, reports: ReportSettings | None = None, **settings: object) -> tuple[MTASTSContext, ListSink]:
        sink = ListSink()
        values: dict[str, object] = dict(
            data_dir=self.data_dir,
            nameservers=[self.world.dns.nameserver],
            ca_file=self.world.ca_file,
            delivery=DeliverySettings(helo_name="relay.test", port_for=self.ports, connect_timeout=3,
                                      reply_timeout=3, session_timeout=10),
            reports=reports,
            policy_port=self.world.https.port,
        )
        values.update(settings)
        context = MTASTSContext(ContextSettings(**values), reactor, sink=sink)  # type: ignore[arg-type]
        self.addCleanup(lambda: context.stopService() if context.running else None)
        return context, sink

    async def test_lifecycle(self) -> None:
        """Start, deliver under an enforce policy (fetched over HTTPS), stop: the store is written and closed."""
        server = self.server("mx.good.test", "good.test", Behaviour(certificate=self.pki.valid("mx.good.test")))
        self.world.publish("good.test", policy_text("enforce", "mx.good.test"))
        reports = ReportSettings("Relay Inc", "relay.test", "tlsrpt@relay.test", "tlsrpt@relay.test")
        context, sink = self.context(reports)
        context.startService()
        numOk, replies = await context.sendmail("alice@relay.test", ["bob@good.test"], MESSAGE)
        self.assertEqual((numOk, [c for _, c, _ in replies]), (1, [250]))
        self.assertTrue(server.messages[0].tls)
        self.assertEqual([(r.policy.policy_type, r.success_count) for r in sink.results],
                         [(PolicyType.STS, 0), (PolicyType.STS, 1)])
        self.assertEqual(len(context.services), 3)  # refresher, aggregator, report scheduler
        store = context.store
        assert store is not None
        await context.stopService()
        self.assertIsNone(context.store)
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "mtasts.sqlite")))
        # The collected results were flushed before the store was closed.
        again, _ = self.context(reports)
        again.startService()
        await again.when_ready()
        assert again.store is not None
        keys = [key for key, _ in await again.store.shelf(RESULTS_TABLE).items()]
        self.assertEqual(len(keys), 1)
        self.assertIn("good.test", keys[0])
        # The policy is cached: the next context delivers without fetching.
        self.assertEqual(len(self.world.https.requests), 1)
        result = await again.deliver("alice@relay.test", "bob@good.test", MESSAGE)
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED)
        self.assertEqual(len(self.world.https.requests), 1)
        await again.stopService()

    async def test_report_mailed_despite_policy(self) -> None:
        """A mailed report goes through twisted.mail's sender with opportunistic TLS, unreported (RFC 8460 §5.3)."""
        # The report domain's MX has an untrusted certificate and an enforce policy.
        server = self.server("mx.reports.test", "reports.test",
                             Behaviour(certificate=self.pki.untrusted("mx.reports.test")))
        self.world.publish("reports.test", policy_text("enforce", "mx.reports.test"))
        self.world.publish_tlsrpt("good.test", "mailto:tlsrpt@reports.test")
        reports = ReportSettings("Relay Inc", "relay.test", "tlsrpt@relay.test", "tlsrpt@relay.test")
        context, sink = self.context(reports)
        context.startService()
        await context.when_ready()
        # Under the policy the report domain gets nothing...
        with self.assertRaises(MTASTSDeliveryError):
            await context.sendmail("alice@relay.test", ["someone@reports.test"], MESSAGE)
        self.assertEqual(server.messages, [])
        recorded = len(sink.results)
        # ...but yesterday's report for good.test reaches it.
        assert context.aggregator is not None and context.scheduler is not None
        failure = FailureDetails(ResultType.CERTIFICATE_EXPIRED, receiving_mx_hostname="mx.good.test")
        context.aggregator.record(Result(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, "good.test"), 3, [failure]),
                                  when=time.time() - 86400)
        await context.aggregator.flush()
        [outcome] = await context.scheduler.run_once(force=True)
        self.assertEqual(outcome.state.value, "sent", outcome)
        [message] = server.messages
        self.assertEqual((message.mail_from, message.recipients, message.tls), ("tlsrpt@relay.test",
                                                                                 ("tlsrpt@reports.test",), True))
        parsed = email.message_from_bytes(message.data, policy=email.policy.default)
        [attachment] = [p for p in parsed.iter_attachments()]
        report = json.loads(gzip.decompress(attachment.get_content()))
        self.assertEqual(report["policies"][0]["summary"],
                         {"total-successful-session-count": 3, "total-failure-session-count": 1})
        # The report's own session added no TLSRPT result.
        self.assertEqual(len(sink.results), recorded)
        await context.stopService()

    async def test_cannot_start(self) -> None:
        """A database that cannot be opened: when_ready fails with ContextError, and so does sendmail."""
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        context, _ = self.context(database="sqlite:" + os.path.join(blocker, "x.sqlite"))
        with self.assertRaises(ContextError):
            await context.sendmail("a@relay.test", ["b@good.test"], MESSAGE)
        context.startService()
        with self.assertRaises(ContextError):
            await context.when_ready()
        with self.assertRaises(ContextError):
            await context.sendmail("a@relay.test", ["b@good.test"], MESSAGE)
        await context.stopService()
        self.flushLoggedErrors()

    async def test_stop_before_ready(self) -> None:
        """Stopped while the store is opening: it is closed, nothing keeps running."""
        context, _ = self.context(database="memory:")
        context.startService()
        await context.stopService()
        self.assertIsNone(context.store)
        with self.assertRaises(ContextError):
            await context.sendmail("a@relay.test", ["b@good.test"], MESSAGE)
