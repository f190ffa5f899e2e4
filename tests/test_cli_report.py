"""
C{mtasts-twisted report}: preview needs no report settings (it only
reads); mailed reports need DKIM or an explicit C{--report-unsigned}.
"""

from __future__ import annotations

import io
import json

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mtasts_twisted import cli
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType
from mtasts_twisted.store import default_database_url, open_store
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.tlsrpt import TABLES, ResultAggregator

from .test_cli_ops import seed


async def seed_failure(data_dir: str) -> None:
    """One failed session for example.net two days ago: a report is due."""
    store = await open_store(default_database_url(data_dir), reactor, tables=TABLES)
    aggregator = ResultAggregator(store, reactor)
    failure = FailureDetails(ResultType("certificate-expired"), failed_session_count=1)
    aggregator.record(Result(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, "example.net"), failures=(failure,)),
                      when=reactor.seconds() - 2 * 86400)
    await aggregator.flush()
    await store.close()

REPORTS = ["--report-org", "Example", "--report-from", "tlsrpt@example.org"]


class ReportCommandTests(TestCase):
    def setUp(self) -> None:
        self.dns = DNSTestServer()
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.data = self.mktemp()

    async def call(self, *argv: str) -> tuple[int, str, str]:
        args = cli.build_parser().parse_args([*argv, "--data-dir", self.data, "--nameserver", self.dns.nameserver])
        out, err = io.StringIO(), io.StringIO()
        code = await args.run_async(reactor, args, out, err)
        return code, out.getvalue(), err.getvalue()

    async def test_preview_without_report_settings(self) -> None:
        """C{preview} only reads: it works without --report-org and --report-from."""
        await seed(self.data)
        code, out, err = await self.call("report", "preview")
        self.assertEqual(code, cli.EX_OK, err)
        self.assertIn("example.net\tdue", out)
        day = out.split("\t")[0]
        code, out, err = await self.call("report", "preview", "--day", day, "--domain", "example.net")
        self.assertEqual(code, cli.EX_OK, err)
        report = json.loads(out)
        self.assertEqual(report["policies"][0]["summary"]["total-successful-session-count"], 3)
        self.assertIn("--report-org", report["organization-name"])

    async def test_send_needs_report_settings(self) -> None:
        await seed(self.data)
        code, out, err = await self.call("report", "send", "--now")
        self.assertEqual(code, cli.EX_USAGE)
        self.assertIn("not configured", err)

    async def test_mail_needs_dkim_or_unsigned(self) -> None:
        """
        RFC 8460 §3: mailed reports MUST be DKIM-signed.  Without a key (and
        without --report-unsigned) a domain whose only rua is mailto: gets
        no report (dropped: no usable rua) and no mail is tried; with
        --report-unsigned the mail is tried (here it fails: no MX).
        """
        await seed_failure(self.data)
        self.dns.add_txt("_smtp._tls.example.net", "v=TLSRPTv1; rua=mailto:tlsrpt@example.net")
        code, out, err = await self.call("report", "send", "--now", *REPORTS)
        self.assertIn("example.net: dropped", out)
        self.assertIn("no usable rua: mailto:tlsrpt@example.net", out)
        self.assertEqual(code, cli.EX_OK, out + err)

    async def test_unsigned_mail_when_asked(self) -> None:
        await seed_failure(self.data)
        self.dns.add_txt("_smtp._tls.example.net", "v=TLSRPTv1; rua=mailto:tlsrpt@example.net")
        code, out, err = await self.call("report", "send", "--now", *REPORTS, "--report-unsigned")
        self.assertEqual(code, cli.EX_TEMPFAIL, out + err)
        self.assertIn("example.net: retry", out)
        self.assertIn("mailto:tlsrpt@example.net", out)
        self.assertNotIn("no usable rua", out)
