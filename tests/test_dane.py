"""
Tests for L{mtasts_twisted.dane}: TLSA record usability and selection (RFC
7672 §3.1, RFC 6698 §4.1, RFC 7671 §9), the per-host L{DANEStatus}, and the
TLSA search of RFC 7672 §2.2 over a L{FakeResolver} (each path; the same
search against a real validating resolver is in C{tests.test_dns_world}).
"""

from __future__ import annotations

from twisted.trial import unittest

from mtasts_twisted.dane import (
    DANEState,
    DANEStatus,
    discover_dane,
    search_tlsa,
    select_records,
    tlsa_name,
    unusable_reason,
)
from mtasts_twisted.dns import AddressAnswer, DNSNoRecordError, DNSTemporaryError, TLSARecord
from mtasts_twisted.testing.memory import FakeResolver

H256 = bytes(range(32))
H512 = bytes(range(64))
SPKI = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004") + b"\x01" * 64

EE = TLSARecord(3, 1, 1, H256)
TA = TLSARecord(2, 0, 1, H256)


class UsabilityTests(unittest.SynchronousTestCase):
    """L{unusable_reason}: one record at a time."""

    def test_usable(self) -> None:
        """DANE-EE(3) and DANE-TA(2), selectors 0 and 1, matching types 0, 1 and 2 (RFC 7672 §3.1)."""
        for usage in (2, 3):
            for selector in (0, 1):
                for mtype, data in ((0, SPKI), (1, H256), (2, H512)):
                    record = TLSARecord(usage, selector, mtype, data)
                    self.assertIsNone(unusable_reason(record), record)

    def test_pkix_usages(self) -> None:
        """RFC 7672 §3.1.3: PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP."""
        self.assertIn("PKIX-TA(0)", unusable_reason(TLSARecord(0, 0, 1, H256)) or "")
        self.assertIn("PKIX-EE(1)", unusable_reason(TLSARecord(1, 1, 1, H256)) or "")

    def test_unknown_values(self) -> None:
        """RFC 6698 §4.1: an unknown usage, selector or matching type is unusable."""
        self.assertIn("usage 4", unusable_reason(TLSARecord(4, 1, 1, H256)) or "")
        self.assertIn("usage 255", unusable_reason(TLSARecord(255, 1, 1, H256)) or "")
        self.assertIn("selector 2", unusable_reason(TLSARecord(3, 2, 1, H256)) or "")
        self.assertIn("matching type 3", unusable_reason(TLSARecord(3, 1, 3, H256)) or "")

    def test_malformed_data(self) -> None:
        """
        RFC 7671 §9 and RFC 6698 §4.1: a digest of the wrong length, or full
        data that is not one DER SEQUENCE, makes the record unusable.
        """
        for record in (
            TLSARecord(3, 1, 1, H256[:31]),
            TLSARecord(3, 1, 1, H512),
            TLSARecord(2, 0, 2, H256),
            TLSARecord(3, 1, 1, b""),
            TLSARecord(3, 1, 0, b""),
            TLSARecord(3, 1, 0, b"\x04\x00"),
            TLSARecord(3, 1, 0, SPKI[:-1]),
            TLSARecord(3, 1, 0, SPKI + b"\x00"),
            TLSARecord(3, 0, 0, b"\x30\x80\x00\x00"),  # indefinite length: not DER
        ):
            self.assertIsNotNone(unusable_reason(record), record)
        self.assertIn("31 octets, not 32", unusable_reason(TLSARecord(3, 1, 1, H256[:31])) or "")
        self.assertIsNone(unusable_reason(TLSARecord(3, 1, 0, b"\x30\x00")))
        self.assertIsNone(unusable_reason(TLSARecord(3, 0, 0, b"\x30\x82\x01\x00" + b"\x00" * 256)))


class SelectionTests(unittest.SynchronousTestCase):
    """L{select_records}: the usable records, with digest algorithm agility."""

    def test_unusable_dropped(self) -> None:
        records = (TLSARecord(1, 1, 1, H256), EE, TLSARecord(3, 1, 1, b"short"), TA)
        self.assertEqual(select_records(records), (EE, TA))
        self.assertEqual(select_records([TLSARecord(0, 0, 1, H256)]), ())

    def test_digest_agility(self) -> None:
        """
        RFC 7671 §9's example: "3 1 1", "3 1 2" and "3 1 0" published: the
        SHA2-256 record is not used; SHA2-512 and Full(0) are.
        """
        sha256, sha512, full = TLSARecord(3, 1, 1, H256), TLSARecord(3, 1, 2, H512), TLSARecord(3, 1, 0, SPKI)
        self.assertEqual(select_records([sha256, sha512, full]), (sha512, full))

    def test_agility_per_usage_and_selector(self) -> None:
        """The strongest digest is chosen per (usage, selector), never across them."""
        records = (TLSARecord(3, 1, 2, H512), TLSARecord(3, 0, 1, H256), TLSARecord(2, 1, 1, H256))
        self.assertEqual(select_records(records), records)

    def test_malformed_stronger_digest_ignored(self) -> None:
        """Agility comes after malformed records are discarded (RFC 7671 §9)."""
        broken = TLSARecord(3, 1, 2, H256)  # a SHA2-512 record with 32 octets
        self.assertEqual(select_records([EE, broken]), (EE,))


class StatusTests(unittest.SynchronousTestCase):
    def test_tlsa_name(self) -> None:
        """RFC 7672 §2.2.3: _PORT._tcp.BASE, the port being delivery's."""
        self.assertEqual(tlsa_name("mx.example.com"), "_25._tcp.mx.example.com")
        self.assertEqual(tlsa_name("mx.example.com", 2525), "_2525._tcp.mx.example.com")

    def test_properties(self) -> None:
        usable = DANEStatus("mx.example.com", DANEState.USABLE, 25, "mx.example.com",
                            "_25._tcp.mx.example.com", (EE, TLSARecord(1, 1, 1, H256)), (EE,), 300)
        self.assertEqual((usable.applies, usable.authenticates, usable.temporary_failure), (True, True, False))
        self.assertEqual(usable.policy_strings, (f"3 1 1 {H256.hex()}", f"1 1 1 {H256.hex()}"))
        unusable = DANEStatus("mx.example.com", DANEState.UNUSABLE)
        self.assertEqual((unusable.applies, unusable.authenticates), (True, False))
        for state in (DANEState.NONE, DANEState.INSECURE, DANEState.BOGUS):
            status = DANEStatus("mx.example.com", state)
            self.assertFalse(status.applies or status.authenticates)
            self.assertEqual(status.temporary_failure, state is DANEState.BOGUS)
        self.assertRaises(AttributeError, setattr, usable, "state", DANEState.NONE)

    def test_reference_identifiers(self) -> None:
        """
        RFC 7672 §3.2.2: the TLSA base domain, the next-hop domain, and the
        next-hop domain after CNAMEs.
        """
        status = DANEStatus("mx15.example.com", DANEState.USABLE, base_domain="mxbackup.example.net")
        self.assertEqual(status.reference_identifiers("exchange.example.org", "example.com"),
                         ("mxbackup.example.net", "exchange.example.org", "example.com"))
        self.assertEqual(status.reference_identifiers("example.com", "example.com."),
                         ("mxbackup.example.net", "example.com"))


class DiscoveryTests(unittest.TestCase):
    """L{discover_dane}: every path of RFC 7672 §2.2."""

    HOST = "mx.example.com"
    NAME = "_25._tcp.mx.example.com"

    def setUp(self) -> None:
        self.resolver = FakeResolver(secure=True)
        self.resolver.addresses[self.HOST] = ["192.0.2.1"]

    def discover(self, host: str = HOST, **kw) -> DANEStatus:
        kw.setdefault("mx_secure", True)
        return self.successResultOf(discover_dane(self.resolver, host, **kw))

    def tlsa_queries(self) -> list[str]:
        return [name for (kind, name) in self.resolver.queries if kind == "TLSA"]

    def test_usable(self) -> None:
        self.resolver.tlsa[self.NAME] = [EE, TLSARecord(0, 0, 1, H256)]
        status = self.discover()
        self.assertEqual(status, DANEStatus(self.HOST, DANEState.USABLE, 25, self.HOST, self.NAME,
                                            (EE, TLSARecord(0, 0, 1, H256)), (EE,), 300))

    def test_all_unusable(self) -> None:
        """RFC 7672 §2.2: a secure RRset, nothing usable: TLS required, no authentication."""
        self.resolver.tlsa[self.NAME] = [TLSARecord(1, 1, 1, H256), TLSARecord(3, 1, 1, b"garbage")]
        status = self.discover()
        self.assertIs(status.state, DANEState.UNUSABLE)
        self.assertEqual((status.base_domain, status.usable, len(status.records)), (self.HOST, (), 2))
        self.assertTrue(status.applies)

    def test_secure_denial(self) -> None:
        status = self.discover()
        self.assertIs(status.state, DANEState.NONE)
        self.assertFalse(status.applies)

    def test_insecure_tlsa_ignored(self) -> None:
        """An insecure TLSA RRset, however wrong, is not used (RFC 7672 §2.2)."""
        self.resolver.tlsa[self.NAME] = [EE]
        self.resolver.security[self.NAME] = False
        status = self.discover()
        self.assertIs(status.state, DANEState.INSECURE)
        self.assertEqual(status.records, ())

    def test_insecure_denial(self) -> None:
        self.resolver.security[self.NAME] = False
        self.assertIs(self.discover().state, DANEState.INSECURE)

    def test_port(self) -> None:
        self.resolver.tlsa["_2525._tcp.mx.example.com"] = [EE]
        status = self.discover(port=2525)
        self.assertEqual((status.state, status.tlsa_name, status.port),
                         (DANEState.USABLE, "_2525._tcp.mx.example.com", 2525))

    def test_tlsa_lookup_failure_is_bogus(self) -> None:
        """RFC 7672 §2.1.2: a failed TLSA lookup makes the host unreachable, never "no DANE"."""
        self.resolver.tlsa[self.NAME] = DNSTemporaryError("SERVFAIL", self.NAME, "TLSA")
        status = self.discover()
        self.assertIs(status.state, DANEState.BOGUS)
        self.assertTrue(status.temporary_failure)
        self.assertIn(self.NAME, status.detail)

    def test_insecure_mx(self) -> None:
        """RFC 7672 §2.2.1: hosts of an insecure MX RRset: no DANE, no TLSA lookups."""
        self.resolver.tlsa[self.NAME] = [EE]
        status = self.discover(mx_secure=False)
        self.assertIs(status.state, DANEState.INSECURE)
        self.assertEqual(self.resolver.queries, {})

    def test_address_literal(self) -> None:
        for literal in ("192.0.2.1", "[2001:db8::1]"):
            self.assertIs(self.discover(literal).state, DANEState.INSECURE)
        self.assertEqual(self.resolver.queries, {})

    def test_insecure_addresses_no_tlsa_lookup(self) -> None:
        """RFC 7672 §2.2.2: insecure address records: no TLSA queries at all."""
        self.resolver.security[self.HOST] = False
        self.resolver.tlsa[self.NAME] = DNSTemporaryError("would time out")
        status = self.discover()
        self.assertIs(status.state, DANEState.INSECURE)
        self.assertEqual(self.tlsa_queries(), [])

    def test_address_lookup_failure_is_bogus(self) -> None:
        self.resolver.addresses[self.HOST] = DNSTemporaryError("SERVFAIL")
        self.assertIs(self.discover().state, DANEState.BOGUS)

    def test_no_addresses(self) -> None:
        """A host without addresses is unreachable, DANE or not: the caller hears so."""
        self.failureResultOf(discover_dane(self.resolver, "gone.example.com", mx_secure=True), DNSNoRecordError)

    def test_addresses_given(self) -> None:
        self.resolver.tlsa[self.NAME] = [EE]
        status = self.discover(addresses=AddressAnswer(self.HOST, ("192.0.2.1",), 60, True))
        self.assertEqual((status.state, status.ttl), (DANEState.USABLE, 60))
        self.assertNotIn(("A/AAAA", self.HOST), self.resolver.queries)

    def alias(self, secure: bool) -> None:
        self.resolver.addresses[self.HOST] = AddressAnswer(self.HOST, ("192.0.2.1",), 300, secure,
                                                           "host.provider.example")

    def test_secure_cname_expanded_name_first(self) -> None:
        """RFC 7672 §2.2.2 "Secure CNAME": the expanded name first, then the name itself."""
        self.alias(secure=True)
        self.resolver.tlsa["_25._tcp.host.provider.example"] = [TA]
        self.resolver.tlsa[self.NAME] = [EE]
        status = self.discover()
        self.assertEqual((status.base_domain, status.usable), ("host.provider.example", (TA,)))

    def test_secure_cname_falls_back_to_the_name(self) -> None:
        self.alias(secure=True)
        self.resolver.tlsa[self.NAME] = [EE]
        status = self.discover()
        self.assertEqual((status.state, status.base_domain), (DANEState.USABLE, self.HOST))
        self.assertEqual(self.tlsa_queries(), ["_25._tcp.host.provider.example", self.NAME])

    def test_secure_cname_insecure_expanded_tlsa_falls_back(self) -> None:
        """An insecure RRset at the first candidate moves on to the next (§2.2.3)."""
        self.alias(secure=True)
        self.resolver.tlsa["_25._tcp.host.provider.example"] = [TA]
        self.resolver.security["_25._tcp.host.provider.example"] = False
        self.resolver.tlsa[self.NAME] = [EE]
        self.assertEqual(self.discover().base_domain, self.HOST)

    def test_failure_at_first_candidate_ends_the_search(self) -> None:
        self.alias(secure=True)
        self.resolver.tlsa["_25._tcp.host.provider.example"] = DNSTemporaryError("SERVFAIL")
        self.resolver.tlsa[self.NAME] = [EE]
        self.assertIs(self.discover().state, DANEState.BOGUS)
        self.assertEqual(self.tlsa_queries(), ["_25._tcp.host.provider.example"])

    def test_insecure_cname_secure_alias(self) -> None:
        """
        RFC 7672 §2.2.2 "Insecure CNAME": the addresses are insecure, the
        CNAME itself secure: the name itself is the only candidate.
        """
        self.alias(secure=False)
        self.resolver.cname[self.HOST] = "host.provider.example"
        self.resolver.tlsa[self.NAME] = [EE]
        status = self.discover()
        self.assertEqual((status.state, status.base_domain), (DANEState.USABLE, self.HOST))
        self.assertEqual(self.tlsa_queries(), [self.NAME])

    def test_insecure_cname_insecure_alias(self) -> None:
        """An insecure initial CNAME: DANE does not apply, no TLSA lookups."""
        self.alias(secure=False)
        self.resolver.cname[self.HOST] = "host.provider.example"
        self.resolver.security[self.HOST] = False
        self.assertIs(self.discover().state, DANEState.INSECURE)
        self.assertEqual(self.tlsa_queries(), [])

    def test_insecure_cname_lookup_failures(self) -> None:
        self.alias(secure=False)
        self.resolver.cname[self.HOST] = DNSTemporaryError("SERVFAIL")
        self.assertIs(self.discover().state, DANEState.BOGUS)
        del self.resolver.cname[self.HOST]
        status = self.discover()
        self.assertIs(status.state, DANEState.BOGUS)
        self.assertIn("no CNAME record", status.detail)

    def test_search_tlsa_ttl(self) -> None:
        self.resolver.ttl = 30
        self.resolver.tlsa[self.NAME] = [EE]
        status = self.successResultOf(search_tlsa(self.resolver, self.HOST, (self.HOST,), ttl=300))
        self.assertEqual(status.ttl, 30)
