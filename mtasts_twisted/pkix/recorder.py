"""
The recording verify callback (L{VerifyRecorder}) and the client
connections built on it (L{client_context}, L{RecordingConnectionCreator}):
OpenSSL's PKIX verdict plus the RFC 6125 host-name check, recording why
verification failed.
"""

from __future__ import annotations

import weakref

from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import extract_patterns
from service_identity.hazmat import DNS_ID, IPAddress_ID, ServiceID, verify_service_identity
from twisted.internet._sslverify import IOpenSSLTrustRoot  # only exported there
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mtasts_twisted.pkix.dane import DANECheck, DANEVerdict, dane_verify
from mtasts_twisted.pkix.errors import classify_verify_error, deciding_verify_error

__all__ = [
    "CertificateVerifyError",
    "RecordingConnectionCreator",
    "VerifyRecorder",
    "certificate_names",
    "client_context",
]

# The namespace of the module this room was cut from, so log lines read as before.
log = Logger(namespace="mtasts_twisted.pkix")


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

    With a L{DANECheck} (RFC 7672 §3), TLSA records replace PKIX and the
    host name: OpenSSL's verify errors are recorded but decide nothing, and
    at the server certificate the chain the server presented is checked by
    L{dane_verify}; a mismatch refuses the handshake when enforcing.

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
    @ivar dane: the L{DANECheck}, or L{None} for PKIX and the host name.
    @ivar dane_verdict: with C{dane}, the L{DANEVerdict} once the server
        certificate was checked.
    """

    def __init__(
        self,
        hostname: str,
        *,
        enforce: bool = True,
        identity: ServiceID | None = None,
        dane: DANECheck | None = None,
    ) -> None:
        """
        @param hostname: the host name (A-labels) or address to check.
        @param enforce: refuse the handshake at the first failure.
        @param identity: the service_identity ID of C{hostname}, when the
            caller made it already (once per host rather than per
            connection).
        @param dane: authenticate by these TLSA records instead (RFC 7672
            §3).
        """
        self.hostname = hostname
        self.enforce = enforce
        self.dane = dane
        self.dane_verdict: DANEVerdict | None = None
        self._identity = identity if identity is not None else _service_id(hostname)
        self.errors: list[tuple[int, int]] = []
        self.leaf: x509.Certificate | None = None
        self._names: tuple[str, ...] | None = None
        self.certificate_checked = False
        self.host_mismatch = False
        self.internal_error = False
        self._refused = False
        #: The connection's TLS protocol until the handshake is over (weak:
        #: the connection must not be kept alive by its callback).
        self._protocol: weakref.ref[TLSMemoryBIOProtocol] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """
        The server certificate's subjectAltName DNS names and addresses
        (L{certificate_names}), empty before it was checked.
        """
        # Read only for reports and messages: computed when first asked,
        # not in every handshake's verify callback.
        if self._names is None:
            if self.leaf is None:
                return ()
            self._names = certificate_names(self.leaf)
        return self._names

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
        if self.dane is not None:
            return (
                self.certificate_checked
                and self.dane_verdict is not None
                and self.dane_verdict.passed
                and not self.internal_error
            )
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
            if self.dane is not None:
                return self._verify_dane(connection, certificate, depth)
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

    def _verify_dane(self, connection: SSL.Connection, certificate: crypto.X509, depth: int) -> bool:
        """
        L{verify} under DANE: nothing but the server certificate's call
        decides, and there the TLSA records do (RFC 7672 §3.2: PKIX errors,
        an untrusted root above all, are no failure).
        """
        assert self.dane is not None
        if depth != 0 or self.certificate_checked:
            return self.dane_verdict is None or self.dane_verdict.passed or not self.enforce
        self.certificate_checked = True
        leaf = self.leaf = certificate.to_cryptography()
        # The chain as the server presented it (RFC 7671 §5.2.2: a DANE-TA
        # anchor is one of its certificates), not as OpenSSL built it.
        chain = connection.get_peer_cert_chain(as_cryptography=True) or [leaf]
        verdict = self.dane_verdict = dane_verify(chain, self.dane.records, self.dane.reference_identifiers)
        if verdict.passed or not self.enforce:
            return True
        self._refuse()
        return False

    def _check_name(self, certificate: crypto.X509) -> None:
        self.certificate_checked = True
        leaf = self.leaf = certificate.to_cryptography()
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
        if self.dane is not None:
            if self.internal_error:
                return "internal error while verifying the certificate"
            if self.dane_verdict is not None:
                return self.dane_verdict.detail
            return "certificate not verified"
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
