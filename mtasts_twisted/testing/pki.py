"""
A private PKI for tests: a trusted CA and an untrusted one, made with trustme,
issuing the certificates that TLS tests need (valid, expired, not yet valid,
wrong name, untrusted issuer).
"""

from __future__ import annotations

import datetime

import attrs
import trustme
from OpenSSL import crypto
from twisted.internet import ssl


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

    def server_options(self, **kwargs) -> ssl.CertificateOptions:
        """Return server-side TLS options presenting this certificate."""
        leaf = crypto.load_certificate(crypto.FILETYPE_PEM, self.chain_pem)
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, self.key_pem)
        return ssl.CertificateOptions(
            certificate=leaf, privateKey=key, extraCertChain=self._intermediates(), **kwargs
        )

    def _intermediates(self) -> list:
        blocks = self.chain_pem.split(b"-----END CERTIFICATE-----")[1:]
        out = []
        for block in blocks:
            if b"BEGIN CERTIFICATE" in block:
                pem = block.strip() + b"\n-----END CERTIFICATE-----\n"
                out.append(crypto.load_certificate(crypto.FILETYPE_PEM, pem))
        return out


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

    def _issue(self, ca: trustme.CA, hosts, **kwargs) -> IssuedCertificate:
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
