"""
Operator overrides where users meet them: the relay's L{Deliverer} against
the loopback SMTP world, C{mtasts-twisted lookup}, the service in-process
(SIGHUP handler, metrics) and C{twistd mtasts} as a real process (SIGHUP,
a malformed file at startup).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import sys
from typing import Any

from twisted.internet import reactor, utils
from twisted.internet.task import deferLater
from twisted.python import usage
from twisted.trial.unittest import TestCase

from mtasts_twisted import cli, service
from mtasts_twisted.delivery import Deliverer, DeliverySettings, Status
from mtasts_twisted.overrides import OverrideTable, OverridingPolicySource, parse_overrides
from mtasts_twisted.policy import Mode
from mtasts_twisted.results import PolicyType, ResultType
from mtasts_twisted.socketmap import encode_netstring
from mtasts_twisted.testing.smtp import Behaviour
from mtasts_twisted.testing.world import LoopbackWorld

from .test_delivery import _CERTS, _PKI, BOB, DOMAIN, MX1, MX2, DeliveryWorld
from .test_service import EPHEMERAL, parse, socketmap_query
from . import test_twistd

ENFORCE_MX1 = f'["{DOMAIN}"]\naction = "enforce"\nmx = ["{MX1}"]\nreason = "preloaded"\n'
SKIP = f'["{DOMAIN}"]\naction = "skip"\nuntil = 2999-01-01\nreason = "stale policy, ticket 7"\n'
DANE_ONLY = f'["{DOMAIN}"]\naction = "dane-only"\n'


class RelayTests(DeliveryWorld):
    """The relay's deliverer asks the overriding source (defer_dane_only, as the service builds it)."""

    overrides = ""
    enforce_as_testing = False

    def deliverer(self, **settings: Any) -> Deliverer:
        values: dict[str, Any] = dict(port=1, port_for=self.ports, connect_timeout=3, reply_timeout=3,
                                      session_timeout=10)
        values.update(settings)
        self.source = OverridingPolicySource(
            self.cache, OverrideTable("o.toml", parse_overrides(self.overrides, "o.toml")), reactor,
            enforce_as_testing=self.enforce_as_testing, defer_dane_only=True)
        return Deliverer(reactor, self.resolver, self.source, trust_root=_PKI.ca_pem, sink=self.sink,
                         settings=DeliverySettings(**values), rng=random.Random(1))

    async def test_enforce_override_refuses_unverified(self) -> None:
        """A domain without a policy, protected by an enforce override: an untrusted certificate defers."""
        self.overrides = ENFORCE_MX1
        server = self.server(Behaviour(certificate=_CERTS["untrusted"]))
        result = await self.deliver()
        [outcome] = result.outcomes
        self.assertEqual((outcome.status, result.policy_mode), (Status.TRANSIENT, Mode.ENFORCE))
        self.assertIn("4.7.5", outcome.message)
        self.assertNothingSent(server)
        # RFC 8460 §4.1: reported under what the domain publishes (nothing), not as an sts policy.
        self.assertEqual({r.policy.policy_type for r in result.results}, {PolicyType.NO_POLICY_FOUND})
        self.assertEqual([kind for kind, _ in self.failures(result)], [ResultType.CERTIFICATE_NOT_TRUSTED])
        self.assertEqual(self.source.uses["enforce"], 1)

    async def test_enforce_override_skips_unlisted_mx(self) -> None:
        self.overrides = ENFORCE_MX1
        self.server(Behaviour(certificate=_VALID2), host=MX2, preference=5)
        good = self.server(Behaviour(certificate=_CERTS["valid"]), host=MX1, preference=10)
        result = await self.deliver()
        [outcome] = result.outcomes
        self.assertEqual((outcome.status, outcome.mx_host), (Status.DELIVERED, MX1))
        self.assertEqual(len(good.messages), 1)

    async def test_without_override_the_same_mail_goes_unverified(self) -> None:
        """The control: no override, no policy → opportunistic delivery despite the certificate."""
        self.server(Behaviour(certificate=_CERTS["untrusted"]))
        [outcome] = (await self.deliver()).outcomes
        self.assertEqual(outcome.status, Status.DELIVERED)

    async def test_skip(self) -> None:
        """The published enforce policy lists only MX2; skip delivers to MX1 as without a policy."""
        self.policy("enforce", MX2)
        self.overrides = SKIP
        self.server(Behaviour(certificate=_CERTS["untrusted"]))
        result = await self.deliver()
        [outcome] = result.outcomes
        self.assertEqual((outcome.status, result.policy_mode), (Status.DELIVERED, None))
        self.assertEqual(result.results[0].policy.policy_type, PolicyType.STS)  # the lookup's result as usual
        self.assertEqual(self.source.uses["skip"], 1)

    async def test_dane_only_defers(self) -> None:
        self.overrides = DANE_ONLY
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        result = await self.deliver()
        [outcome] = result.outcomes
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertIn("requires DANE", outcome.message)
        self.assertEqual(len(server.sessions), 0)
        self.assertEqual([r.failure_count for r in result.results], [0])

    async def test_enforce_as_testing(self) -> None:
        """The emergency switch: a published enforce policy, an untrusted certificate → delivered and reported."""
        self.policy("enforce", MX1)
        self.enforce_as_testing = True
        self.server(Behaviour(certificate=_CERTS["untrusted"]))
        result = await self.deliver()
        [outcome] = result.outcomes
        self.assertEqual((outcome.status, result.policy_mode), (Status.DELIVERED, Mode.TESTING))
        self.assertEqual(result.results[0].policy.policy_type, PolicyType.STS)
        self.assertIn("mode: enforce", result.results[0].policy.policy_strings)  # as published
        self.assertEqual([kind for kind, _ in self.failures(result)], [ResultType.CERTIFICATE_NOT_TRUSTED])
        self.assertEqual(self.source.uses["enforce-as-testing"], 1)


_VALID2 = _PKI.valid(MX2)


class LookupTests(TestCase):
    def setUp(self) -> None:
        self.world = LoopbackWorld.start(reactor)
        self.addCleanup(self.world.stop)
        self.file = self.mktemp()

    def write(self, text: str) -> None:
        with open(self.file, "w") as f:
            f.write(text)

    async def lookup(self, *argv: str) -> tuple[int, str, str]:
        args = cli.build_parser().parse_args(
            ["lookup", *argv, "--nameserver", self.world.dns.nameserver, "--ca-file", self.world.ca_file,
             "--no-cache", "--timeout", "2", "--policy-overrides", self.file])
        out, err = io.StringIO(), io.StringIO()
        code = await cli.run_lookup(reactor, args, out, err, policy_port=self.world.https.port)
        return code, out.getvalue(), err.getvalue()

    async def test_enforce(self) -> None:
        self.write('["example.com"]\naction = "enforce"\nmx = ["mx1.example.com"]\nreason = "preloaded"\n')
        code, out, err = await self.lookup("example.com")
        self.assertEqual(code, cli.EX_OK, err)
        self.assertIn("example.com: no MTA-STS policy\n", out)
        self.assertIn(f"  override: enforce ({self.file}:1), mx mx1.example.com: preloaded\n", out)
        self.assertIn("verified certificate", out)
        code, out, err = await self.lookup("example.com", "--json")
        obj = json.loads(out)
        self.assertEqual(obj["override"], {"kind": "enforce", "mx": ["mx1.example.com"], "until": None,
                                           "reason": "preloaded", "source": f"{self.file}:1"})
        self.assertIsNone(obj["policy"])
        self.assertEqual(obj["result"]["policy"]["policy-type"], "no-policy-found")

    async def test_skip_and_dane_only(self) -> None:
        self.world.publish("example.com", "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n")
        self.write('["example.com"]\naction = "skip"\nuntil = 2999-01-01\nreason = "ticket 7"\n'
                   '["example.net"]\naction = "dane-only"\n')
        code, out, err = await self.lookup("example.com")
        self.assertIn("MTA-STS policy, mode enforce", out)  # what the domain publishes
        self.assertIn("  override: skip", out)
        self.assertIn("until 2999-01-01T00:00:00+00:00: ticket 7", out)
        self.assertIn("no MTA-STS policy applies", out)
        code, out, err = await self.lookup("example.net", "--json")
        obj = json.loads(out)
        self.assertEqual((code, obj["override"]["kind"]), (cli.EX_OK, "dane-only"))
        self.assertIn("DANE", obj["action"])

    async def test_no_override_field_is_null(self) -> None:
        self.write("")
        code, out, err = await self.lookup("example.org", "--json")
        self.assertIsNone(json.loads(out)["override"])
        code, out, err = await self.lookup("example.org")
        self.assertNotIn("override", out)

    async def test_malformed_file(self) -> None:
        self.write('["example.com"]\naction = "nope"\n')
        code, out, err = await self.lookup("example.com")
        self.assertEqual((code, out), (cli.EX_USAGE, ""))
        self.assertEqual(err, f"mtasts-twisted lookup: --policy-overrides {self.file}:2: example.com: "
                              "action 'nope': expected enforce, skip or dane-only\n")


class ServiceTests(TestCase):
    """The service in one process: the overrides decide the socketmap; SIGHUP reloads."""

    def setUp(self) -> None:
        from mtasts_twisted.testing.dns import DNSTestServer

        self.dns = DNSTestServer()
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.dir = self.mktemp()
        self.file = os.path.abspath(self.mktemp())
        self.fatal: list[int] = []

    def write(self, text: str) -> None:
        with open(self.file, "w") as f:
            f.write(text)

    def test_malformed_at_startup(self) -> None:
        self.write('["a.example"]\naction = "enforce"\nmx = []\n')
        with self.assertRaises(usage.UsageError) as cm:
            parse("--data-dir", self.dir, "--policy-overrides", self.file)
        self.assertEqual(str(cm.exception), f"{self.file}:3: a.example: mx: expected a non-empty list of MX host patterns")

    def test_options(self) -> None:
        self.write(DANE_ONLY)
        settings = parse("--data-dir", self.dir, "--policy-overrides", self.file, "--enforce-as-testing").settings
        self.assertEqual((settings.policy_overrides, settings.enforce_as_testing), (self.file, True))
        config = os.path.join(os.path.dirname(self.file), "c.toml")
        with open(config, "w") as f:
            f.write(f'policy-overrides = "{self.file}"\nenforce-as-testing = true\n')
        settings = parse("--data-dir", self.dir, "--config", config).settings
        self.assertEqual((settings.policy_overrides, settings.enforce_as_testing), (self.file, True))

    async def test_malformed_when_the_runtime_opens(self) -> None:
        """The file broke between option parsing and start: a StartupError of one line."""
        from mtasts_twisted.service.runtime import StartupError, open_runtime

        self.write(DANE_ONLY)
        options = parse("--data-dir", self.dir, "--nameserver", self.dns.nameserver, "--no-reports",
                        "--policy-overrides", self.file)
        self.write('["a.example"]\naction = "skip"\nuntil = 2030-13-01\n')
        with self.assertRaises(StartupError) as cm:
            await open_runtime(options.settings, reactor)
        self.assertEqual(len(str(cm.exception).splitlines()), 1)
        self.assertTrue(str(cm.exception).startswith(f"{self.file}:3: not valid TOML"), str(cm.exception))

    async def test_sighup_reload(self) -> None:
        self.write(DANE_ONLY)
        options = parse("--data-dir", self.dir, "--nameserver", self.dns.nameserver, "--socketmap", EPHEMERAL,
                        "--smtp", EPHEMERAL, "--metrics", "none", "--no-reports", "--policy-overrides", self.file)
        svc = service.makeService(options, reactor, fatal=self.fatal.append, install_signals=False)
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        self.assertTrue(await svc.ready)
        port = svc.listeners["socketmap"].port.getHost().port
        self.assertEqual(await socketmap_query(port, DOMAIN), encode_netstring(b"OK dane-only"))
        # The relay's deliverer asks a source over the same table, deferring dane-only.
        assert svc.runtime is not None and svc.runtime.deliverer is not None
        result = await svc.runtime.deliverer.deliver("a@example.org", [BOB], io.BytesIO(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIn("requires DANE", result.outcomes[0].message)

        self.write(ENFORCE_MX1)
        svc.handle_sighup(signal.SIGHUP, None)
        await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(await socketmap_query(port, DOMAIN),
                         encode_netstring(f"OK secure match={MX1} servername=hostname".encode()))
        self.write('["x.example"]\naction = \n')
        svc.handle_sighup(signal.SIGHUP, None)
        await deferLater(reactor, 0.01, lambda: None)
        # A malformed file keeps the previous map.
        self.assertEqual(await socketmap_query(port, DOMAIN),
                         encode_netstring(f"OK secure match={MX1} servername=hostname".encode()))
        self.assertEqual(svc.registry.get_sample_value("mtasts_policy_override_reloads_total", {"outcome": "failed"}),
                         1)
        self.assertEqual(svc.registry.get_sample_value("mtasts_policy_override_uses_total", {"kind": "dane-only"}), 2)
        self.assertEqual(svc.registry.get_sample_value("mtasts_enforce_as_testing"), 0)
        await svc.stopService()
        self.assertEqual(self.fatal, [])


class TwistdOverrideTests(TestCase):
    """C{twistd mtasts} as a real process: SIGHUP reloads; a malformed file stops startup."""

    timeout = 60
    args = test_twistd.TwistdTests.args
    spawn = test_twistd.TwistdTests.spawn

    def setUp(self) -> None:
        test_twistd.TwistdTests.setUp(self)  # type: ignore[arg-type]
        self.file = os.path.join(self.dir, "overrides.toml")

    def write(self, text: str) -> None:
        with open(self.file + ".new", "w") as f:
            f.write(text)
        os.replace(self.file + ".new", self.file)

    async def test_sighup(self) -> None:
        self.write(DANE_ONLY)
        proto = self.spawn("--socketmap", "tcp:0:interface=127.0.0.1", "--no-reports",
                           "--policy-overrides", self.file, "--enforce-as-testing")
        port = int((await proto.wait_for(test_twistd.STARTED)).group(1))
        self.assertIn(b"--enforce-as-testing is ON", proto.output)
        self.assertEqual(await socketmap_query(port, DOMAIN), encode_netstring(b"OK dane-only"))
        self.write(SKIP)
        os.kill(proto.transport.pid, signal.SIGHUP)
        await proto.wait_for(re.compile(rb"policy overrides reloaded: 1 domain"))
        self.assertEqual(await socketmap_query(port, DOMAIN), encode_netstring(b"NOTFOUND "))
        self.assertIn(b"skipping the MTA-STS policy of example.com", proto.output)
        self.write("[oops\n")
        os.kill(proto.transport.pid, signal.SIGHUP)
        await proto.wait_for(re.compile(rb"policy overrides NOT reloaded[^\n]*overrides.toml:1: not valid TOML"))
        self.assertEqual(await socketmap_query(port, DOMAIN), encode_netstring(b"NOTFOUND "))
        os.kill(proto.transport.pid, signal.SIGTERM)
        code, sig = await proto.ended
        self.assertIn((code, sig), [(0, None), (None, signal.SIGTERM)], proto.output)
        self.assertNotIn(b"Traceback", proto.output)

    async def test_malformed_at_startup(self) -> None:
        self.write('["example.com"]\naction = "skip"\n')
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, self.args("--policy-overrides", self.file)[1:], env=dict(os.environ), path=self.dir)
        self.assertEqual((code, out), (1, b""), err)
        self.assertEqual(err.decode().splitlines(),
                         [f"twistd mtasts: {self.file}:1: example.com: skip needs until = DATE "
                          "(a skip never ends by itself otherwise)"])


