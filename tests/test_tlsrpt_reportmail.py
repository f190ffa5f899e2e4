"""
Report mail end to end (RFC 8460 §3, §5.3), with the components the service
builds (L{open_runtime}) on loopback: a domain whose MTA-STS policy
(C{enforce}) refuses its own MX (an expired certificate) still gets its
report by mail, and the report's own session is not reported.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import io
import json
import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.trial import unittest

from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.delivery import Status
from mtasts_twisted.policy import Mode
from mtasts_twisted.service.options import ServiceSettings
from mtasts_twisted.service.runtime import open_runtime
from mtasts_twisted.store import default_database_url
from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer
from mtasts_twisted.testing.world import LoopbackWorld
from mtasts_twisted.tlsrpt import ReportSettings, SendState
from mtasts_twisted.tlsrpt.aggregate import results_key
from mtasts_twisted.tlsrpt.report import DAY_SECONDS, day_of
from tests.test_faults import policy_text
from tests.test_tlsrpt_mail import _KEY
from tests.test_tlsrpt_report import validate_report

DOMAIN = "refusing.test"
MX = "mx.refusing.test"
RUA = "tlsrpt@" + DOMAIN


class RefusingDomainReportTests(unittest.TestCase):
    timeout = 30

    async def test_report_delivered_and_not_reported(self) -> None:
        world = LoopbackWorld.start(reactor)
        self.addCleanup(world.stop)
        world.publish(DOMAIN, policy_text("enforce", MX))
        world.publish_tlsrpt(DOMAIN, "mailto:" + RUA)
        mx = SMTPTestServer(Behaviour(certificate=world.pki.expired(MX)), reactor=reactor)
        port = mx.start()
        self.addCleanup(mx.stop)
        world.add_mx(DOMAIN, MX)

        data_dir = tempfile.mkdtemp(prefix="mtasts-reportmail-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        key_file = os.path.join(data_dir, "dkim.pem")
        with open(key_file, "wb") as f:
            f.write(_KEY)
        settings = ServiceSettings(
            data_dir=data_dir,
            database=default_database_url(data_dir),
            helo_name="relay.sender.test",
            nameservers=(world.dns.nameserver,),
            ca_file=world.ca_file,
            report_settings=ReportSettings(
                "Sender Inc.", "sender.test", "tlsrpt@sender.test", "tlsrpt-noreply@sender.test",
                dkim_key_file=key_file, dkim_selector="sel1",
            ),
            delivery_port_for={MX: port},
        )
        runtime = await open_runtime(settings, reactor)
        self.addCleanup(runtime.close)
        assert runtime.deliverer is not None and runtime.aggregator is not None
        assert runtime.scheduler is not None

        # The enforce policy is cached (fetched from the loopback policy
        # server: the runtime's fetcher would dial port 443).
        lookup = await PolicyCache(runtime.store, world.resolver, world.fetcher, reactor).get(DOMAIN)
        self.assertEqual(lookup.policy.mode, Mode.ENFORCE)
        # The relay's own delivery is refused under enforce (RFC 8461 §5)
        # and reported.
        result = await runtime.deliverer.deliver("alice@sender.test", ["bob@" + DOMAIN],
                                                 io.BytesIO(b"Subject: hi\r\n\r\nhi\r\n"))
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertEqual(mx.messages, [])
        today = day_of(reactor.seconds())
        self.assertEqual(runtime.aggregator.pending_keys, [results_key(today, DOMAIN)])
        await runtime.aggregator.flush()
        # Make today's results yesterday's, so that their report is due.
        shelf = runtime.aggregator.shelf
        yesterday = day_of(reactor.seconds() - DAY_SECONDS)
        await shelf.put(results_key(yesterday, DOMAIN), await shelf.get(results_key(today, DOMAIN)))
        await shelf.delete(results_key(today, DOMAIN))

        [outcome] = await runtime.scheduler.run_once(force=True)

        # RFC 8460 §5.3: delivered although the policy would refuse the MX:
        # opportunistic TLS with the expired certificate.
        self.assertEqual((outcome.state, outcome.delivered_to), (SendState.SENT, ("mailto:" + RUA,)))
        [message] = mx.messages
        self.assertEqual((message.recipients, message.tls, message.accepted), ((RUA,), True, True))
        parsed = email.message_from_bytes(message.data, policy=email.policy.default)
        self.assertEqual(parsed["TLS-Required"], "No")
        [attachment] = [p for p in parsed.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
        report = json.loads(gzip.decompress(attachment.get_content()))
        validate_report(report)
        [policy] = report["policies"]
        self.assertEqual(policy["summary"], {"total-successful-session-count": 0,
                                             "total-failure-session-count": 1})
        self.assertEqual(policy["failure-details"][0]["result-type"], "certificate-expired")
        # RFC 8460 §3: the report's own session is not in any report.
        self.assertEqual(runtime.aggregator.pending_keys, [])
        await runtime.aggregator.flush()
        self.assertIsNone(await shelf.get(results_key(today, DOMAIN)))
