"""
Certificate verification shared by every TLS client of the package: the
policy fetch (RFC 8461 §3.3), the MX connections (RFC 8461 §4.1) and the
https report sender (RFC 8460 §5.4).

What they must agree on lives here, once:

  - L{load_trust_roots}: the one reader of trust roots (C{--ca-file}, PEM
    bytes, a certificate, the platform's store).
  - L{classify_verify_error}: the one table from an OpenSSL X.509 verify
    error to the RFC 8460 §4.3.1 result type it counts as (docs/design.rst,
    "TLS failure → RFC 8460 result type"), with L{verify_error_name} and
    L{deciding_verify_error}.
  - L{VerifyRecorder}: the one recording verify callback, one per
    connection: OpenSSL's PKIX verdict plus the RFC 6125 host-name check,
    recording why verification failed (a failed handshake alone only says
    "certificate verify failed").
  - L{client_context} and L{RecordingConnectionCreator}: one OpenSSL context
    built once and shared, with SNI and a L{VerifyRecorder} per connection
    (the policy fetch, the report sender).  C{mtasts_twisted.tls} builds its
    MX connections on L{VerifyRecorder} too.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Iterable, Mapping
from typing import NamedTuple, Union

from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import extract_patterns
from service_identity.hazmat import DNS_ID, IPAddress_ID, ServiceID, verify_service_identity
from twisted.internet._sslverify import IOpenSSLTrustRoot  # only exported there
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mtasts_twisted.results import ResultType

__all__ = [
    "EXPIRED_ERRORS",
    "NOT_TRUSTED_ERRORS",
    "CertificateVerifyError",
    "RecordingConnectionCreator",
    "TrustRootSpec",
    "VerifyErrorClass",
    "VerifyRecorder",
    "certificate_names",
    "classify_verify_error",
    "client_context",
    "deciding_verify_error",
    "load_trust_roots",
    "verify_error_name",
]

log = Logger()


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


# --- OpenSSL verify errors → RFC 8460 ------------------------------------------


class VerifyErrorClass(NamedTuple):
    """
    What an OpenSSL X.509 verify error counts as (a tuple, so it compares
    equal to C{(reason, description)}).

    @ivar reason: the RFC 8460 §4.3.1 result type it counts as, by name:
        C{certificate-expired}, C{certificate-not-trusted} or
        C{validation-failure}.  The policy fetch reports it as the
        failure-reason-code of C{sts-webpki-invalid}; the MX connections as
        the result type itself.
    @ivar description: the error, for people.
    """

    reason: str
    description: str

    @property
    def result_type(self) -> ResultType:
        """L{reason} as a L{ResultType}."""
        return ResultType(self.reason)


_EXPIRED = ResultType.CERTIFICATE_EXPIRED.value
_NOT_TRUSTED = ResultType.CERTIFICATE_NOT_TRUSTED.value

# The one table (docs/design.rst, "TLS failure → RFC 8460 result type").
# Any other error is validation-failure (RFC 8460 §4.3.1).
_VERIFY_ERRORS: Mapping[int, VerifyErrorClass] = {
    2: VerifyErrorClass(_NOT_TRUSTED, "unable to get issuer certificate"),  # UNABLE_TO_GET_ISSUER_CERT
    9: VerifyErrorClass(_EXPIRED, "certificate is not yet valid"),  # CERT_NOT_YET_VALID
    10: VerifyErrorClass(_EXPIRED, "certificate has expired"),  # CERT_HAS_EXPIRED
    18: VerifyErrorClass(_NOT_TRUSTED, "self-signed certificate"),  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: VerifyErrorClass(_NOT_TRUSTED, "self-signed certificate in certificate chain"),  # SELF_SIGNED_CERT_IN_CHAIN
    20: VerifyErrorClass(_NOT_TRUSTED, "unable to get local issuer certificate"),  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: VerifyErrorClass(_NOT_TRUSTED, "unable to verify the first certificate"),  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    27: VerifyErrorClass(_NOT_TRUSTED, "certificate not trusted"),  # CERT_UNTRUSTED
}

#: OpenSSL verify errors classified as certificate-expired (RFC 8460
#: §4.3.1): 9 X509_V_ERR_CERT_NOT_YET_VALID, 10 X509_V_ERR_CERT_HAS_EXPIRED.
EXPIRED_ERRORS = frozenset(n for n, c in _VERIFY_ERRORS.items() if c.reason == _EXPIRED)

#: OpenSSL verify errors classified as certificate-not-trusted (RFC 8460
#: §4.3.1): 2, 18, 19, 20, 21 and 27.
NOT_TRUSTED_ERRORS = frozenset(n for n, c in _VERIFY_ERRORS.items() if c.reason == _NOT_TRUSTED)


def classify_verify_error(code: int) -> VerifyErrorClass:
    """
    Map an OpenSSL X.509 verify error code to the RFC 8460 result type it
    counts as.

    @param code: the C{errno} the OpenSSL verify callback received.
    @return: C{(reason, description)}; C{reason} is C{certificate-expired}
        for 9 and 10, C{certificate-not-trusted} for 2, 18, 19, 20, 21 and
        27, and C{validation-failure} otherwise (docs/design.rst).
    """
    return _VERIFY_ERRORS.get(
        code, VerifyErrorClass(ResultType.VALIDATION_FAILURE.value, f"X.509 verify error {code}")
    )


def deciding_verify_error(errors: Iterable[int]) -> int | None:
    """
    The verify error that decides how a failed chain is reported.

    The most fundamental wins: a chain that does not lead to a trusted root,
    then expiry, then the first other error.  OpenSSL reports them in the
    same order, so a connection that stops at the first error and one that
    records them all agree.

    @param errors: OpenSSL verify error codes, in the order reported.
    @return: one of C{errors}, or L{None} when there is none.
    """
    errors = tuple(errors)
    for reason in (_NOT_TRUSTED, _EXPIRED):
        for code in errors:
            if classify_verify_error(code).reason == reason:
                return code
    return errors[0] if errors else None


def _verify_error_names() -> dict[int, str]:
    # pyOpenSSL's public X509VerificationCodes holds the X509_V_ERR_*
    # numbers of the OpenSSL it was built with; name each after its symbol.
    names: dict[int, str] = {}
    for attribute in dir(SSL.X509VerificationCodes):
        if attribute.startswith("ERR_"):
            value = getattr(SSL.X509VerificationCodes, attribute)
            if isinstance(value, int):
                names.setdefault(value, "X509_V_" + attribute)
    return names


_VERIFY_ERROR_NAMES: Mapping[int, str] = _verify_error_names()


def verify_error_name(errnum: int) -> str:
    """
    Return the OpenSSL symbol of verify error C{errnum}, e.g.
    C{"X509_V_ERR_CERT_REVOKED"} for 23, or C{"x509-verify-error-N"} for a
    number this pyOpenSSL does not name.
    """
    return _VERIFY_ERROR_NAMES.get(errnum, f"x509-verify-error-{errnum}")


# --- certificates ------------------------------------------------------------


def certificate_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """
    The DNS names, then the IP addresses, of C{certificate}'s
    subjectAltName (empty without one).
    """
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(names)


def _dns_names(certificate: x509.Certificate) -> str:
    """The certificate's DNS names, for messages."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    names = san.value.get_values_for_type(x509.DNSName)
    return "names " + ", ".join(names[:10]) if names else "no DNS names"


def _service_id(hostname: str) -> ServiceID | None:
    """
    The identity a certificate must match (RFC 6125): a DNS-ID for a name,
    an IP-ID for an address literal; L{None} for a name service_identity
    refuses (the check then fails as C{verify_certificate_hostname} would,
    by raising).
    """
    try:
        if isIPAddress(hostname) or isIPv6Address(hostname):
            return IPAddress_ID(hostname)
        return DNS_ID(hostname)
    except ValueError:
        return None


# --- the recording verify callback ---------------------------------------------


class CertificateVerifyError(Exception):
    """
    A certificate was refused by a L{VerifyRecorder}; the reason handed to
    the connection's C{connectionLost}.

    @ivar hostname: the host the certificate was checked for.
    @ivar detail: why, as L{VerifyRecorder.describe} says.
    """

    def __init__(self, hostname: str, detail: str) -> None:
        super().__init__(hostname, detail)
        self.hostname = hostname
        self.detail = detail

    def __str__(self) -> str:
        return f"TLS verification of {self.hostname} failed: {self.detail}"


class VerifyRecorder:
    """
    The recording verify callback of one TLS client connection.

    OpenSSL calls L{verify} for every certificate of the chain, the server's
    own (depth 0) last.  It records each verify error with its depth and
    checks the server certificate against the host name (RFC 6125 via
    service_identity; RFC 8461 §3.3 for policy hosts, §4.1 for MX hosts).
    When C{enforce} is set the first failure refuses the handshake: the
    protocol is handed the reason of L{refusal} (as Twisted's own verify
    callback does) and OpenSSL aborts.  Otherwise every failure is only
    recorded and the handshake goes on.

    The callback runs inside OpenSSL: it never raises.  Should our code
    raise, the failure is logged, L{internal_error} is set and, when
    enforcing, the handshake is refused.

    @ivar hostname: the host name (A-labels) or address checked.
    @ivar enforce: whether a failure refuses the handshake.
    @ivar errors: every C{(depth, errnum)} OpenSSL reported, in order.
    @ivar leaf: the server certificate, once it was checked.
    @ivar names: its subjectAltName DNS names and addresses
        (L{certificate_names}).
    @ivar certificate_checked: whether the server certificate was checked
        (false when the handshake failed before any certificate).
    @ivar host_mismatch: whether it is not valid for C{hostname}.
    @ivar internal_error: our verify code raised (logged).
    """

    def __init__(self, hostname: str, *, enforce: bool = True, identity: ServiceID | None = None) -> None:
        """
        @param hostname: the host name (A-labels) or address to check.
        @param enforce: refuse the handshake at the first failure.
        @param identity: the service_identity ID of C{hostname}, when the
            caller made it already (once per host rather than per
            connection).
        """
        self.hostname = hostname
        self.enforce = enforce
        self._identity = identity if identity is not None else _service_id(hostname)
        self.errors: list[tuple[int, int]] = []
        self.leaf: x509.Certificate | None = None
        self.names: tuple[str, ...] = ()
        self.certificate_checked = False
        self.host_mismatch = False
        self.internal_error = False
        self._refused = False
        #: The connection's TLS protocol until the handshake is over (weak:
        #: the connection must not be kept alive by its callback).
        self._protocol: weakref.ref[TLSMemoryBIOProtocol] | None = None

    def attach(self, connection: SSL.Connection, tlsProtocol: TLSMemoryBIOProtocol) -> None:
        """
        Install L{verify} as C{connection}'s verify callback.

        Per connection (pyOpenSSL Connection.set_verify): the SSL.Context is
        shared by many connections and pyOpenSSL refuses to change a used
        one.  It replaces whatever callback the context or
        C{optionsForClientTLS} installed (Twisted 26.4+ checks the name in
        its own verify callback).

        @param tlsProtocol: the connection's C{TLSMemoryBIOProtocol}, told
            the reason when the certificate is refused.
        """
        self._protocol = weakref.ref(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self.verify)

    @property
    def passed(self) -> bool:
        """
        Whether the server certificate was checked and nothing failed (the
        handshake may still be under way or have failed otherwise).
        """
        return (
            self.certificate_checked
            and not self.errors
            and not self.host_mismatch
            and not self.internal_error
        )

    def verify(
        self,
        connection: SSL.Connection,
        certificate: crypto.X509,
        errnum: int,
        depth: int,
        ok: int,
    ) -> bool:
        """
        The OpenSSL verify callback (pyOpenSSL C{set_verify} signature).

        @return: whether OpenSSL goes on with the handshake.
        """
        try:
            if not ok:
                self.errors.append((depth, errnum))
            if depth == 0 and not self.certificate_checked:
                self._check_name(certificate)
            failed = not ok or (depth == 0 and self.host_mismatch)
            if not self.enforce:
                return True
            if failed:
                self._refuse()
            return not failed
        except BaseException:
            # An exception escaping an OpenSSL callback would be lost.
            log.failure("while verifying the certificate of {hostname}", hostname=self.hostname)
            self.internal_error = True
            if self.enforce:
                self._refuse()
                return False
            return True

    def _check_name(self, certificate: crypto.X509) -> None:
        self.certificate_checked = True
        leaf = self.leaf = certificate.to_cryptography()
        self.names = certificate_names(leaf)
        # RFC 6125: SAN dNSName (or iPAddress) only
        # (= service_identity's verify_certificate_hostname).
        identity = self._identity if self._identity is not None else DNS_ID(self.hostname)
        try:
            verify_service_identity(extract_patterns(leaf), [identity], [])
        except (VerificationError, CertificateError):
            self.host_mismatch = True

    def _refuse(self) -> None:
        # As Twisted's own verify callback does: hand the protocol a reason
        # for connectionLost, then let OpenSSL abort the handshake.
        if self._refused:
            return
        self._refused = True
        protocol = self._protocol() if self._protocol is not None else None
        self._protocol = None
        reason = self.refusal()
        if protocol is not None:
            protocol.failVerification(Failure(reason))

    def refusal(self) -> Exception:
        """
        The reason a refused handshake fails with; called once, at the
        first failure when enforcing.  Subclasses may say more.
        """
        return CertificateVerifyError(self.hostname, self.describe())

    def deciding_error(self) -> tuple[int, int] | None:
        """
        The C{(depth, errnum)} that decides how the chain's failure is
        reported (L{deciding_verify_error}), or L{None} without errors.
        """
        errnum = deciding_verify_error(e for _, e in self.errors)
        if errnum is None:
            return None
        return next(pair for pair in self.errors if pair[1] == errnum)

    def describe(self) -> str:
        """Why verification failed, for people (e.g. an error's detail)."""
        deciding = self.deciding_error()
        if deciding is not None:
            depth, errnum = deciding
            where = "certificate" if depth == 0 else f"certificate at chain depth {depth}"
            return f"{where}: {classify_verify_error(errnum).description} (X.509 error {errnum})"
        if self.host_mismatch and self.leaf is not None:
            return f"certificate is not valid for {self.hostname} ({_dns_names(self.leaf)})"
        if self.internal_error:
            return "internal error while verifying the certificate"
        return "certificate not verified"


# --- one context, a recorder per connection ---------------------------------------


def client_context(trust_root: IOpenSSLTrustRoot) -> SSL.Context:
    """
    An OpenSSL client context for L{RecordingConnectionCreator}s, to build
    once and share (per fetcher, per report sender).

    Building one costs C{SSL_CTX_new}, the cipher list and loading the trust
    roots (milliseconds for a platform store of a few hundred roots): per
    connection, that was the largest part of a cold policy lookup's CPU.
    Everything per host (SNI, the verify callback with its host-name check)
    is set on each connection instead.

    @param trust_root: from L{load_trust_roots}.
    """
    options = CertificateOptions(
        trustRoot=trust_root,
        # RFC 8461 §3.3 wants HTTPS; docs/design.rst: TLS 1.2 or newer.
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    # Verification is set on the context too (VERIFY_PEER and the roots);
    # each connection replaces the callback with its own.
    return options.getContext()


@implementer(IOpenSSLClientConnectionCreator)
class RecordingConnectionCreator:
    """
    Client connections to one host on a shared context (L{client_context}):
    SNI (RFC 6066 §3) for a host name, and a L{VerifyRecorder} per
    connection that refuses any certificate failing PKIX validation or not
    valid for the host.

    @ivar hostname: the host (A-labels) or address literal.
    @ivar recorders: one L{VerifyRecorder} per connection made, oldest first.
    """

    def __init__(self, hostname: str, context: SSL.Context) -> None:
        """
        @param hostname: the host name, in A-labels (so ASCII), or an IP
            address literal (then no SNI is sent, as Twisted does).
        @param context: from L{client_context}.
        """
        self.hostname = hostname
        literal = isIPAddress(hostname) or isIPv6Address(hostname)
        self._server_name = None if literal else hostname.encode("ascii")
        # What service_identity's verify_certificate_hostname builds per
        # call (an IDNA check of the name): once per host instead.
        self._identity = _service_id(hostname)
        self._context = context
        self.recorders: list[VerifyRecorder] = []

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        Make the L{SSL.Connection} for one TLS client connection
        (L{IOpenSSLClientConnectionCreator}).
        """
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._server_name is not None:
            # RFC 8461 §3.3 (RFC 6066 §3): SNI with the host's name.
            connection.set_tlsext_host_name(self._server_name)
        recorder = VerifyRecorder(self.hostname, identity=self._identity)
        recorder.attach(connection, tlsProtocol)
        self.recorders.append(recorder)
        return connection

