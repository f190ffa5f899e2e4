"""
DNSSEC-aware lookups of L{mtasts_twisted.dns.DNSResolver} over loopback
against the test DNS server (which sets the AD bit where told): TLSA and
CNAME lookups, and the C{secure} flag of answers and denials (RFC 7672
§2.1), CNAME chains included.  The same lookups through a real validating
resolver are in C{tests.test_dns_world}.
"""

from __future__ import annotations

import attrs
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from twisted.internet import reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mtasts_twisted.dns import (
    AddressAnswer,
    CNAMEAnswer,
    DNSNoRecordError,
    DNSResolver,
    DNSTemporaryError,
    MXAnswer,
    MXHost,
    TLSAAnswer,
    TLSARecord,
)
from mtasts_twisted.interfaces import IDNSResolver
from mtasts_twisted.testing.dns import Behaviour, DNSTestServer
from mtasts_twisted.testing.memory import FakeResolver

FAST = dict(timeout=0.2, budget=2.0, attempts=1)
SHA256 = "ab" * 32
TLSA_NAME = "_25._tcp.mx.example.com"


class LoopbackTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.server = DNSTestServer()
        self.server.start(reactor)
        self.addCleanup(self.server.stop)
        self.resolver = DNSResolver(reactor, [self.server.nameserver], **FAST)

    def add_raw_tlsa(self, name: str, rdata: bytes) -> None:
        """A TLSA record as raw rdata, however malformed (dnspython would refuse it)."""
        self.server._add(name, dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.TLSA, rdata), 300)


class TLSALookupTests(LoopbackTestCase):
    async def test_records(self) -> None:
        """The records as published, in order, insecure without AD."""
        self.server.add_record(TLSA_NAME, "TLSA", f"3 1 1 {SHA256}")
        self.server.add_record(TLSA_NAME, "TLSA", "2 0 0 3082")
        answer = await self.resolver.lookup_tlsa("_25._TCP.MX.example.com.")
        # (The test server keeps an RRset's records in no fixed order.)
        records = sorted(answer.records, key=lambda r: r.usage, reverse=True)
        self.assertEqual(
            attrs.evolve(answer, records=records),
            TLSAAnswer(TLSA_NAME, (TLSARecord(3, 1, 1, bytes.fromhex(SHA256)),
                                   TLSARecord(2, 0, 0, b"\x30\x82")), 300, secure=False),
        )
        self.assertEqual(records[0].to_text(), f"3 1 1 {SHA256}")

    async def test_secure(self) -> None:
        """The AD bit makes the answer secure."""
        self.server.add_record(TLSA_NAME, "TLSA", f"3 1 1 {SHA256}")
        self.server.set_behaviour(TLSA_NAME, Behaviour.AUTHENTICATED)
        self.assertTrue((await self.resolver.lookup_tlsa(TLSA_NAME)).secure)
        # From the cache: still secure.
        self.assertTrue((await self.resolver.lookup_tlsa(TLSA_NAME)).secure)
        self.assertEqual(self.server.count(TLSA_NAME, "TLSA"), 1)

    async def test_cname_keeps_the_name(self) -> None:
        """
        RFC 7672 §2.2.3: a TLSA CNAME is followed, and the answer keeps the
        name asked (the TLSA base domain does not change).
        """
        self.server.add_cname(TLSA_NAME, "tlsa201._dane.example.com")
        self.server.add_record("tlsa201._dane.example.com", "TLSA", f"2 0 1 {SHA256}")
        self.server.set_behaviour(TLSA_NAME, Behaviour.AUTHENTICATED)
        answer = await self.resolver.lookup_tlsa(TLSA_NAME)
        self.assertEqual(answer, TLSAAnswer(TLSA_NAME, (TLSARecord(2, 0, 1, bytes.fromhex(SHA256)),), 300, True))

    async def test_cname_chain_secure_only_if_every_reply_is(self) -> None:
        """RFC 7672 §2.1.3: one insecure reply in the chain makes the answer insecure."""
        self.server.chase_cnames = False
        self.server.add_cname(TLSA_NAME, "tlsa._dane.example.net")
        self.server.add_record("tlsa._dane.example.net", "TLSA", f"3 1 1 {SHA256}")
        self.server.set_behaviour("tlsa._dane.example.net", Behaviour.AUTHENTICATED)
        answer = await self.resolver.lookup_tlsa(TLSA_NAME)
        self.assertFalse(answer.secure)
        self.assertEqual(len(answer.records), 1)
        self.server.set_behaviour(TLSA_NAME, Behaviour.AUTHENTICATED)
        self.resolver.clear_cache()
        self.assertTrue((await self.resolver.lookup_tlsa(TLSA_NAME)).secure)

    async def test_secure_denial(self) -> None:
        """NXDOMAIN and NODATA with AD are secure denials; without AD, insecure."""
        self.server.add_a("mx.example.com", "127.0.0.1")
        self.server.set_behaviour("_25._tcp.gone.example.com", Behaviour.AUTHENTICATED)
        e = await self.assertFailure(self.resolver.lookup_tlsa("_25._tcp.gone.example.com"), DNSNoRecordError)
        self.assertEqual((e.nxdomain, e.secure, e.rdtype), (True, True, "TLSA"))
        self.assertIn("secure NXDOMAIN", str(e))
        self.server.add_txt(TLSA_NAME, "not a TLSA")
        self.server.set_behaviour(TLSA_NAME, Behaviour.AUTHENTICATED)
        e = await self.assertFailure(self.resolver.lookup_tlsa(TLSA_NAME), DNSNoRecordError)
        self.assertEqual((e.nxdomain, e.secure), (False, True))
        # The cached denial is as secure as the one it keeps.
        e = await self.assertFailure(self.resolver.lookup_tlsa(TLSA_NAME), DNSNoRecordError)
        self.assertTrue(e.secure)
        self.assertEqual(self.server.count(TLSA_NAME, "TLSA"), 1)
        e = await self.assertFailure(self.resolver.lookup_tlsa("_25._tcp.other.example.com"), DNSNoRecordError)
        self.assertFalse(e.secure)

    async def test_servfail_is_temporary(self) -> None:
        """
        RFC 7672 §2.1.1: SERVFAIL (how a validating resolver answers a bogus
        or indeterminate RRset) is a lookup failure, never "no TLSA".
        """
        self.server.add_record(TLSA_NAME, "TLSA", f"3 1 1 {SHA256}")
        self.server.set_behaviour(TLSA_NAME, Behaviour.SERVFAIL, rdtype="TLSA")
        e = await self.assertFailure(self.resolver.lookup_tlsa(TLSA_NAME), DNSTemporaryError)
        self.assertIn("SERVFAIL", e.detail)
        self.assertEqual(e.rdtype, "TLSA")

    async def test_servfail_in_the_cname_chain_is_temporary(self) -> None:
        """RFC 7672 §2.1.3: an error at any stage of the CNAME expansion fails the lookup."""
        self.server.chase_cnames = False
        self.server.add_cname(TLSA_NAME, "tlsa._dane.example.net")
        self.server.set_behaviour("tlsa._dane.example.net", Behaviour.SERVFAIL)
        await self.assertFailure(self.resolver.lookup_tlsa(TLSA_NAME), DNSTemporaryError)

    async def test_wrong_digest_length_kept(self) -> None:
        """
        A record whose data does not fit its matching type is kept for the
        DANE code to find unusable (RFC 6698 §4.1, RFC 7671 §9); the other
        records of the RRset stay usable.
        """
        self.add_raw_tlsa(TLSA_NAME, b"\x03\x01\x01" + b"\xab" * 31)
        self.add_raw_tlsa(TLSA_NAME, b"\x03\x01\x01" + b"\xab" * 32)
        answer = await self.resolver.lookup_tlsa(TLSA_NAME)
        self.assertEqual(
            set(answer.records), {TLSARecord(3, 1, 1, b"\xab" * 31), TLSARecord(3, 1, 1, b"\xab" * 32)})

    async def test_rdata_too_short_is_temporary(self) -> None:
        """
        TLSA rdata without room for its three fields makes a malformed
        reply: a lookup failure (RFC 7672 §2.1.2), like any malformed reply.
        """
        self.add_raw_tlsa(TLSA_NAME, b"\x03\x01")
        e = await self.assertFailure(self.resolver.lookup_tlsa(TLSA_NAME), DNSTemporaryError)
        self.assertIn("malformed reply", e.detail)

    async def test_huge_rrset_over_tcp(self) -> None:
        """An RRset too big for UDP comes over TCP, every record kept."""
        for i in range(40):
            self.server.add_record(TLSA_NAME, "TLSA", f"3 1 1 {i:064x}")
        answer = await self.resolver.lookup_tlsa(TLSA_NAME)
        self.assertEqual(len(answer.records), 40)
        self.assertEqual(self.server.count(TLSA_NAME, "TLSA", "tcp"), 1)

    def test_interface(self) -> None:
        verifyObject(IDNSResolver, self.resolver)


class CNAMELookupTests(LoopbackTestCase):
    async def test_alias(self) -> None:
        """The CNAME itself, not followed; secure with AD."""
        self.server.add_cname("mx.example.com", "mx.provider.example")
        self.server.add_a("mx.provider.example", "127.0.0.1")
        self.server.set_behaviour("mx.example.com", Behaviour.AUTHENTICATED)
        answer = await self.resolver.lookup_cname("MX.example.com")
        self.assertEqual(answer, CNAMEAnswer("mx.example.com", "mx.provider.example", 300, True))
        self.assertEqual(self.server.count("mx.provider.example"), 0)

    async def test_not_an_alias(self) -> None:
        self.server.add_a("mx.example.com", "127.0.0.1")
        e = await self.assertFailure(self.resolver.lookup_cname("mx.example.com"), DNSNoRecordError)
        self.assertFalse(e.nxdomain)


class SecureAnswerTests(LoopbackTestCase):
    async def test_address_canonical_name(self) -> None:
        """RFC 7672 §2.2.2: the address answer names the fully CNAME-expanded name."""
        self.server.add_cname("mx.example.com", "mx1.provider.example")
        self.server.add_cname("mx1.provider.example", "host.provider.example")
        self.server.add_a("host.provider.example", "127.0.0.1")
        answer = await self.resolver.lookup_addresses("mx.example.com")
        self.assertEqual(
            answer, AddressAnswer("mx.example.com", ("127.0.0.1",), 300, False, "host.provider.example"))
        self.server.add_a("plain.example.com", "127.0.0.2")
        answer = await self.resolver.lookup_addresses("plain.example.com")
        self.assertEqual(answer.canonical, "plain.example.com")

    async def test_address_secure(self) -> None:
        """Secure when the replies of the records used were all authenticated."""
        self.server.add_a("mx.example.com", "127.0.0.1")
        self.server.add_aaaa("mx.example.com", "::1")
        self.server.set_behaviour("mx.example.com", Behaviour.AUTHENTICATED)
        self.assertTrue((await self.resolver.lookup_addresses("mx.example.com")).secure)
        self.server.add_a("half.example.com", "127.0.0.1")
        self.server.add_aaaa("half.example.com", "::1")
        self.server.set_behaviour("half.example.com", Behaviour.AUTHENTICATED, rdtype="A")
        self.assertFalse((await self.resolver.lookup_addresses("half.example.com")).secure)

    async def test_address_denial_secure(self) -> None:
        self.server.set_behaviour("gone.example.com", Behaviour.AUTHENTICATED)
        e = await self.assertFailure(self.resolver.lookup_addresses("gone.example.com"), DNSNoRecordError)
        self.assertTrue(e.secure)

    async def test_implicit_mx_secure_needs_a_secure_denial(self) -> None:
        """
        An implicit MX (RFC 5321 §5.1) is secure only if the denial of MX
        records and the addresses both are.
        """
        self.server.add_a("example.com", "127.0.0.1")
        self.server.set_behaviour("example.com", Behaviour.AUTHENTICATED, rdtype="A")
        self.server.set_behaviour("example.com", Behaviour.AUTHENTICATED, rdtype="AAAA")
        answer = await self.resolver.lookup_mx("example.com")
        self.assertEqual(answer, MXAnswer("example.com", (MXHost(0, "example.com"),), 300, False, implicit=True))
        self.server.set_behaviour("example.com", Behaviour.AUTHENTICATED, rdtype="MX")
        self.resolver.clear_cache()
        self.assertTrue((await self.resolver.lookup_mx("example.com")).secure)

    async def test_mx_secure(self) -> None:
        self.server.add_mx("example.com", 10, "mx.example.com")
        self.server.set_behaviour("example.com", Behaviour.AUTHENTICATED)
        self.assertTrue((await self.resolver.lookup_mx("example.com")).secure)
        self.server.add_mx("plain.example", 10, "mx.plain.example")
        self.assertFalse((await self.resolver.lookup_mx("plain.example")).secure)


class FakeResolverTests(unittest.SynchronousTestCase):
    """The fake's TLSA and CNAME lookups and its security settings."""

    def test_tlsa_and_security(self) -> None:
        resolver = FakeResolver(secure=True)
        resolver.tlsa[TLSA_NAME] = [(3, 1, 1, SHA256), TLSARecord(2, 0, 1, b"\x01")]
        answer = self.successResultOf(resolver.lookup_tlsa(TLSA_NAME))
        self.assertEqual(answer, TLSAAnswer(TLSA_NAME, (TLSARecord(3, 1, 1, bytes.fromhex(SHA256)),
                                                        TLSARecord(2, 0, 1, b"\x01")), 300, True))
        resolver.security[TLSA_NAME] = False
        self.assertFalse(self.successResultOf(resolver.lookup_tlsa(TLSA_NAME)).secure)
        failure = self.failureResultOf(resolver.lookup_tlsa("_25._tcp.none.example"), DNSNoRecordError)
        self.assertTrue(failure.value.secure)
        self.assertEqual(resolver.queries[("TLSA", TLSA_NAME)], 2)

    def test_cname_and_addresses(self) -> None:
        resolver = FakeResolver()
        resolver.cname["mx.example.com"] = "host.example.net"
        resolver.addresses["mx.example.com"] = AddressAnswer("mx.example.com", ("192.0.2.1",), 60, False,
                                                             "host.example.net")
        self.assertEqual(self.successResultOf(resolver.lookup_cname("mx.example.com")),
                         CNAMEAnswer("mx.example.com", "host.example.net", 300, False))
        self.assertEqual(self.successResultOf(resolver.lookup_addresses("mx.example.com")).canonical,
                         "host.example.net")

    def test_interface(self) -> None:
        verifyObject(IDNSResolver, FakeResolver())
