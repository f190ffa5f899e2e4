"""
The one reader of trust roots (C{--ca-file}, PEM bytes, a certificate, the
platform's store) for every TLS client of the package.
"""

from __future__ import annotations

import os
import re
from typing import Union

from cryptography import x509
from OpenSSL import crypto
from twisted.internet._sslverify import IOpenSSLTrustRoot  # only exported there
from twisted.internet.ssl import Certificate, platformTrust, trustRootFromCertificates

__all__ = ["TrustRootSpec", "load_trust_roots"]


# --- trust roots -------------------------------------------------------------

#: What L{load_trust_roots} takes.
TrustRootSpec = Union[Certificate, bytes, str, "os.PathLike[str]", IOpenSSLTrustRoot, None]

# RFC 7468 §5.1 "CERTIFICATE"; "X509 CERTIFICATE" is the legacy label of
# RFC 7468 §5.3 that OpenSSL and cryptography also read.
_PEM_CERTIFICATE_BEGIN = re.compile(rb"-----BEGIN (?:X509 )?CERTIFICATE-----")


def load_trust_roots(roots: TrustRootSpec = None) -> IOpenSSLTrustRoot:
    """
    Make the trust roots for certificate verification (policy hosts, MX
    hosts, https report endpoints) from what a caller or C{--ca-file} gives.

    PEM is read as RFC 7468 describes (whitespace within the base64 ignored,
    the legacy C{X509 CERTIFICATE} label accepted, other blocks such as keys
    skipped), and strictly: every certificate block must be complete and
    parse, so a truncated or damaged file is an error rather than fewer
    roots.

    @param roots: L{None} for the platform's roots (L{platformTrust}); PEM
        C{bytes} holding one or more certificates; a path (L{str} or
        path-like) to such a PEM file; a Twisted L{Certificate}; anything
        else is taken for an C{IOpenSSLTrustRoot} (such as the result of
        L{trustRootFromCertificates}) and returned unchanged.
    @return: an C{IOpenSSLTrustRoot} for C{optionsForClientTLS} or
        L{client_context}.
    @raise ValueError: the PEM holds no certificate, or a certificate block
        that is incomplete or does not parse.
    @raise OSError: the file cannot be read.
    """
    if roots is None:
        return platformTrust()
    if isinstance(roots, Certificate):
        return trustRootFromCertificates([roots])
    if isinstance(roots, (str, os.PathLike)):
        with open(roots, "rb") as f:
            roots = f.read()
    if not isinstance(roots, bytes):
        return roots  # already a trust root (IOpenSSLTrustRoot)
    blocks = len(_PEM_CERTIFICATE_BEGIN.findall(roots))
    if not blocks:
        raise ValueError("no PEM certificate found in trust roots")
    try:
        certificates = x509.load_pem_x509_certificates(roots)
    except ValueError as e:
        detail = " ".join(str(e).split())  # one line (usage errors are)
        raise ValueError(f"invalid PEM certificate in trust roots: {detail}") from None
    if len(certificates) < blocks:
        raise ValueError(
            f"incomplete PEM certificate in trust roots: {blocks} begun, {len(certificates)} complete"
        )
    return trustRootFromCertificates(
        [Certificate(crypto.X509.from_cryptography(c)) for c in certificates]
    )
