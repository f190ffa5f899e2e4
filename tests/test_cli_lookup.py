"""``mtasts-twisted lookup`` against the loopback world, in-process and as a real process."""

import io
import json
import os
import sys

from twisted.internet import reactor, utils
from twisted.trial.unittest import TestCase

from mtasts_twisted import cli
from mtasts_twisted.store import default_database_url, open_store
from mtasts_twisted.testing.dns import Behaviour
from mtasts_twisted.testing.https import Route
from mtasts_twisted.testing.world import LoopbackWorld

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmx: *.example.net\nmax_age: 86400\n"


class LookupTests(TestCase):
    def setUp(self):
        self.world = LoopbackWorld.start(reactor)
        self.addCleanup(self.world.stop)
        self.data_dir = self.mktemp()

    async def lookup(self, *argv, data_dir=True):
        args = cli.build_parser().parse_args(
            ["lookup", *argv, "--nameserver", self.world.dns.nameserver, "--ca-file", self.world.ca_file,
             *(["--data-dir", self.data_dir] if data_dir else []), "--timeout", "2"])
        out, err = io.StringIO(), io.StringIO()
        code = await cli.run_lookup(reactor, args, out, err, policy_port=self.world.https.port)
        return code, out.getvalue(), err.getvalue()

    async def make_cache(self):
        """Create the policy cache in the data directory, as the service does."""
        store = await open_store(default_database_url(self.data_dir), reactor)
        await store.close()

    async def test_json_policy_then_cache(self):
        await self.make_cache()
        self.world.publish("example.com", ENFORCE, record_id="20240101")
        self.world.publish_tlsrpt("example.com", "mailto:tlsrpt@example.com", "https://r.example.com/v1")
        code, out, err = await self.lookup("Example.COM.", "--json")
        self.assertEqual(code, cli.EX_OK, err)
        obj = json.loads(out)
        self.assertEqual(obj["domain"], "example.com")
        self.assertEqual(obj["policy"], {"mode": "enforce", "mx": ["mx.example.com", "*.example.net"],
                                         "max_age": 86400, "id": "20240101", "text": ENFORCE})
        self.assertEqual((obj["fresh"], obj["source"]), (True, "fetched"))
        self.assertEqual(obj["tlsrpt_record"], {"rua": ["mailto:tlsrpt@example.com", "https://r.example.com/v1"]})
        self.assertEqual(obj["result"]["policy"]["policy-type"], "sts")
        self.assertEqual(obj["result"]["policy"]["policy-string"], ENFORCE.splitlines())
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "mtasts.sqlite")))
        # The second lookup is served from the SQLite cache, with no HTTPS.
        code, out, err = await self.lookup("example.com", "--json")
        self.assertEqual((code, json.loads(out)["source"]), (cli.EX_OK, "cache"))
        self.assertEqual(self.world.https.request_count("mta-sts.example.com"), 1)

    async def test_human_output(self):
        self.world.publish("example.com", ENFORCE)
        code, out, err = await self.lookup("example.com")
        self.assertEqual(code, cli.EX_OK)
        self.assertIn("example.com: MTA-STS policy, mode enforce (id 1)", out)
        self.assertIn("mx *.example.net", out)
        self.assertIn("no TLSRPT record", out)
        self.assertIn("verified certificate", out)

    async def test_no_policy(self):
        code, out, err = await self.lookup("nothing.example", "--json")
        obj = json.loads(out)
        self.assertEqual((code, obj["policy"], obj["result"]["policy"]["policy-type"]),
                         (cli.EX_OK, None, "no-policy-found"))

    async def test_fetch_failure_is_definite(self):
        self.world.publish("example.com", None)  # TXT record, but the policy host serves 404
        code, out, err = await self.lookup("example.com")
        self.assertEqual(code, cli.EX_OK)
        self.assertIn("no MTA-STS policy", out)
        self.assertIn("problem: sts-policy-fetch-error (no-policy-served)", out)

    async def test_temporary_failure(self):
        self.world.dns.set_behaviour("_mta-sts.example.com", Behaviour.SERVFAIL)
        code, out, err = await self.lookup("example.com", "--json")
        self.assertEqual(code, cli.EX_TEMPFAIL)
        self.assertEqual(json.loads(out)["result"]["failure-details"][0]["failure-reason-code"], "dns-lookup")

    async def test_idn(self):
        self.world.publish("xn--bcher-kva.example", ENFORCE)
        code, out, err = await self.lookup("bücher.example", "--json")
        self.assertEqual((code, json.loads(out)["domain"]), (cli.EX_OK, "xn--bcher-kva.example"))

    async def test_never_creates_a_cache(self):
        """
        Without a cache in the data directory (given, or the default
        C{./mtasts-data}), a lookup discovers afresh and creates nothing.
        """
        self.world.publish("example.com", ENFORCE)
        code, out, err = await self.lookup("example.com", "--json")
        self.assertEqual((code, json.loads(out)["source"]), (cli.EX_OK, "fetched"), err)
        self.assertFalse(os.path.exists(self.data_dir))
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(cwd)
        code, out, err = await self.lookup("example.com", "--json", data_dir=False)
        self.assertEqual((code, json.loads(out)["source"]), (cli.EX_OK, "fetched"), err)
        self.assertEqual(os.listdir(cwd), [])

    async def test_redirect_reason(self):
        """
        A failed fetch names its reason (the 301 of a redirect) in the human
        output, and in full in the JSON C{reason}, however long.
        """
        self.world.publish("example.com", ENFORCE)
        location = "https://elsewhere.example/" + "a" * 300
        self.world.https.serve("mta-sts.example.com", Route.redirect(location))
        code, out, err = await self.lookup("example.com")
        self.assertEqual(code, cli.EX_OK, err)
        self.assertIn("problem: sts-policy-fetch-error (cannot-fetch-policy): ", out)
        self.assertIn("HTTP 301 redirect", out)
        code, out, err = await self.lookup("example.com", "--json", "--no-cache")
        obj = json.loads(out)
        self.assertIn(f"HTTP 301 redirect to '{location}' not followed (RFC 8461 §3.3)", obj["reason"])
        code, out, err = await self.lookup("nothing.example", "--json")
        self.assertIsNone(json.loads(out)["reason"])

    async def test_no_cache(self):
        self.world.publish("example.com", ENFORCE)
        code, out, err = await self.lookup("example.com", "--no-cache")
        self.assertEqual(code, cli.EX_OK)
        self.assertFalse(os.path.exists(self.data_dir))

    async def test_bad_input(self):
        for argv, fragment in [(["exa mple.com"], "invalid label"),
                               (["a" * 64 + ".example"], "longer than 63")]:
            code, out, err = await self.lookup(*argv)
            self.assertEqual(code, cli.EX_USAGE)
            self.assertIn(fragment, err)
        args = cli.build_parser().parse_args(["lookup", "example.com", "--nameserver", "not-an-ip"])
        err = io.StringIO()
        self.assertEqual(await cli.run_lookup(reactor, args, io.StringIO(), err), cli.EX_USAGE)
        self.assertIn("--nameserver", err.getvalue())

    async def test_address_literal(self):
        code, out, err = await self.lookup("[192.0.2.1]")
        self.assertEqual(code, cli.EX_OK)
        self.assertIn("address literal", out)

    async def test_unusable_cache(self):
        os.makedirs(self.data_dir)
        with open(os.path.join(self.data_dir, "mtasts.sqlite"), "wb") as f:
            f.write(b"this is not a database" * 100)
        code, out, err = await self.lookup("example.com")
        self.assertEqual(code, cli.EX_CANTCREAT)
        self.assertIn("mtasts.sqlite", err)

    async def test_real_process(self):
        """``python -m mtasts_twisted lookup`` as a subprocess, asking the loopback DNS server."""
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable,
            ["-m", "mtasts_twisted", "lookup", "nothing.example", "--json", "--nameserver",
             self.world.dns.nameserver, "--data-dir", self.data_dir],
            env=dict(os.environ), reactor=reactor)
        self.assertEqual(code, cli.EX_OK, err)
        self.assertIsNone(json.loads(out)["policy"])
        self.assertEqual(self.world.dns.count("_mta-sts.nothing.example", "TXT"), 1)
