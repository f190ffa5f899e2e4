"""
Tests for L{mtasts_twisted.service} (options, config file, the service on
the real reactor with loopback ports) and L{mtasts_twisted.metrics}.
"""

from __future__ import annotations

import os
import socket

import attrs
import treq
from prometheus_client.exposition import generate_latest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from mtasts_twisted import service
from mtasts_twisted.cache import PolicyRefresher
from mtasts_twisted.delivery import DeliveryResult, RecipientOutcome, Status
from mtasts_twisted.metrics import MeteredSink, ServiceStats, make_registry
from mtasts_twisted.policy import Mode
from mtasts_twisted.relay import RelayService
from mtasts_twisted.results import (
    FailureDetails,
    PolicyDescriptor,
    PolicyType,
    Result,
    ResultType,
)
from mtasts_twisted.socketmap import encode_netstring
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.tlsrpt import ReportScheduler, ResultAggregator

EPHEMERAL = "tcp:0:interface=127.0.0.1"


def parse(*argv: str) -> service.Options:
    options = service.Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def config(self, text: str) -> str:
        path = os.path.join(self.dir, "mtasts.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_defaults(self) -> None:
        """Listeners default to loopback; metrics and reports are off."""
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        options = parse()
        self.assertEqual(options["data-dir"], "./mtasts-data")
        self.assertEqual(options["database"], "sqlite:./mtasts-data/mtasts.sqlite")
        self.assertEqual(options["smtp"], "tcp:2525:interface=127.0.0.1")
        self.assertEqual(options["socketmap"], "tcp:8461:interface=127.0.0.1")
        self.assertIsNone(options["metrics"])
        self.assertEqual(options["nameserver"], [])
        self.assertIsNone(options["report_settings"])
        self.assertFalse(options["strict-testing"])
        self.assertEqual(options["session_reuse"], 2.0)

    def test_config_file_and_precedence(self) -> None:
        """The config file sets everything; the command line wins."""
        path = self.config(
            f'data_dir = "{self.dir}/data"\n'
            'socketmap = "tcp:9999:interface=127.0.0.1"\n'
            'metrics = "tcp:9461:interface=127.0.0.1"\n'
            'nameserver = ["127.0.0.1:5353", "::1"]\n'
            'report-org = "Example Org"\n'
            'report-from = "tlsrpt@example.org"\n'
            "strict-testing = true\n"
        )
        options = parse("--config", path, "--socketmap", "none", "--nameserver", "127.0.0.2")
        self.assertEqual(options["data-dir"], f"{self.dir}/data")
        self.assertIsNone(options["socketmap"])
        self.assertEqual(options["metrics"], "tcp:9461:interface=127.0.0.1")
        self.assertEqual(options["nameserver"], ["127.0.0.2"])
        self.assertTrue(options["strict-testing"])
        settings = options["report_settings"]
        self.assertEqual(settings.organization, "Example Org")
        self.assertEqual(settings.submitter_domain, "example.org")
        self.assertEqual(settings.contact, "tlsrpt@example.org")
        self.assertEqual(parse("--config", path)["nameserver"], ["127.0.0.1:5353", "::1"])

    def test_no_reports_wins(self) -> None:
        options = parse("--report-org", "O", "--report-from", "a@example.org", "--no-reports",
                        "--data-dir", self.dir)
        self.assertIsNone(options["report_settings"])

    def assertUsage(self, message: str, *argv: str) -> None:
        error = self.assertRaises(usage.UsageError, parse, *argv)
        self.assertIn(message, str(error))
        self.assertNotIn("\n", str(error))

    def test_errors(self) -> None:
        """Every bad option is one line naming it."""
        d = ("--data-dir", self.dir)
        self.assertUsage("--socketmap 'bogus:1'", *d, "--socketmap", "bogus:1")
        self.assertUsage("--metrics", *d, "--metrics", "tcp:notaport")
        self.assertUsage("--database", *d, "--database", "mysql://x")
        self.assertUsage("--nameserver", *d, "--nameserver", "dns.example")
        self.assertUsage("--ca-file", *d, "--ca-file", os.path.join(self.dir, "missing.pem"))
        self.assertUsage("--report-org and --report-from", *d, "--report-org", "O")
        self.assertUsage("report settings", *d, "--report-org", "O", "--report-from", "not-an-address")
        self.assertUsage("cannot read", *d, "--config", os.path.join(self.dir, "missing.toml"))
        self.assertUsage("not valid TOML", *d, "--config", self.config("= nonsense"))
        self.assertUsage("unknown setting 'colour'", *d, "--config", self.config('colour = "blue"'))
        self.assertUsage("must be true or false", *d, "--config", self.config('fail-open = "yes"'))
        self.assertUsage("must be a string", *d, "--config", self.config("smtp = 25"))
        for bad in ("-1", "301", "nan", "soon"):
            self.assertUsage(f"--session-reuse {bad!r}", *d, "--session-reuse", bad)
        self.assertUsage("session-reuse must be a number", *d, "--config", self.config("session-reuse = true"))

    def test_mail_reports_need_dkim_or_unsigned(self) -> None:
        """
        RFC 8460 §3: mailed reports MUST be DKIM-signed; without a key they
        are mailed only when the operator says --report-unsigned.
        """
        d = ("--data-dir", self.dir, "--report-org", "O", "--report-from", "tlsrpt@example.org")
        self.assertFalse(parse(*d).settings.mail_reports)
        self.assertIsNotNone(parse(*d).settings.report_settings)  # https: reports still go out
        self.assertTrue(parse(*d, "--report-unsigned").settings.mail_reports)
        self.assertTrue(parse(*d, "--config", self.config("report-unsigned = true")).settings.mail_reports)
        key = self.config("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n")
        self.assertTrue(parse(*d, "--report-dkim-key", key, "--report-dkim-selector", "s").settings.mail_reports)
        self.assertFalse(parse("--data-dir", self.dir, "--report-unsigned").settings.mail_reports)
        self.assertUsage("--report-dkim-key", *d, "--report-dkim-key", os.path.join(self.dir, "missing.pem"),
                         "--report-dkim-selector", "s")
        self.assertUsage("no PEM private key", *d, "--report-dkim-key", self.config("not a key"),
                         "--report-dkim-selector", "s")

    def test_session_reuse(self) -> None:
        d = ("--data-dir", self.dir)
        self.assertEqual(parse(*d, "--session-reuse", "0")["session_reuse"], 0.0)
        self.assertEqual(parse(*d, "--config", self.config("session-reuse = 0.5"))["session_reuse"], 0.5)
        self.assertEqual(parse(*d, "--config", self.config("session-reuse = 7"), "--session-reuse", "3")
                         ["session_reuse"], 3.0)

    def test_bad_ca_file(self) -> None:
        path = self.config("not a certificate")
        self.assertUsage("--ca-file", "--data-dir", self.dir, "--ca-file", path)

    def test_data_dir_not_a_directory(self) -> None:
        path = self.config("")
        self.assertUsage("not a directory", "--data-dir", path)

    def test_data_dir_unwritable(self) -> None:
        os.chmod(self.dir, 0o500)
        self.addCleanup(os.chmod, self.dir, 0o700)
        if os.geteuid() == 0:
            # Root may write anywhere, so os.access answers as for root;
            # answer as the kernel would for an unprivileged user.
            real_access = os.access
            self.patch(os, "access", lambda path, mode: False if os.path.abspath(path).startswith(os.path.abspath(self.dir)) else real_access(path, mode))
        self.assertUsage("not writable", "--data-dir", self.dir)
        self.assertUsage("cannot be created", "--data-dir", os.path.join(self.dir, "sub"))


class ServiceSettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def test_frozen_settings_of_options(self) -> None:
        """Parsed options carry one frozen value with everything the runtime needs."""
        options = parse("--data-dir", self.dir, "--nameserver", "127.0.0.2", "--metrics", "none",
                        "--delivery-port", "2525", "--delivery-port", "MX.Example.=26", "--fail-open")
        settings = options.settings
        self.assertEqual(settings.data_dir, self.dir)
        self.assertEqual(settings.database, options["database"])
        self.assertEqual(settings.nameservers, ("127.0.0.2",))
        self.assertEqual((settings.delivery_port, dict(settings.delivery_port_for)), (2525, {"mx.example": 26}))
        self.assertEqual(list(settings.listeners), ["smtp", "socketmap"])
        self.assertTrue(settings.fail_open)
        self.assertIsNone(settings.report_settings)
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, settings, "data_dir", "/")
        with self.assertRaises(TypeError):
            settings.delivery_port_for["mx.example"] = 25  # type: ignore[index]

    def test_as_settings(self) -> None:
        """Settings, parsed options and a dict of their keys give the same settings."""
        options = parse("--data-dir", self.dir)
        self.assertIs(service.options.as_settings(options), options.settings)
        self.assertIs(service.options.as_settings(options.settings), options.settings)
        self.assertEqual(service.options.as_settings(dict(options)), options.settings)
        self.assertEqual(service.queue_directory(options.settings), service.queue_directory(options))


class _Collect(Protocol):
    def __init__(self, done: Deferred[bytes], request: bytes) -> None:
        self.done, self.request, self.data = done, request, b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.data.endswith(b","):
            self.transport.loseConnection()

    def connectionLost(self, reason: object) -> None:
        self.done.callback(self.data)


def socketmap_query(port: int, key: str) -> Deferred[bytes]:
    done: Deferred[bytes] = Deferred()
    factory = ClientFactory()
    factory.buildProtocol = lambda addr: _Collect(done, encode_netstring(f"postfix {key}".encode()))
    reactor.connectTCP("127.0.0.1", port, factory)
    return done


class ServiceTests(TestCase):
    def setUp(self) -> None:
        self.dns = DNSTestServer()
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.dir = self.mktemp()
        self.fatal: list[int] = []

    def make(self, *argv: str) -> service.MTASTSService:
        options = parse("--data-dir", self.dir, "--nameserver", self.dns.nameserver,
                        "--socketmap", EPHEMERAL, "--smtp", EPHEMERAL, "--metrics", EPHEMERAL, *argv)
        svc = service.makeService(options, reactor, fatal=self.fatal.append)
        return svc

    async def start(self, svc: service.MTASTSService) -> None:
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        self.assertTrue(await svc.ready)

    async def test_children_and_socketmap(self) -> None:
        """The service runs every part; the socketmap answers from the cache."""
        svc = self.make("--report-org", "Example", "--report-from", "tlsrpt@example.org")
        self.assertEqual(sorted(svc.listeners), ["metrics", "smtp", "socketmap"])
        await self.start(svc)
        kinds = {type(child) for child in svc}
        self.assertIn(PolicyRefresher, kinds)
        self.assertIn(ResultAggregator, kinds)
        self.assertIn(RelayService, kinds)
        self.assertTrue(any(isinstance(child, ReportScheduler) for child in svc))
        port = svc.listeners["socketmap"].port.getHost().port
        answer = await socketmap_query(port, "example.com")
        self.assertEqual(answer, encode_netstring(b"NOTFOUND "))
        self.assertEqual(svc.stats.socketmap.counts["notfound"], 1)
        metrics = svc.listeners["metrics"].port.getHost().port
        response = await treq.get(f"http://127.0.0.1:{metrics}/metrics",
                                  pool=HTTPConnectionPool(reactor, persistent=False))
        body = (await response.content()).decode()
        self.assertEqual(response.code, 200)
        for name in ("mtasts_policy_lookups_total", "mtasts_policy_cache_entries",
                     "mtasts_socketmap_requests_total", "mtasts_queue_messages",
                     "mtasts_deliveries_total", "mtasts_tls_failures_total", "mtasts_reports_total"):
            self.assertIn(name, body)
        self.assertIn('mtasts_socketmap_requests_total{answer="notfound"} 1.0', body)
        await svc.stopService()
        self.assertIsNone(svc.runtime)
        self.assertEqual(self.fatal, [])

    async def test_logs_how_reports_are_mailed(self) -> None:
        """At start, one warning says mailed reports are off (no DKIM key), or unsigned."""
        from twisted.logger import formatEvent, globalLogPublisher

        reports = ("--report-org", "Example", "--report-from", "tlsrpt@example.org", "--socketmap", "none",
                   "--smtp", "none", "--metrics", "none")
        for extra, expected in [((), "TLSRPT reports by mail are off"),
                                (("--report-unsigned",), "TLSRPT reports are mailed without a DKIM signature")]:
            events: list[dict[str, object]] = []
            globalLogPublisher.addObserver(events.append)
            try:
                svc = self.make(*reports, *extra)
                await self.start(svc)
            finally:
                globalLogPublisher.removeObserver(events.append)
            lines = [formatEvent(e) for e in events if "DKIM" in formatEvent(e)]
            self.assertEqual(len(lines), 1, lines)
            self.assertIn(expected, lines[0])
            await svc.stopService()

    async def test_smtp_intake_queues(self) -> None:
        """The relay intake accepts mail from loopback into DATA-DIR/queue."""
        import smtplib

        from twisted.internet.threads import deferToThread

        svc = self.make("--no-reports", "--socketmap", "none", "--metrics", "none", "--session-reuse", "1.5")
        await self.start(svc)
        self.assertEqual(svc.relay.deliverer.settings.reuse_idle_time, 1.5)
        svc.relay.stopService()  # keep the message queued
        port = svc.listeners["smtp"].port.getHost().port

        def submit() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("alice@example.org", ["bob@example.com"], b"Subject: hi\r\n\r\nhello\r\n")

        await deferToThread(submit)
        self.assertEqual(len(os.listdir(service.queue_directory(svc.config))) > 0, True)
        self.assertEqual(svc.relay.queue.count, 1)

    async def test_port_in_use(self) -> None:
        """A port in use is one logged line and exit status 1."""
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        svc = self.make("--socketmap", f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1")
        svc.privilegedStartService()
        svc.startService()
        self.assertFalse(await svc.ready)
        self.assertEqual(self.fatal, [1])
        self.flushLoggedErrors()
        await svc.stopService()

    async def test_bad_database(self) -> None:
        """A file that is not a database is refused at start: exit status 1."""
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "mtasts.sqlite"), "w") as f:
            f.write("not sqlite at all")
        svc = self.make()
        svc.privilegedStartService()
        svc.startService()
        self.assertFalse(await svc.ready)
        self.assertEqual(self.fatal, [1])
        self.assertIsNone(svc.runtime)
        await svc.stopService()


class ReportMailTests(TestCase):
    async def test_no_policy_cache(self) -> None:
        lookup = await service.NoPolicyCache().get("example.com")
        self.assertIsNone(lookup.policy)
        self.assertEqual(lookup.result.policy.policy_type, PolicyType.NO_POLICY_FOUND)

    async def test_mailer(self) -> None:
        """The mailer delivers through the deliverer; anything but DELIVERED fails."""
        calls = []

        class FakeDeliverer:
            status = Status.DELIVERED

            def deliver(self, sender, recipients, message):
                calls.append((sender, recipients, message.read()))
                outcome = RecipientOutcome(recipients[0], self.status, 250, "ok", "mx", None, False)
                return succeed(DeliveryResult("example.com", None, (outcome,), ()))

        deliverer = FakeDeliverer()
        mailer = service.ReportMailer(deliverer)
        await mailer("from@example.org", "to@example.com", b"report")
        self.assertEqual(calls, [("from@example.org", ["to@example.com"], b"report")])
        deliverer.status = Status.TRANSIENT
        with self.assertRaises(service.ReportMailError):
            await mailer("from@example.org", "to@example.com", b"report")


class MetricsTests(SynchronousTestCase):
    def test_sink_and_registry(self) -> None:
        """Failures are counted by result type and passed on; the registry is private."""
        stats = ServiceStats()
        seen = []

        class Sink:
            def record(self, result, when=None):
                seen.append(result)

        sink = MeteredSink(Sink(), stats)
        result = Result(PolicyDescriptor(PolicyType.STS, "example.com"),
                        failures=(FailureDetails(ResultType("certificate-expired"), failed_session_count=2),))
        sink.record(result)
        self.assertEqual(seen, [result])
        stats.deliveries[("delivered", Mode.ENFORCE.value)] += 3
        stats.queue_stats = lambda: (4, 12.5)
        text = generate_latest(make_registry(stats)).decode()
        self.assertIn('mtasts_tls_failures_total{result_type="certificate-expired"} 2.0', text)
        self.assertIn('mtasts_deliveries_total{outcome="delivered",policy_mode="enforce"} 3.0', text)
        self.assertIn("mtasts_queue_messages 4.0", text)
        self.assertIn("mtasts_queue_oldest_age_seconds 12.5", text)
        from prometheus_client import REGISTRY

        self.assertNotIn("mtasts_", generate_latest(REGISTRY).decode())

