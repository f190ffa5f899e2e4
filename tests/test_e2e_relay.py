"""
The relay end to end (issue 7, "Tests"): C{twistd -n mtasts} in a real
subprocess on loopback ports, mail submitted with C{smtplib} (in a thread,
so the reactor keeps serving the DNS and SMTP fixtures), delivered to
loopback MX servers (L{SMTPTestServer}) with the test PKI, through the
test DNS server (L{LoopbackWorld}).

MTA-STS policies are pre-seeded in the service's SQLite cache with the
C{_mta-sts} TXT record's id (as in C{test_twistd}): the cache then uses
them without fetching, so no policy-port option is needed.  The MX port
is set with C{--delivery-port} (and C{HOST=PORT} for a second MX).

The helpers here (L{RelayProcess}, L{wait_until}, L{seed_policy},
L{submit}) are shared with C{test_crash}.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import signal
import smtplib
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, utils
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mtasts_twisted.cache import POLICY_TABLE, CacheEntry
from mtasts_twisted.policy import parse_policy
from mtasts_twisted.relay import Queue
from mtasts_twisted.store import default_database_url, open_store
from mtasts_twisted.testing.smtp import Behaviour, Reply, SMTPTestServer
from mtasts_twisted.testing.world import LoopbackWorld

from .clients import RawClient
from .test_twistd import TWISTD, Twistd

LISTENING = re.compile(
    rb"mtasts started: [^\n]*smtp on 127\.0\.0\.1:(\d+)(?:[^\n]*metrics on 127\.0\.0\.1:(\d+))?")


def policy_text(*mx: str) -> str:
    return "version: STSv1\nmode: enforce\n" + "".join(f"mx: {m}\n" for m in mx) + "max_age: 86400\n"


async def seed_policy(data_dir: str, domain: str, policy: str, record_id: str = "1") -> None:
    """Put an MTA-STS policy for C{domain} into the service's SQLite cache."""
    store = await open_store(default_database_url(data_dir), reactor)
    try:
        now = time.time()
        entry = CacheEntry(domain=domain, alabel=domain, inserted=now, last_update=now, last_use=now,
                           record_id=record_id, policy=parse_policy(policy), valid_end=now + 86400)
        await store.shelf(POLICY_TABLE).put(domain, entry.to_json())
    finally:
        await store.close()


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll C{predicate} (bounded) until it is true; fail after C{timeout} s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, step)


def _smtp_send(port: int, sender: str, recipients: list[str], message: bytes) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail(sender, recipients, message)


def submit(port: int, sender: str, recipients: list[str], message: bytes) -> Deferred[dict[str, Any]]:
    """Submit with C{smtplib} in a thread; fires with the refused recipients."""
    return deferToThread(_smtp_send, port, sender, recipients, message)


def make_message(sender: str, recipient: str, subject: str, message_id: str) -> bytes:
    return (f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{message_id}>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
            f"Hello from the e2e test.\r\n.a line starting with a dot\r\n").encode()


def message_id_of(data: bytes) -> str | None:
    match = re.search(rb"(?im)^Message-ID:\s*<([^>\r\n]+)>", data)
    return match.group(1).decode() if match else None


def cli(*args: str) -> Deferred[tuple[bytes, bytes, int]]:
    """Run C{mtasts-twisted ARGS} (C{python -m mtasts_twisted})."""
    return utils.getProcessOutputAndValue(sys.executable, ["-m", "mtasts_twisted", *args], env=dict(os.environ))


class RelayProcess:
    """
    C{twistd -n mtasts} with the relay, in a subprocess, for a test case.

    @ivar smtp_port: the intake's port once started.
    @ivar metrics_port: the metrics port once started (if asked for).
    """

    def __init__(self, case: TestCase, world: LoopbackWorld, data_dir: str, delivery_ports: list[str],
                 metrics: bool = False) -> None:
        self.case = case
        self.world = world
        self.data_dir = data_dir
        self.delivery_ports = delivery_ports
        self.metrics = metrics
        self.proto: Twistd | None = None
        self.smtp_port = 0
        self.metrics_port = 0
        self.helo_name = "relay.test"

    def args(self, smtp_port: int = 0) -> list[str]:
        args = [sys.executable, *TWISTD, "-n", "--pidfile=", "mtasts", "--data-dir", self.data_dir,
                "--nameserver", self.world.dns.nameserver, "--ca-file", self.world.ca_file,
                "--smtp", f"tcp:{smtp_port}:interface=127.0.0.1",
                "--socketmap", "tcp:0:interface=127.0.0.1",
                "--metrics", "tcp:0:interface=127.0.0.1" if self.metrics else "none",
                "--helo-name", self.helo_name, "--no-reports"]
        for value in self.delivery_ports:
            args += ["--delivery-port", value]
        return args

    async def start(self, smtp_port: int = 0, timeout: float = 30) -> Twistd:
        proto = self.proto = Twistd()
        process = reactor.spawnProcess(proto, sys.executable, self.args(smtp_port), env=dict(os.environ),
                                       path=self.data_dir)

        def kill() -> Deferred[Any] | None:
            if proto.ended.called:
                return None
            process.signalProcess("KILL")
            return proto.ended

        self.case.addCleanup(kill)
        waiting = proto.wait_for(LISTENING)
        waiting.addTimeout(timeout, reactor)
        match = await waiting
        self.smtp_port = int(match.group(1))
        if self.metrics:
            self.metrics_port = int(match.group(2))
        return proto

    async def kill9(self) -> None:
        proto = self.proto
        assert proto is not None and proto.transport is not None
        if not proto.ended.called:
            os.kill(proto.transport.pid, signal.SIGKILL)
        await proto.ended

    async def stop(self) -> tuple[int | None, int | None]:
        """SIGTERM, wait for the exit."""
        proto = self.proto
        assert proto is not None and proto.transport is not None
        if not proto.ended.called:
            os.kill(proto.transport.pid, signal.SIGTERM)
        ended = proto.ended
        ended.addTimeout(20, reactor)
        return await ended

    def queue(self) -> Queue:
        return Queue(os.path.join(self.data_dir, "queue"))


class EndToEndTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.world = LoopbackWorld.start(reactor)
        self.addCleanup(self.world.stop)
        pki = self.world.pki
        # the enforce domain with a good MX
        self.good = self.mx("mx.good.test", Behaviour(certificate=pki.valid("mx.good.test"), hostname="mx.good.test"))
        self.world.add_mx("good.test", "mx.good.test")
        self.world.dns.add_txt("_mta-sts.good.test", "v=STSv1; id=1")
        # the sender's domain (no policy): DSNs go there
        self.sender_mx = self.mx("mx.sender.test",
                                 Behaviour(certificate=pki.valid("mx.sender.test"), hostname="mx.sender.test"))
        self.world.add_mx("sender.test", "mx.sender.test")
        # an enforce domain whose MX presents an untrusted certificate
        self.bad = self.mx("mx.bad.test", Behaviour(certificate=pki.untrusted("mx.bad.test"), hostname="mx.bad.test"))
        self.world.add_mx("bad.test", "mx.bad.test")
        self.world.dns.add_txt("_mta-sts.bad.test", "v=STSv1; id=1")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def mx(self, name: str, behaviour: Behaviour) -> SMTPTestServer:
        server = SMTPTestServer(behaviour)
        server.start()
        self.addCleanup(server.stop)
        return server

    async def relay(self, metrics: bool = False, ports: tuple[str, ...] = ()) -> RelayProcess:
        await seed_policy(self.dir, "good.test", policy_text("mx.good.test"))
        await seed_policy(self.dir, "bad.test", policy_text("mx.bad.test"))
        relay = RelayProcess(self, self.world, self.dir, [
            str(self.good.port), f"mx.sender.test={self.sender_mx.port}", f"mx.bad.test={self.bad.port}",
            *ports,
        ], metrics=metrics)
        await relay.start()
        return relay

    async def test_delivered_with_verified_tls_metrics_backup(self) -> None:
        """
        Mail to an enforce domain is delivered over TLS verified for the MX
        name (enforce delivers only then), byte for byte with a
        C{Received:} line; the live process's metrics count it; a backup
        taken while it runs verifies.
        """
        relay = await self.relay(metrics=True)
        message = make_message("alice@sender.test", "bob@good.test", "e2e", "e2e-1@sender.test")
        refused = await submit(relay.smtp_port, "alice@sender.test", ["bob@good.test", "carol@good.test"], message)
        self.assertEqual(refused, {})
        await wait_until(lambda: self.good.messages, 20, "delivery to mx.good.test")
        [got] = self.good.messages
        self.assertEqual(got.mail_from, "alice@sender.test")
        self.assertEqual(got.recipients, ("bob@good.test", "carol@good.test"))
        self.assertTrue(got.accepted)
        self.assertTrue(got.tls and got.tls_at_mail)
        self.assertEqual(got.sni, "mx.good.test")
        self.assertIn(got.tls_version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(self.good.plaintext_transactions(), [])
        self.assertTrue(got.data.startswith(b"Received: from "), got.data[:200])
        self.assertIn(b"by relay.test with ESMTP", got.data)
        self.assertTrue(got.data.endswith(message), got.data)
        await wait_until(lambda: relay.queue().list() == [], 10, "the queue to drain")

        body = await deferToThread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{relay.metrics_port}/metrics", timeout=10).read())
        text = body.decode()
        self.assertRegex(text, r'mtasts_deliveries_total\{outcome="delivered",policy_mode="enforce"\} 2\.0')
        self.assertRegex(text, r"(?m)^mtasts_queue_messages 0\.0$")

        snapshot = os.path.join(os.path.abspath(self.mktemp()), "snap")
        out, err, code = await cli("backup", snapshot, "--data-dir", self.dir)
        self.assertEqual(code, 0, out + err)
        self.assertTrue(os.path.isfile(os.path.join(snapshot, "mtasts.sqlite")), os.listdir(snapshot))
        out, err, code = await cli("verify", snapshot)
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"OK ", out)
        self.assertFalse(relay.proto.ended.called, "the service stopped during the backup")
        self.assertEqual(await relay.stop(), (None, signal.SIGTERM))
        self.assertNotIn(b"Traceback", relay.proto.output)

    async def test_enforce_bad_certificate_stays_queued(self) -> None:
        """
        An enforce domain whose MX presents an untrusted certificate: the
        message is not delivered, nothing of it crosses in plaintext, and
        C{mtasts-twisted queue list} shows it still queued.
        """
        relay = await self.relay()
        message = make_message("alice@sender.test", "bob@bad.test", "bad", "e2e-bad@sender.test")
        self.assertEqual(await submit(relay.smtp_port, "alice@sender.test", ["bob@bad.test"], message), {})

        def attempted() -> bool:
            messages = relay.queue().list()
            return bool(messages) and messages[0].attempts >= 1

        await wait_until(attempted, 20, "a delivery attempt to bad.test")
        self.assertTrue(self.bad.sessions, "the MX was never contacted")
        self.assertEqual(self.bad.messages, [])
        self.assertEqual(self.bad.plaintext_transactions(), [])
        for session in self.bad.sessions:
            self.assertEqual([c.verb for c in session.commands if c.verb not in ("EHLO", "STARTTLS", "QUIT")], [])
        out, err, code = await cli("queue", "list", "--json", "--data-dir", self.dir)
        self.assertEqual(code, 0, err)
        [item] = json.loads(out)
        self.assertEqual(item["pending"], ["bob@bad.test"])
        self.assertEqual(item["sender"], "alice@sender.test")
        self.assertTrue(item["last_error"], item)
        self.assertEqual(self.sender_mx.messages, [])  # no DSN for a transient failure
        self.assertEqual(await relay.stop(), (None, signal.SIGTERM))

    async def test_permanent_failure_dsn_to_sender_mx(self) -> None:
        """
        A 5xx at RCPT: the accepted recipient is delivered, and a DSN for
        the refused one goes from the null sender to the sender domain's
        MX: a multipart/report with the right Status and diagnostic.
        """
        self.good.behaviour = Behaviour(
            certificate=self.world.pki.valid("mx.good.test"), hostname="mx.good.test",
            recipient_replies={"nobody@good.test": Reply(550, "5.1.1 no such user here")})
        relay = await self.relay()
        message = make_message("alice@sender.test", "nobody@good.test", "bounce me", "e2e-dsn@sender.test")
        refused = await submit(relay.smtp_port, "alice@sender.test", ["nobody@good.test", "bob@good.test"], message)
        self.assertEqual(refused, {})
        await wait_until(lambda: self.sender_mx.messages, 20, "a DSN at mx.sender.test")
        [dsn] = self.sender_mx.messages
        self.assertEqual((dsn.mail_from, dsn.recipients), ("", ("alice@sender.test",)))
        self.assertTrue(dsn.tls and dsn.accepted)
        parsed = email.message_from_bytes(dsn.data, policy=email.policy.compat32)
        self.assertEqual(parsed.get_content_type(), "multipart/report")
        self.assertEqual(parsed.get_param("report-type"), "delivery-status")
        _human, status, original = parsed.get_payload()
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        blocks = status.get_payload()
        self.assertEqual(blocks[0]["Reporting-MTA"], "dns; relay.test")
        self.assertEqual(len(blocks), 2, "one block per failed recipient")
        self.assertEqual(blocks[1]["Final-Recipient"], "rfc822; nobody@good.test")
        self.assertEqual(blocks[1]["Action"], "failed")
        self.assertEqual(blocks[1]["Status"], "5.1.1")
        self.assertIn("550 5.1.1 no such user here", blocks[1]["Diagnostic-Code"])
        self.assertIn("e2e-dsn@sender.test", str(original))
        # the other recipient was delivered once, and nothing is left queued
        [delivered] = self.good.messages
        self.assertEqual(delivered.recipients, ("bob@good.test",))
        await wait_until(lambda: relay.queue().list() == [], 10, "the queue to drain")
        self.assertEqual(await relay.stop(), (None, signal.SIGTERM))

    async def test_session_reused_and_closed_at_stop(self) -> None:
        """
        Messages to one enforce domain, one after another: the relay carries
        them over one verified TLS session (connection caching), and SIGTERM
        closes that parked session with QUIT before the process exits.
        """
        relay = await self.relay()
        for n in range(3):
            message = make_message("alice@sender.test", "bob@good.test", f"reuse {n}", f"e2e-reuse-{n}@sender.test")
            self.assertEqual(await submit(relay.smtp_port, "alice@sender.test", ["bob@good.test"], message), {})
            await wait_until(lambda n=n: len(self.good.messages) == n + 1, 20, f"delivery {n}")
        # One session, unless a slow machine let the 2 s idle time pass
        # between two deliveries: at least one transaction reused a session.
        self.assertLess(len(self.good.sessions), 3)
        self.assertTrue(all(m.tls and m.tls_at_mail and m.accepted and m.sni == "mx.good.test"
                            for m in self.good.messages))
        self.assertEqual(self.good.plaintext_transactions(), [])
        await wait_until(lambda: relay.queue().list() == [], 10, "the queue to drain")
        self.assertEqual(await relay.stop(), (None, signal.SIGTERM))
        await wait_until(lambda: all(s.closed for s in self.good.sessions), 5, "the sessions to close")
        for session in self.good.sessions:
            self.assertEqual(session.commands[-1].verb, "QUIT")
        self.assertNotIn(b"Traceback", relay.proto.output)

    async def test_quoted_local_part_delivered(self) -> None:
        """
        Issue 17.4: a legal quoted local part is accepted and delivered to
        the MX with the same RCPT, once, without an error in the log.
        """
        relay = await self.relay()
        message = make_message("alice@sender.test", '"a b"@good.test', "quoted", "e2e-quoted@sender.test")
        refused = await submit(relay.smtp_port, '"john smith"@sender.test', ['"a b"@good.test'], message)
        self.assertEqual(refused, {})
        await wait_until(lambda: self.good.messages, 20, "delivery to mx.good.test")
        [got] = self.good.messages
        self.assertEqual((got.mail_from, got.recipients), ('"john smith"@sender.test', ('"a b"@good.test',)))
        self.assertTrue(got.accepted and got.tls)
        rcpts = [c.line for session in self.good.sessions for c in session.commands if c.verb == "RCPT"]
        self.assertEqual(rcpts, [b'RCPT TO:<"a b"@good.test>'])
        await wait_until(lambda: relay.queue().list() == [], 10, "the queue to drain")
        self.assertEqual(await relay.stop(), (None, signal.SIGTERM))
        self.assertNotIn(b"Traceback", relay.proto.output)
        self.assertNotIn(b"deliverer failed", relay.proto.output)

    async def test_smtputf8_idn_relayed(self) -> None:
        """
        Issue 18: bob@bücher.test, submitted with SMTPUTF8 and a UTF-8
        header, is relayed to its MX (looked up as A-labels), which offers
        SMTPUTF8: MAIL says SMTPUTF8, RCPT carries the A-label domain, the
        message arrives byte for byte after our C{Received:} line.
        """
        idn = "xn--bcher-kva.test"
        mx = self.mx(f"mx.{idn}", Behaviour(certificate=self.world.pki.valid(f"mx.{idn}"), hostname=f"mx.{idn}",
                                            extensions=("SMTPUTF8", "8BITMIME")))
        self.world.add_mx(idn, f"mx.{idn}")
        relay = await self.relay(ports=(f"mx.{idn}={mx.port}",))
        message = ("From: alice@sender.test\r\nTo: bob@bücher.test\r\nSubject: grüße\r\n"
                   "Message-ID: <e2e-utf8@sender.test>\r\n\r\nHallo Bob.\r\n").encode()

        def send() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
                return client.sendmail("alice@sender.test", ["bob@bücher.test"], message,
                                       mail_options=["SMTPUTF8", "BODY=8BITMIME"])

        self.assertEqual(await deferToThread(send), {})
        await wait_until(lambda: mx.messages, 20, "delivery to the IDN domain's MX")
        [got] = mx.messages
        self.assertEqual(got.recipients, (f"bob@{idn}",))
        self.assertTrue(got.accepted)
        [mail] = [c.line for session in mx.sessions for c in session.commands if c.verb == "MAIL"]
        self.assertRegex(mail, rb"^MAIL FROM:<alice@sender\.test> BODY=8BITMIME SMTPUTF8")
        self.assertTrue(got.data.endswith(message), got.data)
        self.assertRegex(got.data, rb"\AReceived: from [^\r\n]+\r\n\tby relay\.test with UTF8SMTP ")
        await wait_until(lambda: relay.queue().list() == [], 10, "the queue to drain")
        self.assertEqual(await relay.stop(), (None, signal.SIGTERM))
        self.assertNotIn(b"Traceback", relay.proto.output)

    async def test_no_header_injection_through_ehlo(self) -> None:
        """
        Issue 17.5, checked where it matters, at the next server: a client
        that puts a bare LF and a header line into EHLO and pipelines a
        transaction gets nothing queued; an honest client whose EHLO name is
        no domain gets its message through with one well-formed
        C{Received:} line naming its address.  No message that reaches the
        MX has a header line the client did not write.
        """
        relay = await self.relay()
        attacker = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", relay.smtp_port), attacker)
        attacker.transport.write(
            b"EHLO evil.test\nX-Injected: yes\r\nMAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@good.test>\r\n"
            b"DATA\r\n" + make_message("alice@sender.test", "bob@good.test", "evil", "e2e-evil@sender.test")
            .replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n")
        await attacker.closed.addTimeout(10, reactor)
        self.assertRegex(attacker.data, rb"\r\n501 5\.5\.2 ")
        self.assertNotIn(b"queued as", attacker.data)

        message = make_message("alice@sender.test", "bob@good.test", "honest", "e2e-honest@sender.test")

        def send() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10, local_hostname="not;a(domain)") as client:
                return client.sendmail("alice@sender.test", ["bob@good.test"], message)

        self.assertEqual(await deferToThread(send), {})
        await wait_until(lambda: self.good.messages, 20, "delivery to mx.good.test")
        await wait_until(lambda: relay.queue().list() == [], 10, "the queue to drain")
        [got] = self.good.messages
        self.assertEqual(message_id_of(got.data), "e2e-honest@sender.test")
        parsed = email.message_from_bytes(got.data, policy=email.policy.compat32)
        self.assertEqual(parsed.keys(), ["Received", "From", "To", "Subject", "Message-ID", "Date"])
        self.assertRegex(parsed["Received"], r"\Afrom \[127\.0\.0\.1\] \(\[127\.0\.0\.1\]\)\s+by relay\.test with ESMTP ")
        for delivered in self.good.messages:
            self.assertNotRegex(delivered.data, rb"(?mi)^X-Injected")
        self.assertEqual(await relay.stop(), (None, signal.SIGTERM))
