"""
The server TLS of the relay intake's STARTTLS (RFC 3207), from
C{--smtp-tls-cert} and C{--smtp-tls-key}: L{load_smtp_tls}.  Without it the
intake offers no STARTTLS, and so no REQUIRETLS (RFC 8689 §2).
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

__all__ = ["load_smtp_tls"]


def load_smtp_tls(cert_file: str, key_file: str) -> Any:
    """
    The server TLS context factory of the relay intake's STARTTLS (RFC
    3207): the certificate (the first in C{cert_file}, the rest its
    chain) and its private key, TLS 1.2 at least.

    @return: a C{twisted.internet.ssl.CertificateOptions}.
    @raise usage.UsageError: one line: a file that cannot be read, holds
        no certificate or key, or a key that does not match.
    """
    from cryptography import x509
    from OpenSSL import SSL, crypto
    from twisted.internet.ssl import CertificateOptions, TLSVersion

    def read(option: str, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise usage.UsageError(f"--{option} {path}: cannot read it: {e.strerror}") from None

    cert_pem, key_pem = read("smtp-tls-cert", cert_file), read("smtp-tls-key", key_file)
    try:
        chain = [crypto.X509.from_cryptography(c) for c in x509.load_pem_x509_certificates(cert_pem)]
    except ValueError:
        raise usage.UsageError(f"--smtp-tls-cert {cert_file}: no PEM certificate in it") from None
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error:
        raise usage.UsageError(f"--smtp-tls-key {key_file}: no PEM private key in it") from None
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.use_certificate(chain[0])
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error:
        raise usage.UsageError(
            f"--smtp-tls-key {key_file}: does not match the certificate in --smtp-tls-cert {cert_file}"
        ) from None
    return CertificateOptions(
        privateKey=key, certificate=chain[0], extraCertChain=chain[1:], raiseMinimumTo=TLSVersion.TLSv1_2
    )
