"""
A private PKI for tests: a trusted CA and an untrusted one, made with trustme,
issuing the certificates that TLS tests need (valid, expired, not yet valid,
wrong name, untrusted issuer); for DANE, a CA that no client trusts, with an
intermediate, whose chains may carry the root (what DANE-TA(2) servers
present, RFC 7672 §3.1.2), and self-signed certificates (DANE-EE(3)).

Certificates and keys are handed to OpenSSL as C{cryptography} objects:
pyOpenSSL's own C{X509} and C{PKey} are deprecated as arguments of
C{SSL.Context}.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any, Union

import attrs
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
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
        self._dane_cas: tuple[trustme.CA, trustme.CA] | None = None

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

    # -- DANE --

    def _dane(self) -> tuple[trustme.CA, trustme.CA]:
        """The DANE CA's root and intermediate, made on first use (two more keys)."""
        if self._dane_cas is None:
            root = trustme.CA(organization_name="DANE test CA")
            self._dane_cas = (root, root.create_child_ca())
        return self._dane_cas

    @property
    def dane_root(self) -> x509.Certificate:
        """The DANE CA's root: trusted by no client, a DANE-TA(2) anchor."""
        return x509.load_pem_x509_certificate(self._dane()[0].cert_pem.bytes())

    @property
    def dane_intermediate(self) -> x509.Certificate:
        """The DANE CA's intermediate, which issues its leaf certificates."""
        return x509.load_pem_x509_certificate(self._dane()[1].cert_pem.bytes())

    def dane_issued(
        self,
        *hosts: str,
        include_root: bool = True,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        subject_alt_names: bool = True,
        common_name: str | None = None,
    ) -> IssuedCertificate:
        """
        A certificate for C{hosts} from the DANE CA's intermediate: the chain
        is the leaf, the intermediate and (with C{include_root}) the root.

        @param not_before: the start of validity (default: an hour ago).
        @param not_after: its end (default: in a year).
        @param subject_alt_names: C{False} for a certificate with no
            subjectAltName at all, C{common_name} being its only name.
        @param common_name: the subject's CN.
        """
        now = _now()
        issuer_key = serialization.load_pem_private_key(self._dane()[1].private_key_pem.bytes(), password=None)
        assert isinstance(issuer_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = _certificate(
            key, hosts if subject_alt_names else (), common_name, self.dane_intermediate.subject, issuer_key,
            not_before or now - datetime.timedelta(hours=1), not_after or now + datetime.timedelta(days=365),
        )
        chain = [leaf, self.dane_intermediate] + ([self.dane_root] if include_root else [])
        return _issued(chain, key)

    def self_signed(
        self, *hosts: str, not_before: datetime.datetime | None = None, not_after: datetime.datetime | None = None
    ) -> IssuedCertificate:
        """
        A self-signed certificate for C{hosts} (what a DANE-EE(3) server may
        present; RFC 7672 §3.1.1 ignores its names and dates).
        """
        now = _now()
        key = ec.generate_private_key(ec.SECP256R1())
        common_name = hosts[0] if hosts else "self-signed"
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtasts-twisted tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])
        certificate = _certificate(
            key, hosts, common_name, name, key,
            not_before or now - datetime.timedelta(hours=1), not_after or now + datetime.timedelta(days=365),
        )
        return _issued([certificate], key)


def _certificate(
    key: ec.EllipticCurvePrivateKey,
    hosts: tuple[str, ...],
    common_name: str | None,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    """A leaf certificate (names as DNS or IP SANs) signed by C{issuer_key}."""
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtasts-twisted tests")]
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _issued(chain: list[x509.Certificate], key: ec.EllipticCurvePrivateKey) -> IssuedCertificate:
    return IssuedCertificate(
        chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
