"""
DANE authentication of an SMTP server's certificate chain (RFC 7672 §3,
RFC 6698 §2.1, RFC 7671 §5): pure functions of C{cryptography}
certificates and L{TLSARecord}s, with OpenSSL's path validation for
DANE-TA(2) chains.

  - DANE-EE(3): the server's own certificate (or its public key) matches a
    record; names and validity dates are not checked (§3.1.1, §3.2.1).
  - DANE-TA(2): a certificate of the presented chain matches a record and
    is the trust anchor: the chain from the server's certificate up to it
    must verify (signatures, CA constraints, validity dates, RFC 5280) and
    the server's certificate must bear one of the reference identifiers
    (§3.1.2, §3.2.2, §3.2.3).  A "2 0 0" record carries the whole anchor,
    which the server may then leave out of its chain (RFC 7671 §5.2.2).

Which records are usable, and which of those to match, is
L{mtasts_twisted.dane}'s question: records here that are not DANE-TA(2) or
DANE-EE(3) with a known selector and matching type never match.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from mtasts_twisted.dns import TLSARecord
from mtasts_twisted.pkix.errors import classify_verify_error, verify_error_name
from mtasts_twisted.results import ResultType

__all__ = [
    "DANECheck",
    "DANEVerdict",
    "dane_name_matches",
    "dane_verify",
    "subject_public_key_info",
    "tlsa_association_data",
    "tlsa_matches",
]

_DANE_TA, _DANE_EE = 2, 3
_CERT, _SPKI = 0, 1
_FULL, _SHA2_256, _SHA2_512 = 0, 1, 2


# --- what a record is compared with (RFC 6698 §2.1.2, §2.1.3) ---------------


def subject_public_key_info(certificate: x509.Certificate) -> bytes:
    """
    The certificate's SubjectPublicKeyInfo exactly as encoded in it (DER):
    what selector SPKI(1) matches (RFC 6698 §2.1.2).  Taken from the
    TBSCertificate rather than re-encoded from the parsed key, so that an
    unusual but valid encoding still matches its digest.

    @raise ValueError: the TBSCertificate is not the DER RFC 5280 §4.1 says.
    """
    tbs = certificate.tbs_certificate_bytes
    tag, start, end = _der_element(tbs, 0)
    if tag != 0x30 or end != len(tbs):
        raise ValueError("TBSCertificate is not one DER SEQUENCE")
    pos = start
    tag, _, after = _der_element(tbs, pos)
    if tag == 0xA0:  # [0] EXPLICIT version
        pos = after
    # serialNumber, signature, issuer, validity, subject, then the SPKI.
    for _ in range(5):
        pos = _der_element(tbs, pos)[2]
    tag, _, after = _der_element(tbs, pos)
    if tag != 0x30:
        raise ValueError("no SubjectPublicKeyInfo SEQUENCE where RFC 5280 puts it")
    return tbs[pos:after]


def _der_element(data: bytes, pos: int) -> tuple[int, int, int]:
    """C{(tag, content start, end)} of the DER element at C{data[pos]}."""
    if pos + 2 > len(data):
        raise ValueError("DER element past the end")
    tag, first = data[pos], data[pos + 1]
    if first < 0x80:
        start, length = pos + 2, first
    else:
        octets = first & 0x7F
        if not 1 <= octets <= 4:
            raise ValueError("DER length out of range")
        start = pos + 2 + octets
        length = int.from_bytes(data[pos + 2 : start], "big")
    if start + length > len(data):
        raise ValueError("DER element past the end")
    return tag, start, start + length


def tlsa_association_data(certificate: x509.Certificate, selector: int, mtype: int) -> bytes | None:
    """
    The certificate association data a TLSA record with C{selector} and
    C{mtype} would carry for C{certificate} (RFC 6698 §2.1): the whole
    certificate (0) or its SubjectPublicKeyInfo (1), as is (0), or its
    SHA2-256 (1) or SHA2-512 (2) digest.

    @return: the data, or L{None} for a selector or matching type not
        defined there.
    """
    if selector == _CERT:
        selected = certificate.public_bytes(serialization.Encoding.DER)
    elif selector == _SPKI:
        selected = subject_public_key_info(certificate)
    else:
        return None
    if mtype == _FULL:
        return selected
    if mtype == _SHA2_256:
        return hashlib.sha256(selected).digest()
    if mtype == _SHA2_512:
        return hashlib.sha512(selected).digest()
    return None


def tlsa_matches(record: TLSARecord, certificate: x509.Certificate) -> bool:
    """Whether C{certificate} matches C{record}'s selector, matching type and data."""
    return tlsa_association_data(certificate, record.selector, record.mtype) == record.data


# --- reference identifiers (RFC 7672 §3.2.3) ---------------------------------


def dane_name_matches(certificate: x509.Certificate, reference_identifiers: Sequence[str]) -> bool:
    """
    Whether C{certificate} bears one of C{reference_identifiers} (RFC 7672
    §3.2.3): its subjectAltName DNS-IDs when it has any, else its subject's
    CN-IDs; a wildcard only as the whole first label, matching exactly one
    label (the local policy §3.2.3 allows us to choose).

    @param reference_identifiers: host names (A-labels, any case).
    """
    references = [r.lower().rstrip(".") for r in reference_identifiers]
    return any(_name_matches(p, r) for p in _presented_names(certificate) for r in references)


def _presented_names(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_ids = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_ids = []
    if dns_ids:
        return [name.lower().rstrip(".") for name in dns_ids]
    # RFC 7672 §3.2.3: the CN-ID only when there is no DNS-ID.
    return [
        attribute.value.lower().rstrip(".")
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if isinstance(attribute.value, str)
    ]


def _name_matches(presented: str, reference: str) -> bool:
    if not presented or not reference:
        return False
    if presented.startswith("*."):
        rest = presented[2:]
        first, dot, remainder = reference.partition(".")
        # The wildcard is the whole first label and stands for exactly one
        # non-empty label; at least two labels must follow it.
        return bool(first) and bool(dot) and "." in rest and "*" not in rest and remainder == rest
    return "*" not in presented and presented == reference


# --- the verdict -------------------------------------------------------------


def _tuple(value: Sequence[object]) -> tuple[object, ...]:
    return tuple(value)


@attrs.frozen
class DANECheck:
    """
    What a TLS connection authenticated by DANE checks its server against:
    the arguments of L{dane_verify} known before the handshake.

    @ivar records: the usable TLSA records (non-empty).
    @ivar reference_identifiers: the names a DANE-TA(2) chain's server
        certificate may bear, the TLSA base domain first (RFC 7672 §3.2.2).
    """

    records: tuple[TLSARecord, ...] = attrs.field(converter=_tuple)
    reference_identifiers: tuple[str, ...] = attrs.field(converter=_tuple)

    @records.validator
    def _non_empty(self, attribute: object, value: tuple[TLSARecord, ...]) -> None:
        if not value:
            # Nothing to authenticate by is never "authenticated".
            raise ValueError("DANE authentication needs at least one usable TLSA record")



@attrs.frozen
class DANEVerdict:
    """
    Whether a certificate chain is authenticated by TLSA records.

    @ivar passed: it is.
    @ivar record: the record that authenticated it (or, failing, the
        DANE-TA(2) record whose anchor was found), else L{None}.
    @ivar depth: where in the chain C{record} matched (0: the server's
        certificate), or L{None}; C{-1} for an anchor from a "2 0 0"
        record that the chain left out.
    @ivar result_type: for a failure, the RFC 8460 §4.3 result type:
        C{tlsa-invalid} when no record matches the chain,
        C{certificate-expired} / C{certificate-not-trusted} /
        C{validation-failure} when the chain does not verify to a
        DANE-TA(2) anchor (the one table of L{classify_verify_error}),
        C{certificate-host-mismatch} when it does but the names do not
        match.
    @ivar reason: a short stable code (C{dane-ee}, C{dane-ta},
        C{tlsa-no-match}, C{dane-ta-chain}, C{dane-ta-name-mismatch}).
    @ivar detail: for people.
    """

    passed: bool
    reason: str
    detail: str
    record: TLSARecord | None = None
    depth: int | None = None
    result_type: ResultType | None = None


def dane_verify(
    chain: Sequence[x509.Certificate],
    records: Sequence[TLSARecord],
    reference_identifiers: Sequence[str],
    when: datetime.datetime | None = None,
) -> DANEVerdict:
    """
    Authenticate a server's certificate chain with TLSA records (RFC 7672
    §3.2): a DANE-EE(3) match first, then each DANE-TA(2) anchor.

    @param chain: the certificates as the server presented them, its own
        first.
    @param records: the usable records (L{mtasts_twisted.dane.select_records}).
    @param reference_identifiers: the names a DANE-TA(2) chain's server
        certificate may bear (L{DANEStatus.reference_identifiers
        <mtasts_twisted.dane.DANEStatus.reference_identifiers>}): the TLSA
        base domain first.
    @param when: the time validity dates are checked at (DANE-TA(2) only);
        now when L{None}.
    @return: a L{DANEVerdict}.
    """
    if not chain:
        return DANEVerdict(False, "tlsa-no-match", "no certificate presented",
                           result_type=ResultType.VALIDATION_FAILURE)
    leaf = chain[0]
    for record in records:
        # RFC 7672 §3.1.1, §3.2.1: the server's own certificate; no names,
        # no dates.
        if record.usage == _DANE_EE and tlsa_matches(record, leaf):
            return DANEVerdict(True, "dane-ee", "server certificate matches a DANE-EE(3) record", record, 0)
    failures: list[DANEVerdict] = []
    for record in records:
        if record.usage != _DANE_TA:
            continue
        # RFC 7671 §5.2.2: the anchor is a CA certificate of the chain
        # (not the server's own), or the whole certificate of a "2 0 0"
        # record, which the chain may leave out.
        anchors = [(depth, c) for depth, c in enumerate(chain) if depth > 0 and tlsa_matches(record, c)]
        if not anchors and record.selector == _CERT and record.mtype == _FULL:
            try:
                anchors = [(-1, x509.load_der_x509_certificate(record.data))]
            except ValueError:
                anchors = []
        for depth, anchor in anchors:
            verdict = _verify_to_anchor(chain, depth, anchor, record, reference_identifiers, when)
            if verdict.passed:
                return verdict
            failures.append(verdict)
    if failures:
        # The most telling: a chain that verified but bears no reference
        # identifier, else the first chain failure.
        return next((f for f in failures if f.reason == "dane-ta-name-mismatch"), failures[0])
    return DANEVerdict(False, "tlsa-no-match", "no TLSA record matches the presented certificates",
                       result_type=ResultType.TLSA_INVALID)


def _verify_to_anchor(
    chain: Sequence[x509.Certificate],
    depth: int,
    anchor: x509.Certificate,
    record: TLSARecord,
    reference_identifiers: Sequence[str],
    when: datetime.datetime | None,
) -> DANEVerdict:
    """Check the chain up to a DANE-TA(2) anchor, then the names (RFC 7672 §3.2.2)."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(anchor))
    # The anchor need not be self-signed: it is trusted as is (RFC 7671
    # §5.2), as OpenSSL's own DANE support does with a partial chain.
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    store.set_time(when or datetime.datetime.now(datetime.timezone.utc))
    below = chain[1:depth] if depth > 0 else chain[1:]
    context = crypto.X509StoreContext(
        store, crypto.X509.from_cryptography(chain[0]), [crypto.X509.from_cryptography(c) for c in below]
    )
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as e:
        code, error_depth = int(e.errors[0]), int(e.errors[1])
        kind = classify_verify_error(code)
        return DANEVerdict(
            False, "dane-ta-chain",
            f"chain to the DANE-TA(2) anchor at depth {depth} does not verify: certificate at depth"
            f" {error_depth}: {kind.description} ({verify_error_name(code)})",
            record, depth, kind.result_type,
        )
    if not dane_name_matches(chain[0], reference_identifiers):
        return DANEVerdict(
            False, "dane-ta-name-mismatch",
            f"server certificate names none of {', '.join(reference_identifiers)} (DANE-TA(2) name checks)",
            record, depth, ResultType.CERTIFICATE_HOST_MISMATCH,
        )
    return DANEVerdict(True, "dane-ta", f"chain verifies to a DANE-TA(2) anchor at depth {depth}", record, depth)
