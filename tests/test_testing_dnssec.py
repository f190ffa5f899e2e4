"""
Tests for L{mtasts_twisted.testing.dnssec}: the DNSSEC test world answers
through a real validating resolver as RFC 4035 §4.3 says — AD on secure
answers and secure denials, no AD on insecure ones, SERVFAIL for bogus ones.
"""

from __future__ import annotations

import dns.flags
import dns.message
import dns.query
import dns.rcode
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.testing.dnssec import DNSSECWorld, Security, Zone, require_world

DIGEST = "ab" * 32

ZONES = [
    Zone("secure.test.", (
        "mx 300 IN A 127.0.0.1",
        f"_25._tcp.mx 300 IN TLSA 3 1 1 {DIGEST}",
        "forged 300 IN A 127.0.0.2",
    ), bogus_rrsets=(("forged", "A"),)),
    Zone("plain.test.", ("mx 300 IN A 127.0.0.1", f"_25._tcp.mx 300 IN TLSA 3 1 1 {DIGEST}"),
         security=Security.INSECURE),
    Zone("broken.test.", ("mx 300 IN A 127.0.0.1",), security=Security.BOGUS),
]


_world: list[DNSSECWorld] = []


def shared_world() -> DNSSECWorld:
    """One world for the tests of this module (stopped at exit)."""
    if not _world:
        _world.append(require_world(ZONES))
    return _world[0]


class DNSSECWorldTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = shared_world()

    def ask(self, name: str, rdtype: str) -> dns.message.Message:
        assert self.world.nameserver is not None
        host, port = self.world.nameserver.split(":")
        query = dns.message.make_query(name, rdtype, want_dnssec=True)
        return dns.query.udp(query, host, port=int(port), timeout=5)

    def test_secure(self) -> None:
        """A signed zone with a DS in the parent: the answer has AD."""
        reply = self.ask("_25._tcp.mx.secure.test.", "TLSA")
        self.assertEqual(reply.rcode(), dns.rcode.NOERROR)
        self.assertTrue(reply.flags & dns.flags.AD)
        [rrset] = [r for r in reply.answer if r.rdtype == 52]
        self.assertEqual(rrset[0].cert.hex(), DIGEST)

    def test_secure_denial(self) -> None:
        """A name missing from a secure zone: NXDOMAIN with AD (NSEC proof)."""
        reply = self.ask("_25._tcp.nothere.secure.test.", "TLSA")
        self.assertEqual(reply.rcode(), dns.rcode.NXDOMAIN)
        self.assertTrue(reply.flags & dns.flags.AD)

    def test_insecure(self) -> None:
        """An unsigned zone without DS: the answer comes, without AD."""
        reply = self.ask("_25._tcp.mx.plain.test.", "TLSA")
        self.assertEqual(reply.rcode(), dns.rcode.NOERROR)
        self.assertFalse(reply.flags & dns.flags.AD)
        self.assertTrue(reply.answer)

    def test_bogus_zone(self) -> None:
        """A zone whose parent's DS names another key: SERVFAIL."""
        self.assertEqual(self.ask("mx.broken.test.", "A").rcode(), dns.rcode.SERVFAIL)

    def test_bogus_rrset(self) -> None:
        """A broken signature on one RRset: that answer only is SERVFAIL."""
        self.assertEqual(self.ask("forged.secure.test.", "A").rcode(), dns.rcode.SERVFAIL)
        self.assertTrue(self.ask("mx.secure.test.", "A").flags & dns.flags.AD)


class ZoneCheckTests(SynchronousTestCase):
    def test_not_a_child(self) -> None:
        """Zones must be children of test. (one delegation level)."""
        self.assertRaises(ValueError, DNSSECWorld, [Zone("a.b.test.")])
        self.assertRaises(ValueError, DNSSECWorld, [Zone("example.com.")])
        self.assertRaises(ValueError, DNSSECWorld, [Zone("a.test."), Zone("a.test.")])
