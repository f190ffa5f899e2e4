"""
L{mtasts_twisted.dns.DNSResolver} against real DNSSEC: zones signed with
dnspython, served by Knot, validated by Unbound on loopback
(L{mtasts_twisted.testing.dnssec}).  What a mail server behind a local
validating resolver sees (RFC 7672 §2.1): secure and insecure answers,
bogus zones and RRsets as temporary failures, secure denials, CNAME chains.
"""

from __future__ import annotations

import attrs
from twisted.internet import reactor
from twisted.trial import unittest

from mtasts_twisted.dns import (
    CNAMEAnswer,
    DNSNoRecordError,
    DNSResolver,
    DNSTemporaryError,
    MXHost,
    TLSARecord,
)
from mtasts_twisted.testing.dnssec import DNSSECWorld, Security, Zone, require_world

D1 = "11" * 32
D2 = "22" * 32
SHORT = b"\x03\x01\x01" + b"\xab" * 31  # a SHA2-256 digest one octet short

ZONES = [
    Zone("secure.test.", (
        "@ 300 IN MX 10 mx.secure.test.",
        "mx 300 IN A 127.0.0.1",
        "mx 300 IN AAAA ::1",
        f"_25._tcp.mx 300 IN TLSA 3 1 1 {D1}",
        f"_25._tcp.mx 300 IN TLSA 2 0 1 {D2}",
        "alias 300 IN CNAME mx",
        "shared 300 IN A 127.0.0.1",
        "_25._tcp.shared 300 IN CNAME tlsa._dane",
        f"tlsa._dane 300 IN TLSA 2 0 1 {D2}",
        "toinsecure 300 IN CNAME mx.plain.test.",
        "forged 300 IN A 127.0.0.2",
        "badtlsa 300 IN A 127.0.0.1",
        f"_25._tcp.badtlsa 300 IN TLSA 3 1 1 {D1}",
        "garbage 300 IN A 127.0.0.1",
        "loop1 300 IN CNAME loop2",
        "loop2 300 IN CNAME loop1",
    ), bogus_rrsets=(("forged", "A"), ("_25._tcp.badtlsa", "TLSA")),
       raw_records=(("_25._tcp.garbage", "TLSA", SHORT),)),
    Zone("plain.test.", (
        "@ 300 IN MX 10 mx.plain.test.",
        "mx 300 IN A 127.0.0.1",
        f"_25._tcp.mx 300 IN TLSA 3 1 1 {D1}",
    ), security=Security.INSECURE),
    Zone("broken.test.", (
        "@ 300 IN MX 10 mx.broken.test.",
        "mx 300 IN A 127.0.0.1",
        f"_25._tcp.mx 300 IN TLSA 3 1 1 {D1}",
    ), security=Security.BOGUS),
]

_world: list[DNSSECWorld] = []


def shared_world() -> DNSSECWorld:
    """One world for the tests of this module (stopped at exit)."""
    if not _world:
        _world.append(require_world(ZONES))
    return _world[0]


class WorldTestCase(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        world = shared_world()
        assert world.nameserver is not None
        self.resolver = DNSResolver(reactor, [world.nameserver], timeout=5, budget=20, attempts=1, cache_size=0)


class TLSAWorldTests(WorldTestCase):
    async def test_secure(self) -> None:
        answer = await self.resolver.lookup_tlsa("_25._tcp.mx.secure.test")
        self.assertTrue(answer.secure)
        self.assertEqual(set(answer.records), {TLSARecord(3, 1, 1, bytes.fromhex(D1)),
                                               TLSARecord(2, 0, 1, bytes.fromhex(D2))})

    async def test_insecure(self) -> None:
        """An unsigned zone: the records come, without AD."""
        answer = await self.resolver.lookup_tlsa("_25._tcp.mx.plain.test")
        self.assertFalse(answer.secure)
        self.assertEqual(answer.records, (TLSARecord(3, 1, 1, bytes.fromhex(D1)),))

    async def test_bogus_zone(self) -> None:
        """RFC 7672 §2.1.1: a bogus zone's answer is a lookup failure, not "no TLSA"."""
        e = await self.assertFailure(self.resolver.lookup_tlsa("_25._tcp.mx.broken.test"), DNSTemporaryError)
        self.assertIn("SERVFAIL", e.detail)

    async def test_bogus_rrset(self) -> None:
        """A forged TLSA RRset in a secure zone: SERVFAIL, a temporary failure."""
        await self.assertFailure(self.resolver.lookup_tlsa("_25._tcp.badtlsa.secure.test"), DNSTemporaryError)

    async def test_secure_nxdomain(self) -> None:
        e = await self.assertFailure(self.resolver.lookup_tlsa("_25._tcp.nothere.secure.test"), DNSNoRecordError)
        self.assertEqual((e.nxdomain, e.secure), (True, True))

    async def test_secure_nodata(self) -> None:
        """A name with other records and no TLSA: NODATA with AD (an NSEC proof)."""
        e = await self.assertFailure(self.resolver.lookup_tlsa("mx.secure.test"), DNSNoRecordError)
        self.assertEqual((e.nxdomain, e.secure), (False, True))

    async def test_insecure_denial(self) -> None:
        e = await self.assertFailure(self.resolver.lookup_tlsa("_25._tcp.nothere.plain.test"), DNSNoRecordError)
        self.assertEqual((e.nxdomain, e.secure), (True, False))

    async def test_cname(self) -> None:
        """RFC 7672 §2.2.3: a TLSA CNAME followed securely; the name asked is kept."""
        answer = await self.resolver.lookup_tlsa("_25._tcp.shared.secure.test")
        self.assertEqual((answer.name, answer.secure), ("_25._tcp.shared.secure.test", True))
        self.assertEqual(answer.records, (TLSARecord(2, 0, 1, bytes.fromhex(D2)),))

    async def test_wrong_digest_length(self) -> None:
        """
        A TLSA record whose digest is one octet short, served and validated:
        kept (secure) for the DANE code to find unusable, not a failure.
        """
        answer = await self.resolver.lookup_tlsa("_25._tcp.garbage.secure.test")
        self.assertEqual((answer.secure, answer.records), (True, (TLSARecord(3, 1, 1, SHORT[3:]),)))


class MXAndAddressWorldTests(WorldTestCase):
    async def test_mx(self) -> None:
        secure = await self.resolver.lookup_mx("secure.test")
        self.assertEqual((secure.hosts, secure.secure), ((MXHost(10, "mx.secure.test"),), True))
        self.assertFalse((await self.resolver.lookup_mx("plain.test")).secure)
        await self.assertFailure(self.resolver.lookup_mx("broken.test"), DNSTemporaryError)

    async def test_addresses(self) -> None:
        answer = await self.resolver.lookup_addresses("mx.secure.test")
        self.assertEqual((set(answer.addresses), answer.secure, answer.canonical),
                         ({"::1", "127.0.0.1"}, True, "mx.secure.test"))
        self.assertFalse((await self.resolver.lookup_addresses("mx.plain.test")).secure)
        await self.assertFailure(self.resolver.lookup_addresses("mx.broken.test"), DNSTemporaryError)

    async def test_bogus_rrset(self) -> None:
        """One forged RRset fails; the rest of the zone stays secure."""
        await self.assertFailure(self.resolver.lookup_addresses("forged.secure.test"), DNSTemporaryError)
        self.assertTrue((await self.resolver.lookup_addresses("mx.secure.test")).secure)

    async def test_secure_denial(self) -> None:
        e = await self.assertFailure(self.resolver.lookup_addresses("nothere.secure.test"), DNSNoRecordError)
        self.assertEqual((e.nxdomain, e.secure), (True, True))

    async def test_secure_cname(self) -> None:
        """RFC 7672 §2.2.2: the canonical name after a secure CNAME."""
        answer = await self.resolver.lookup_addresses("alias.secure.test")
        self.assertEqual((answer.secure, answer.canonical), (True, "mx.secure.test"))

    async def test_cname_into_an_insecure_zone(self) -> None:
        """
        RFC 7672 §2.1.3: a secure CNAME to an insecure zone: the chain is
        insecure, the CNAME itself (asked as such) secure.
        """
        answer = await self.resolver.lookup_addresses("toinsecure.secure.test")
        self.assertEqual((answer.secure, answer.canonical), (False, "mx.plain.test"))
        alias = await self.resolver.lookup_cname("toinsecure.secure.test")
        # (Unbound caps TTLs at 5 s in the test world.)
        self.assertEqual(attrs.evolve(alias, ttl=0), CNAMEAnswer("toinsecure.secure.test", "mx.plain.test", 0, True))

    async def test_cname_loop(self) -> None:
        """A CNAME loop is a lookup failure (the resolver's SERVFAIL), never "no record"."""
        await self.assertFailure(self.resolver.lookup_addresses("loop1.secure.test"), DNSTemporaryError)
