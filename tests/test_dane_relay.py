"""
DANE delivery end to end on real parts (issue 14's scenarios): signed
zones behind a validating Unbound (L{mtasts_twisted.testing.dnssec}), the
L{Deliverer} with C{dane} on through L{DNSResolver}, real SMTP test
servers on loopback, and the TLSRPT results; on the server side, that
nothing reaches a DANE host unverified.  The TLSA names carry the test
servers' real ports (RFC 7672 §2.2.3: C{_PORT._tcp.HOST}, PORT the port
delivery connects to).  One DNSSEC world per test; the scenarios loop
inside.  C{mtasts-twisted lookup --dane} runs against the same world.
"""

from __future__ import annotations

import io
import json
import random

from cryptography import x509
from twisted.internet import reactor
from twisted.trial import unittest

from mtasts_twisted import cli
from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.delivery import Deliverer, DeliverySettings, Status
from mtasts_twisted.dns import DNSResolver
from mtasts_twisted.pkix import tlsa_association_data
from mtasts_twisted.results import PolicyType, ResultType
from mtasts_twisted.store import MemoryStore
from mtasts_twisted.testing.dnssec import DNSSECWorld, Security, Zone, require_world
from mtasts_twisted.testing.memory import FakeFetcher
from mtasts_twisted.testing.pki import PKI
from mtasts_twisted.testing.sinks import ListSink
from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer, StartTLS

_PKI = PKI()
SELF_SIGNED = _PKI.self_signed("ee.relay.test")
OTHER = _PKI.self_signed("ee.relay.test")
SENDER = "alice@example.org"
MESSAGE = b"Subject: dane\r\n\r\nHello.\r\n"


def spki(certificate: x509.Certificate) -> str:
    data = tlsa_association_data(certificate, 1, 1)
    assert data is not None
    return data.hex()


OWN = spki(SELF_SIGNED.certificates()[0])
WRONG = spki(OTHER.certificates()[0])


def enforce(*mx: str) -> str:
    return "version: STSv1\nmode: enforce\n" + "".join(f"mx: {m}\n" for m in mx) + "max_age: 86400\n"


class DANERelayTests(unittest.TestCase):
    timeout = 90

    def start_servers(self) -> dict[str, SMTPTestServer]:
        behaviours = {
            "ee.relay.test": Behaviour(certificate=SELF_SIGNED),
            "mismatch.relay.test": Behaviour(certificate=_PKI.valid("mismatch.relay.test")),
            "bogus.relay.test": Behaviour(certificate=SELF_SIGNED),
            "nostarttls.relay.test": Behaviour(starttls=StartTLS.NOT_OFFERED),
            "mx.plain.test": Behaviour(certificate=SELF_SIGNED),
        }
        servers = {}
        for host, behaviour in behaviours.items():
            server = SMTPTestServer(behaviour, reactor=reactor)
            server.start()
            self.addCleanup(server.stop)
            servers[host] = server
        return servers

    def world(self, servers: dict[str, SMTPTestServer]) -> DNSSECWorld:
        port = {host: server.port for host, server in servers.items()}
        world = require_world([
            Zone("relay.test.", (
                "pass 300 IN MX 10 ee",
                "stsrefuse 300 IN MX 10 ee",
                '_mta-sts.stsrefuse 300 IN TXT "v=STSv1; id=1"',
                "mismatch 300 IN MX 10 mismatch",
                '_mta-sts.mismatch 300 IN TXT "v=STSv1; id=1"',
                "bogus 300 IN MX 10 bogus",
                "nostarttls 300 IN MX 10 nostarttls",
                *(f"{h} 300 IN A 127.0.0.1" for h in ("ee", "mismatch", "bogus", "nostarttls")),
                f"_{port['ee.relay.test']}._tcp.ee 300 IN TLSA 3 1 1 {OWN}",
                f"_25._tcp.ee 300 IN TLSA 3 1 1 {OWN}",
                f"_{port['mismatch.relay.test']}._tcp.mismatch 300 IN TLSA 3 1 1 {WRONG}",
                f"_{port['bogus.relay.test']}._tcp.bogus 300 IN TLSA 3 1 1 {OWN}",
                f"_{port['nostarttls.relay.test']}._tcp.nostarttls 300 IN TLSA 3 1 1 {OWN}",
            ), bogus_rrsets=((f"_{port['bogus.relay.test']}._tcp.bogus", "TLSA"),)),
            Zone("plain.test.", (
                "@ 300 IN MX 10 mx",
                "mx 300 IN A 127.0.0.1",
                f"_{port['mx.plain.test']}._tcp.mx 300 IN TLSA 3 1 1 {WRONG}",
            ), security=Security.INSECURE),
        ])
        self.addCleanup(world.stop)
        return world

    async def test_scenarios(self) -> None:
        """
        Each scenario: the recipients' outcome, the TLSRPT result (tlsa
        policy, policy-domain the TLSA base domain, reported to the
        recipient domain), and what reached the server.
        """
        servers = self.start_servers()
        world = self.world(servers)
        assert world.nameserver is not None
        resolver = DNSResolver(reactor, [world.nameserver], timeout=3, budget=10, attempts=1)
        fetcher = FakeFetcher()
        fetcher.policies["stsrefuse.relay.test"] = enforce("other.example")
        fetcher.policies["mismatch.relay.test"] = enforce("mismatch.relay.test")
        sink = ListSink()
        deliverer = Deliverer(
            reactor, resolver, PolicyCache(MemoryStore(), resolver, fetcher, reactor), trust_root=_PKI.ca_pem,
            sink=sink, rng=random.Random(1),
            settings=DeliverySettings(port=1, port_for={h: s.port for h, s in servers.items()}, dane=True,
                                      connect_timeout=3, reply_timeout=3, session_timeout=10))
        # domain, MX host, delivered, the tlsa result (type, None: success), decided by DANE
        scenarios = [
            ("pass.relay.test", "ee.relay.test", True, None, True),
            ("stsrefuse.relay.test", "ee.relay.test", True, None, True),
            ("mismatch.relay.test", "mismatch.relay.test", False, ResultType.TLSA_INVALID, True),
            ("bogus.relay.test", "bogus.relay.test", False, ResultType.DNSSEC_INVALID, True),
            ("nostarttls.relay.test", "nostarttls.relay.test", False, ResultType.STARTTLS_NOT_SUPPORTED, True),
            ("plain.test", "mx.plain.test", True, None, False),
        ]
        for domain, host, delivered, failure, by_dane in scenarios:
            server = servers[host]
            before = len(server.messages)
            result = await deliverer.deliver(SENDER, [f"bob@{domain}"], io.BytesIO(MESSAGE))
            [outcome] = result.outcomes
            self.assertEqual(outcome.status, Status.DELIVERED if delivered else Status.TRANSIENT,
                             (domain, outcome))
            if not delivered:
                self.assertTrue(outcome.message.startswith("4.7.5 "), outcome.message)
            tlsa = [r for r in result.results if r.policy.policy_type is PolicyType.TLSA]
            counted = [r for r in result.results if r.success_count or r.failure_count]
            if by_dane:
                [only] = tlsa
                self.assertEqual(counted, [only], domain)  # one session, one policy
                self.assertEqual((only.policy.policy_domain, only.reported_to), (host, domain))
                if failure is None:
                    self.assertEqual((only.success_count, only.failure_count), (1, 0), domain)
                else:
                    self.assertEqual([f.result_type for f in only.failures], [failure], domain)
                    self.assertEqual(only.failure_count, 1)
            else:
                self.assertEqual(tlsa, [], domain)
            new = server.messages[before:]
            if delivered:
                [message] = new
                self.assertTrue(message.tls, domain)
                if by_dane:
                    # SNI is the TLSA base domain (RFC 7672 §8.1).
                    self.assertEqual((message.sni, outcome.verified), (host, True))
            else:
                # Nothing reaches a DANE host unverified: no MAIL, RCPT or DATA.
                self.assertEqual(new, [])
                self.assertEqual(server.plaintext_transactions(), [])
                verbs = [c.verb for s in server.sessions for c in s.commands]
                self.assertFalse({"MAIL", "RCPT", "DATA"} & set(verbs), (domain, verbs))
        self.assertEqual(servers["bogus.relay.test"].sessions, [])  # deferred before connecting
        # Hosts of secure MX RRsets only (plain.test's MX is insecure: no lookup).
        self.assertEqual(dict(deliverer.dane_lookups), {"secure-usable": 4, "bogus": 1})

        # -- mtasts-twisted lookup --dane, against the same world (port 25 names)
        for domain, state, decided_by in [("pass.relay.test", "secure-usable", "dane"),
                                          ("mismatch.relay.test", "none", "none"),  # no policy host served here
                                          ("plain.test", "insecure", "none")]:
            args = cli.build_parser().parse_args(
                ["lookup", domain, "--dane", "--json", "--no-cache", "--nameserver", world.nameserver,
                 "--timeout", "5"])
            out, err = io.StringIO(), io.StringIO()
            fetched = await cli.run_lookup(reactor, args, out, err, policy_port=1)
            self.assertEqual(fetched, cli.EX_OK, err.getvalue())
            dane = json.loads(out.getvalue())["dane"]
            [entry] = dane["hosts"]
            self.assertEqual((entry["state"], entry["decided_by"]), (state, decided_by), dane)
            if state == "secure-usable":
                self.assertEqual(entry["records"], [f"3 1 1 {OWN}"])
                self.assertEqual(entry["tlsa_name"], "_25._tcp.ee.relay.test")
                self.assertEqual(entry["action"], "require-dane")
        args = cli.build_parser().parse_args(
            ["lookup", "pass.relay.test", "--dane", "--no-cache", "--nameserver", world.nameserver])
        out = io.StringIO()
        await cli.run_lookup(reactor, args, out, io.StringIO(), policy_port=1)
        self.assertIn("DANE ee.relay.test (preference 10): secure TLSA, usable", out.getvalue())
        self.assertIn("decided by dane (require-dane)", out.getvalue())
