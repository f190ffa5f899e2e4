"""Tests for the operator commands of L{mtasts_twisted.cli}: cache, report, queue, backup, verify."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import time

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtasts_twisted import cli
from mtasts_twisted.cache import POLICY_TABLE, CacheEntry
from mtasts_twisted.policy import parse_policy
from mtasts_twisted.relay import Queue
from mtasts_twisted.results import PolicyDescriptor, PolicyType, Result
from mtasts_twisted.store import default_database_url, open_store
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.tlsrpt import TABLES, ResultAggregator

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmax_age: 86400\n"


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def seed(data_dir: str) -> None:
    store = await open_store(default_database_url(data_dir), reactor, tables=(POLICY_TABLE, *TABLES))
    now = time.time()
    entry = CacheEntry(domain="example.com", alabel="example.com", inserted=now, last_update=now,
                       last_use=now, record_id="1", policy=parse_policy(ENFORCE), valid_end=now + 86400)
    await store.shelf(POLICY_TABLE).put("example.com", entry.to_json())
    aggregator = ResultAggregator(store, reactor)
    aggregator.record(Result(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, "example.net"), success_count=3),
                      when=now - 2 * 86400)
    await aggregator.flush()
    await store.close()


class CacheCommandTests(TestCase):
    """The async command bodies run on trial's reactor (main() would run its own)."""

    async def test_list_show_purge(self) -> None:
        data = self.mktemp()
        await seed(data)

        async def call(*argv: str) -> tuple[int, str, str]:
            args = cli.build_parser().parse_args(list(argv))
            out, err = io.StringIO(), io.StringIO()
            code = await args.run_async(reactor, args, out, err)
            return code, out.getvalue(), err.getvalue()

        code, out, err = await call("cache", "list", "--data-dir", data)
        self.assertEqual(code, 0, err)
        self.assertIn("example.com\tenforce\tid 1", out)
        code, out, err = await call("cache", "show", "EXAMPLE.com.", "--data-dir", data, "--json")
        self.assertEqual(json.loads(out)["mx"], ["mx1.example.com"])
        code, out, err = await call("cache", "purge", "example.com", "--data-dir", data)
        self.assertEqual((code, out), (0, "example.com: purged\n"))
        code, out, err = await call("cache", "show", "example.com", "--data-dir", data)
        self.assertEqual(code, cli.EX_NOINPUT)
        code, out, err = await call("cache", "list", "--data-dir", self.mktemp())
        self.assertEqual(code, cli.EX_NOINPUT)
        self.assertIn("no database at", err)

    async def test_report_preview_and_send(self) -> None:
        data = self.mktemp()
        await seed(data)
        dns = DNSTestServer()
        dns.start(reactor)
        self.addCleanup(dns.stop)
        common = ["--data-dir", data, "--nameserver", dns.nameserver,
                  "--report-org", "Example", "--report-from", "tlsrpt@example.org"]

        async def call(*argv: str) -> tuple[int, str, str]:
            args = cli.build_parser().parse_args(list(argv))
            out, err = io.StringIO(), io.StringIO()
            code = await args.run_async(reactor, args, out, err)
            return code, out.getvalue(), err.getvalue()

        code, out, err = await call("report", "preview", *common)
        self.assertEqual(code, 0, err)
        self.assertIn("example.net\tdue", out)
        day = out.split("\t")[0]
        code, out, err = await call("report", "preview", "--day", day, "--domain", "example.net", *common)
        self.assertEqual(code, 0, err)
        report = json.loads(out)
        self.assertEqual(report["organization-name"], "Example")
        self.assertEqual(report["policies"][0]["summary"]["total-successful-session-count"], 3)
        code, out, err = await call("report", "send", "--now", *common)
        self.assertEqual(code, 0, err)
        self.assertIn("example.net", out)  # only successes: skipped by default
        code, out, err = await call("report", "send", "--now", "--data-dir", data)
        self.assertEqual(code, cli.EX_USAGE)
        self.assertIn("not configured", err)


class QueueBackupTests(SynchronousTestCase):
    def test_queue(self) -> None:
        data = self.mktemp()
        queue = Queue(os.path.join(data, "queue"))
        message = queue.enqueue("alice@example.org", ["bob@example.com"], b"Subject: x\r\n\r\nhi\r\n")
        code, out, err = run_cli("queue", "list", "--data-dir", data, "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)[0]["id"], message.id)
        code, out, err = run_cli("queue", "show", message.id, "--data-dir", data, "--json")
        self.assertEqual(json.loads(out)["pending"], ["bob@example.com"])
        code, out, err = run_cli("queue", "show", message.id, "--data-dir", data)
        self.assertIn("<bob@example.com>  pending", out)
        self.assertEqual(run_cli("queue", "retry", message.id, "--data-dir", data)[0], 0)
        self.assertEqual(run_cli("queue", "delete", message.id, "--data-dir", data)[0], 0)
        self.assertEqual(run_cli("queue", "show", message.id, "--data-dir", data)[0], cli.EX_NOINPUT)
        self.assertEqual(run_cli("queue", "list", "--data-dir", data)[1], "the queue is empty\n")

    def make_database(self) -> str:
        data = self.mktemp()
        os.makedirs(data)
        conn = sqlite3.connect(os.path.join(data, "mtasts.sqlite"))
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied TEXT NOT NULL)")
        conn.execute("CREATE TABLE shelves (name TEXT PRIMARY KEY)")
        conn.execute("INSERT INTO schema_version VALUES (1, 'now')")
        conn.execute("INSERT INTO shelves VALUES ('policies')")
        conn.execute('CREATE TABLE "policies" (key TEXT PRIMARY KEY, value TEXT)')
        conn.execute("INSERT INTO policies VALUES ('example.com', '{}')")
        conn.commit()
        self.addCleanup(conn.close)  # kept open: a running service's connection
        return data

    def test_backup_and_verify(self) -> None:
        data = self.make_database()
        target = self.mktemp()
        code, out, err = run_cli("backup", target, "--data-dir", data)
        self.assertEqual(code, 0, err)
        self.assertIn("OK", out)
        self.assertIn("policies 1", out)
        code, out, err = run_cli("verify", target)
        self.assertEqual(code, 0, err)
        # A second backup into the same directory is refused.
        self.assertEqual(run_cli("backup", target, "--data-dir", data)[0], cli.EX_CANTCREAT)

    def test_verify_rejects(self) -> None:
        target = self.mktemp()
        os.makedirs(target)
        self.assertEqual(run_cli("verify", target)[0], cli.EX_NOINPUT)
        with open(os.path.join(target, "junk.sqlite"), "w") as f:
            f.write("junk")
        code, out, err = run_cli("verify", target)
        self.assertEqual(code, cli.EX_DATAERR)
        self.assertIn("BAD", err)
        newer = os.path.join(target, "newer.sqlite")
        conn = sqlite3.connect(newer)
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied TEXT)")
        conn.execute("CREATE TABLE shelves (name TEXT PRIMARY KEY)")
        conn.execute("INSERT INTO schema_version VALUES (999, 'later')")
        conn.commit()
        conn.close()
        code, out, err = run_cli("verify", target)
        self.assertIn("schema version 999 is not known", err)

    def test_backup_postgresql(self) -> None:
        code, out, err = run_cli("backup", self.mktemp(), "--database", "postgresql://u@localhost/db")
        self.assertEqual(code, cli.EX_UNAVAILABLE)
        self.assertIn("pg_dump", err)
