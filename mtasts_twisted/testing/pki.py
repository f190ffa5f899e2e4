"""
A private PKI for tests: a trusted CA and an untrusted one, made with trustme,
issuing the certificates that TLS tests need (valid, expired, not yet valid,
wrong name, untrusted issuer).

Certificates and keys are handed to OpenSSL as C{cryptography} objects:
pyOpenSSL's own C{X509} and C{PKey} are deprecated as arguments of
C{SSL.Context}.
"""

from __future__ import annotations

import datetime
from typing import Any, Union

import attrs
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from twisted.internet import ssl

#: The private keys OpenSSL can present (C{SSL.Context.use_privatekey}).
PrivateKey = Union[
    dsa.DSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey,
    rsa.RSAPrivateKey,
]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@attrs.frozen
class IssuedCertificate:
    """A leaf certificate chain and its key, as PEM bytes."""

    chain_pem: bytes
    key_pem: bytes

    def private_certificate(self) -> ssl.PrivateCertificate:
        """Return a Twisted L{ssl.PrivateCertificate} (leaf and key)."""
        return ssl.PrivateCertificate.loadPEM(self.chain_pem + self.key_pem)

    def certificates(self) -> list[x509.Certificate]:
        """The chain: the leaf certificate first, then any intermediates."""
        return x509.load_pem_x509_certificates(self.chain_pem)

    def private_key(self) -> PrivateKey:
        """The leaf's private key."""
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, (dsa.DSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey,
                                ed448.Ed448PrivateKey, rsa.RSAPrivateKey)):
            raise TypeError(f"OpenSSL cannot present a {type(key).__name__}")
        return key

    def server_options(self, **kwargs: Any) -> ssl.CertificateOptions:
        """
        Return server-side TLS options presenting this certificate.

        @param kwargs: more keyword arguments of L{ssl.CertificateOptions}.
        """
        leaf, *intermediates = self.certificates()
        key = self.private_key()
        # CertificateOptions hands these to SSL.Context.use_certificate,
        # use_privatekey and add_extra_chain_cert, which take cryptography
        # objects; Twisted's annotations still name pyOpenSSL's deprecated
        # X509 and PKey.
        return ssl.CertificateOptions(
            certificate=leaf, privateKey=key, extraCertChain=intermediates, **kwargs  # type: ignore[arg-type]
        )


class PKI:
    """
    A trusted CA (C{ca_pem} is what clients trust) and an untrusted CA.

    Certificates are issued on demand; every method returns an
    L{IssuedCertificate}.
    """

    def __init__(self) -> None:
        self._trusted = trustme.CA(organization_name="mtasts-twisted test CA")
        self._untrusted = trustme.CA(organization_name="untrusted test CA")

    @property
    def ca_pem(self) -> bytes:
        """PEM of the trusted CA certificate: give this to clients as roots."""
        return self._trusted.cert_pem.bytes()

    def write_ca_file(self, path: str) -> str:
        """Write the trusted CA to C{path} (for C{--ca-file}); return C{path}."""
        self._trusted.cert_pem.write_to_path(path)
        return path

    def trust_root(self) -> ssl.Certificate:
        """The trusted CA as a Twisted certificate, for C{optionsForClientTLS}."""
        return ssl.Certificate.loadPEM(self.ca_pem)

    def _issue(self, ca: trustme.CA, hosts: tuple[str, ...], **kwargs: Any) -> IssuedCertificate:
        leaf = ca.issue_cert(*hosts, **kwargs)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return IssuedCertificate(chain_pem=chain, key_pem=leaf.private_key_pem.bytes())

    def valid(self, *hosts: str) -> IssuedCertificate:
        """A certificate for C{hosts}, from the trusted CA, valid now."""
        return self._issue(self._trusted, hosts)

    def expired(self, *hosts: str) -> IssuedCertificate:
        """A certificate for C{hosts} from the trusted CA that expired a day ago."""
        now = _now()
        return self._issue(
            self._trusted,
            hosts,
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )

    def not_yet_valid(self, *hosts: str) -> IssuedCertificate:
        """A certificate for C{hosts} from the trusted CA, valid from tomorrow."""
        now = _now()
        return self._issue(
            self._trusted,
            hosts,
            not_before=now + datetime.timedelta(days=1),
            not_after=now + datetime.timedelta(days=30),
        )

    def untrusted(self, *hosts: str) -> IssuedCertificate:
        """A certificate for C{hosts} from a CA that clients do not trust."""
        return self._issue(self._untrusted, hosts)
