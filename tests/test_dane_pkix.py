"""
Tests for DANE authentication in L{mtasts_twisted.pkix} (RFC 7672 §3):
DANE-EE(3) matching that ignores names and dates, DANE-TA(2) anchors with
chain verification and the name checks of §3.2.2–§3.2.3, over certificates
from L{mtasts_twisted.testing.pki}.
"""

from __future__ import annotations

import datetime
import hashlib

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.trial import unittest

from mtasts_twisted.dns import TLSARecord
from mtasts_twisted.pkix import (
    dane_name_matches,
    dane_verify,
    subject_public_key_info,
    tlsa_association_data,
    tlsa_matches,
)
from mtasts_twisted.results import ResultType
from mtasts_twisted.testing.pki import PKI

HOST = "mx.example.com"
REFS = (HOST, "example.com")
_pki: list[PKI] = []


def pki() -> PKI:
    """One PKI for the module: making CAs costs keys."""
    if not _pki:
        _pki.append(PKI())
    return _pki[0]


def record(usage: int, selector: int, mtype: int, certificate: x509.Certificate) -> TLSARecord:
    data = tlsa_association_data(certificate, selector, mtype)
    assert data is not None
    return TLSARecord(usage, selector, mtype, data)


def days(n: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=n)


class AssociationDataTests(unittest.SynchronousTestCase):
    """What a record is compared with (RFC 6698 §2.1.2, §2.1.3)."""

    def test_spki_as_encoded(self) -> None:
        for key_type in (trustme.KeyType.ECDSA, trustme.KeyType.RSA):
            leaf = trustme.CA(key_type=key_type).issue_cert(HOST, key_type=key_type)
            certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
            expected = certificate.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            self.assertEqual(subject_public_key_info(certificate), expected)

    def test_selectors_and_matching_types(self) -> None:
        certificate = pki().self_signed(HOST).certificates()[0]
        der = certificate.public_bytes(serialization.Encoding.DER)
        spki = subject_public_key_info(certificate)
        self.assertEqual(tlsa_association_data(certificate, 0, 0), der)
        self.assertEqual(tlsa_association_data(certificate, 1, 0), spki)
        self.assertEqual(tlsa_association_data(certificate, 0, 1), hashlib.sha256(der).digest())
        self.assertEqual(tlsa_association_data(certificate, 1, 2), hashlib.sha512(spki).digest())
        self.assertIsNone(tlsa_association_data(certificate, 2, 1))
        self.assertIsNone(tlsa_association_data(certificate, 1, 3))
        self.assertTrue(tlsa_matches(TLSARecord(3, 1, 1, hashlib.sha256(spki).digest()), certificate))
        self.assertFalse(tlsa_matches(TLSARecord(3, 1, 1, b"\x00" * 32), certificate))


class DANEEETests(unittest.SynchronousTestCase):
    """RFC 7672 §3.1.1, §3.2.1: the server's own certificate; no names, no dates."""

    def test_every_selector_and_matching_type(self) -> None:
        chain = pki().self_signed(HOST).certificates()
        for selector in (0, 1):
            for mtype in (0, 1, 2):
                verdict = dane_verify(chain, [record(3, selector, mtype, chain[0])], REFS)
                self.assertTrue(verdict.passed, (selector, mtype, verdict))
                self.assertEqual((verdict.reason, verdict.depth), ("dane-ee", 0))

    def test_names_and_dates_ignored(self) -> None:
        """A self-signed, expired certificate for another name: authenticated."""
        chain = pki().self_signed("other.example", not_before=days(-30), not_after=days(-1)).certificates()
        verdict = dane_verify(chain, [record(3, 1, 1, chain[0])], REFS)
        self.assertTrue(verdict.passed)

    def test_mismatch(self) -> None:
        chain = pki().self_signed(HOST).certificates()
        other = pki().self_signed(HOST).certificates()[0]
        verdict = dane_verify(chain, [record(3, 1, 1, other)], REFS)
        self.assertFalse(verdict.passed)
        self.assertEqual((verdict.reason, verdict.result_type), ("tlsa-no-match", ResultType.TLSA_INVALID))

    def test_only_the_server_certificate(self) -> None:
        """A DANE-EE(3) record matching an issuer of the chain is no match."""
        chain = pki().dane_issued(HOST).certificates()
        verdict = dane_verify(chain, [record(3, 0, 1, chain[1])], REFS)
        self.assertFalse(verdict.passed)

    def test_pkix_usages_never_match(self) -> None:
        chain = pki().self_signed(HOST).certificates()
        for usage in (0, 1):
            self.assertFalse(dane_verify(chain, [record(usage, 1, 1, chain[0])], REFS).passed)

    def test_no_certificate(self) -> None:
        verdict = dane_verify([], [TLSARecord(3, 1, 1, b"\x00" * 32)], REFS)
        self.assertEqual((verdict.passed, verdict.result_type), (False, ResultType.VALIDATION_FAILURE))


class DANETATests(unittest.SynchronousTestCase):
    """RFC 7672 §3.1.2, §3.2.2, §3.2.3: an anchor in the chain, the chain to it, the names."""

    def setUp(self) -> None:
        self.pki = pki()
        self.root_record = record(2, 0, 1, self.pki.dane_root)

    def test_root_in_chain(self) -> None:
        chain = self.pki.dane_issued(HOST).certificates()
        verdict = dane_verify(chain, [self.root_record], REFS)
        self.assertTrue(verdict.passed, verdict)
        self.assertEqual((verdict.reason, verdict.depth, verdict.record), ("dane-ta", 2, self.root_record))

    def test_intermediate_spki(self) -> None:
        """An anchor need not be self-signed (a partial chain), and SPKI(1) works."""
        chain = self.pki.dane_issued(HOST, include_root=False).certificates()
        verdict = dane_verify(chain, [record(2, 1, 2, self.pki.dane_intermediate)], REFS)
        self.assertEqual((verdict.passed, verdict.depth), (True, 1))

    def test_anchor_left_out(self) -> None:
        """A digest of an anchor the server does not present: no match (RFC 7671 §5.2.2)."""
        chain = self.pki.dane_issued(HOST, include_root=False).certificates()
        verdict = dane_verify(chain, [self.root_record], REFS)
        self.assertEqual((verdict.passed, verdict.result_type), (False, ResultType.TLSA_INVALID))

    def test_full_anchor_from_dns(self) -> None:
        """RFC 7671 §5.2.2: with "2 0 0", the anchor may come from DNS only."""
        chain = self.pki.dane_issued(HOST, include_root=False).certificates()
        verdict = dane_verify(chain, [record(2, 0, 0, self.pki.dane_root)], REFS)
        self.assertEqual((verdict.passed, verdict.depth), (True, -1))
        garbage = dane_verify(chain, [TLSARecord(2, 0, 0, b"\x30\x03\x02\x01\x00")], REFS)
        self.assertFalse(garbage.passed)

    def test_leaf_is_no_anchor(self) -> None:
        """A DANE-TA(2) record matching the server's own certificate is no anchor."""
        chain = self.pki.self_signed(HOST).certificates()
        verdict = dane_verify(chain, [record(2, 0, 1, chain[0])], REFS)
        self.assertEqual((verdict.passed, verdict.reason), (False, "tlsa-no-match"))

    def test_forged_chain_with_the_anchor_appended(self) -> None:
        """
        A server presenting its own certificate followed by the real anchor:
        the anchor matches, the chain to it does not verify.
        """
        forged = self.pki.untrusted(HOST).certificates() + [self.pki.dane_root]
        verdict = dane_verify(forged, [self.root_record], REFS)
        self.assertFalse(verdict.passed)
        self.assertEqual(verdict.reason, "dane-ta-chain")
        self.assertEqual(verdict.result_type, ResultType.CERTIFICATE_NOT_TRUSTED)
        self.assertIn("depth", verdict.detail)

    def test_expired(self) -> None:
        """Dates are checked under DANE-TA(2)."""
        chain = self.pki.dane_issued(HOST, not_before=days(-30), not_after=days(-1)).certificates()
        verdict = dane_verify(chain, [self.root_record], REFS)
        self.assertEqual((verdict.passed, verdict.result_type), (False, ResultType.CERTIFICATE_EXPIRED))
        self.assertIn("X509_V_ERR_CERT_HAS_EXPIRED", verdict.detail)
        future = self.pki.dane_issued(HOST, not_before=days(1), not_after=days(30)).certificates()
        self.assertEqual(dane_verify(future, [self.root_record], REFS).result_type, ResultType.CERTIFICATE_EXPIRED)

    def test_when(self) -> None:
        chain = self.pki.dane_issued(HOST).certificates()
        self.assertTrue(dane_verify(chain, [self.root_record], REFS, when=days(1)).passed)
        self.assertFalse(dane_verify(chain, [self.root_record], REFS, when=days(400)).passed)

    def test_name_mismatch(self) -> None:
        chain = self.pki.dane_issued("mx.other.example").certificates()
        verdict = dane_verify(chain, [self.root_record], REFS)
        self.assertFalse(verdict.passed)
        self.assertEqual((verdict.reason, verdict.result_type),
                         ("dane-ta-name-mismatch", ResultType.CERTIFICATE_HOST_MISMATCH))
        self.assertIn("mx.example.com", verdict.detail)

    def test_next_hop_domain_is_a_reference_identifier(self) -> None:
        """RFC 7672 §3.2.2: one certificate naming the mail domain serves every MX host."""
        chain = self.pki.dane_issued("example.com").certificates()
        self.assertTrue(dane_verify(chain, [self.root_record], REFS).passed)
        self.assertFalse(dane_verify(chain, [self.root_record], (HOST,)).passed)

    def test_dane_ee_wins(self) -> None:
        """A DANE-EE(3) match authenticates even when a DANE-TA(2) check would fail."""
        chain = self.pki.dane_issued("mx.other.example").certificates()
        verdict = dane_verify(chain, [self.root_record, record(3, 1, 1, chain[0])], REFS)
        self.assertEqual((verdict.passed, verdict.reason), (True, "dane-ee"))

    def test_several_anchors(self) -> None:
        """Any matching anchor whose chain verifies will do."""
        chain = self.pki.dane_issued(HOST).certificates()
        other_anchor = record(2, 0, 1, self.pki.self_signed("ca.example").certificates()[0])
        verdict = dane_verify(chain, [other_anchor, record(2, 1, 1, self.pki.dane_intermediate)], REFS)
        self.assertEqual((verdict.passed, verdict.depth), (True, 1))


class NameTests(unittest.SynchronousTestCase):
    """RFC 7672 §3.2.3: DNS-IDs, else the CN-ID; wildcards of one whole first label."""

    def names(self, *hosts: str, **kw) -> x509.Certificate:
        return pki().dane_issued(*hosts, **kw).certificates()[0]

    def test_wildcards(self) -> None:
        certificate = self.names("*.example.com")
        self.assertTrue(dane_name_matches(certificate, ["MX.Example.COM."]))
        self.assertFalse(dane_name_matches(certificate, ["a.mx.example.com"]))
        self.assertFalse(dane_name_matches(certificate, ["example.com"]))
        for presented in ("smtp*.example.com", "*smtp.example.com", "*.com", "mx.*.example.com"):
            self.assertFalse(dane_name_matches(self.names(presented), ["mx.example.com", "smtp.example.com",
                                                                       "example.com", "mx.a.example.com"]),
                             presented)

    def test_cn_only_without_dns_ids(self) -> None:
        without_san = self.names(subject_alt_names=False, common_name=HOST)
        self.assertTrue(dane_name_matches(without_san, [HOST]))
        with_san = self.names("other.example", common_name=HOST)
        self.assertFalse(dane_name_matches(with_san, [HOST]))
