"""
Client TLS for MX hosts that verifies I{and} records why verification failed.

RFC 8461 §4.1 requires the MX host's certificate to chain to a trusted root
and to be valid for the MX host name (RFC 6125; not for the recipient
domain), and RFC 8460 §4.3 wants a failure reported by kind:
certificate-expired, certificate-not-trusted, certificate-host-mismatch or
validation-failure.  L{twisted.internet.ssl.optionsForClientTLS} verifies,
but a failed connection only says "certificate verify failed".  So
L{MXConnectionCreator} wraps it: each connection it makes gets a
L{TLSOutcomeRecorder} of its own, the package's recording verify callback
(L{mtasts_twisted.pkix.VerifyRecorder}: the OpenSSL verify error numbers
with their depth and the service_identity outcome) plus an info callback
that records the TLS version, the cipher and any TLS alert, one per
C{clientConnectionForTLS} call.  L{TLSOutcome.classify} maps that record
to an RFC 8460 result type per docs/design.rst.

Three modes (L{VerifyMode}):

  - C{VERIFY} (policy mode C{enforce}): the first verification failure
    aborts the handshake; the connection is lost with a
    L{TLSVerificationError} that carries the L{TLSOutcome}.
  - C{RECORD_ONLY} (C{testing}, C{none}, no policy: opportunistic TLS): the
    handshake completes whatever the certificate; the outcome says
    C{verified=False} and why.
  - C{DANE} (a host with usable secure TLSA records, RFC 7672 §3): the
    TLSA records of a L{DANECheck} authenticate the presented chain instead
    of PKIX and the host name (L{mtasts_twisted.pkix.dane_verify}); a
    mismatch aborts the handshake as in C{VERIFY}; SNI is the TLSA base
    domain (C{server_name}, §8.1).

How delivery uses it (L{mtasts_twisted.delivery.Deliverer}, over its own
SMTP client protocol)::

    options = MXTLSOptionsCache(load_trust_root(ca_file))  # once per Deliverer
    # per session, after the MX host's 220 to STARTTLS:
    creator = options.creator(
        mx_host, VerifyMode.VERIFY if enforce else VerifyMode.RECORD_ONLY)
    transport.startTLS(creator)
    # after the EHLO that follows (or its failure):
    outcome = creator.outcome()             # None: TLS never started
    details = outcome.failure_details(ip)   # None if verified

The OpenSSL context is cached per MX host (L{MXTLSOptionsCache}); the
creator, and so the recorder, is per session.  STARTTLS not offered or
refused, and an MX host outside the policy, are reported by
L{mtasts_twisted.delivery.details}: they are not TLS outcomes.

twisted.mail's C{ESMTPSenderFactory} takes an L{MXConnectionCreator} as
its C{contextFactory} (C{ESMTPClient.esmtpState_starttls} hands it to
C{transport.startTLS}; tests/test_tls.py does so): a refused certificate
then fails the sender with an C{SMTPConnectError} whose C{__cause__} is the
L{TLSVerificationError}; a 454 to STARTTLS fails it with a
C{twisted.mail.smtp.TLSError} even when TLS is not required (RFC 3207 §4
leaves going on without TLS to the client).  L{mtasts_twisted.twistedmail}
is the hook that does this for twisted.mail users: per MX host the
planner's decision, a creator per connection
(L{SessionAttempt<mtasts_twisted.twistedmail.SessionAttempt>}), and
twisted.mail's outcomes turned into TLSRPT results
(L{classify<mtasts_twisted.twistedmail.classify>}).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Mapping

import attrs
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from mtasts_twisted.pkix import (
    DANECheck,
    DANEVerdict,
    TrustRootSpec,
    VerifyRecorder,
    classify_verify_error,
    deciding_verify_error,
    load_trust_roots,
    verify_error_name,
)
from mtasts_twisted.results import FailureDetails, ResultType

__all__ = [
    "MXConnectionCreator",
    "MXTLSOptionsCache",
    "TLSOutcome",
    "TLSOutcomeRecorder",
    "TLSVerificationError",
    "VerifyMode",
    "load_trust_root",
]

log = Logger()

#: L{mtasts_twisted.pkix.load_trust_roots}, under the name delivery imports.
load_trust_root = load_trust_roots


# RFC 8446 §6 / RFC 5246 §7.2 AlertDescription values.
_ALERT_NAMES: Mapping[int, str] = {
    0: "close-notify",
    10: "unexpected-message",
    20: "bad-record-mac",
    22: "record-overflow",
    40: "handshake-failure",
    42: "bad-certificate",
    43: "unsupported-certificate",
    44: "certificate-revoked",
    45: "certificate-expired",
    46: "certificate-unknown",
    47: "illegal-parameter",
    48: "unknown-ca",
    49: "access-denied",
    50: "decode-error",
    51: "decrypt-error",
    70: "protocol-version",
    71: "insufficient-security",
    80: "internal-error",
    86: "inappropriate-fallback",
    90: "user-canceled",
    109: "missing-extension",
    110: "unsupported-extension",
    112: "unrecognized-name",
    113: "bad-certificate-status-response",
    115: "unknown-psk-identity",
    116: "certificate-required",
    120: "no-application-protocol",
}


class VerifyMode(enum.Enum):
    """
    What a failed verification does to the connection.

    @cvar VERIFY: abort the handshake (policy mode C{enforce}, RFC 8461 §5).
    @cvar RECORD_ONLY: complete the handshake and record the failure
        (C{testing}, C{none} and no policy: opportunistic TLS, RFC 8461 §5).
    @cvar DANE: authenticate by the host's TLSA records instead of PKIX
        and names (RFC 7672 §3), and abort the handshake on a mismatch.
    """

    VERIFY = "verify"
    RECORD_ONLY = "record-only"
    DANE = "dane"


def _ascii_hostname(hostname: str) -> str:
    hostname = hostname.rstrip(".").lower()
    try:
        hostname.encode("ascii")
    except UnicodeEncodeError:
        import idna

        return idna.encode(hostname, uts46=True).decode("ascii")
    return hostname


@attrs.frozen
class TLSOutcome:
    """
    What happened on one TLS connection to an MX host.

    Take it after the handshake completed or the connection ended; while a
    handshake is in progress it shows the handshake as failed.

    @ivar hostname: the MX host name the certificate was checked against
        (the SNI name; A-labels).
    @ivar mode: the L{VerifyMode} of the connection.
    @ivar handshake_completed: whether the TLS handshake finished.
    @ivar tls_version: e.g. C{"TLSv1.3"}, when the handshake finished.
    @ivar cipher: the cipher suite's OpenSSL name, when it finished.
    @ivar peer_certificate_names: the DNS names and IP addresses in the
        server certificate's subjectAltName.
    @ivar verify_errors: the distinct OpenSSL verify errors (X509_V_ERR_*
        numbers), in the order OpenSSL reported them.
    @ivar verify_error_depths: every C{(depth, errnum)} OpenSSL reported;
        depth 0 is the server's own certificate.
    @ivar certificate_checked: whether the server certificate's name was
        checked (false when the handshake failed before any certificate).
    @ivar host_mismatch: whether service_identity found the certificate not
        valid for C{hostname} (RFC 6125; RFC 8461 §4.1).
    @ivar alerts: TLS alerts as C{"sent:<name>"} / C{"received:<name>"}.
    @ivar internal_error: our verify code raised (logged); never verified.
    @ivar dane_verdict: under L{VerifyMode.DANE}, the TLSA records' verdict
        on the presented chain (RFC 7672 §3), once it was checked; the
        OpenSSL verify errors then decide nothing.
    """

    hostname: str
    mode: VerifyMode
    handshake_completed: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    peer_certificate_names: tuple[str, ...] = ()
    verify_errors: tuple[int, ...] = ()
    verify_error_depths: tuple[tuple[int, int], ...] = ()
    certificate_checked: bool = False
    host_mismatch: bool = False
    alerts: tuple[str, ...] = ()
    internal_error: bool = False
    dane_verdict: DANEVerdict | None = None

    @property
    def verified(self) -> bool:
        """
        Whether the handshake completed with a certificate that chains to a
        trusted root and is valid for C{hostname} (RFC 8461 §4.1), or,
        under L{VerifyMode.DANE}, that the TLSA records authenticate (RFC
        7672 §3.2).
        """
        if self.mode is VerifyMode.DANE:
            return (
                self.handshake_completed
                and self.dane_verdict is not None
                and self.dane_verdict.passed
                and not self.internal_error
            )
        return (
            self.handshake_completed
            and self.certificate_checked
            and not self.verify_errors
            and not self.host_mismatch
            and not self.internal_error
        )

    def classify(self) -> tuple[ResultType, str | None] | None:
        """
        Classify a failure as an RFC 8460 §4.3.1 result type and a
        failure-reason-code, per docs/design.rst "TLS failure → RFC 8460
        result type".

        When several problems were seen, the most fundamental wins: a chain
        that does not lead to a trusted root, then expiry, then other chain
        errors (L{mtasts_twisted.pkix.deciding_verify_error}), then the
        name.  OpenSSL reports them in the same order, so C{VERIFY} (which
        stops at the first) and C{RECORD_ONLY} (which sees them all) agree.

        @return: L{None} when L{verified}; else C{(result_type, reason)}
            where C{reason} is the deciding OpenSSL symbol, a
            C{tls-alert-*} / C{tls-handshake-failure} code, or L{None} for a
            host mismatch.
        """
        if self.verified:
            return None
        if self.mode is VerifyMode.DANE:
            # RFC 8460 §4.3: the TLSA verdict's type (tlsa-invalid, or the
            # certificate's under DANE-TA(2)); PKIX errors do not count.
            if self.dane_verdict is not None and not self.dane_verdict.passed:
                assert self.dane_verdict.result_type is not None
                return self.dane_verdict.result_type, self.dane_verdict.reason
            return self._handshake_failure()
        errnum = deciding_verify_error(self.verify_errors)
        if errnum is not None:
            return classify_verify_error(errnum).result_type, verify_error_name(errnum)
        if self.host_mismatch:
            return ResultType.CERTIFICATE_HOST_MISMATCH, None
        return self._handshake_failure()

    def _handshake_failure(self) -> tuple[ResultType, str | None]:
        """Classify a failure that no certificate check explains."""
        if self.internal_error:
            return ResultType.VALIDATION_FAILURE, "internal-error"
        if not self.handshake_completed:
            for alert in self.alerts:
                if not alert.endswith(":close-notify"):
                    return ResultType.VALIDATION_FAILURE, "tls-alert-" + alert.split(":", 1)[1]
            return ResultType.VALIDATION_FAILURE, "tls-handshake-failure"
        return ResultType.VALIDATION_FAILURE, "certificate-not-checked"

    def failure_details(
        self,
        receiving_ip: str | None = None,
        *,
        receiving_mx_helo: str | None = None,
        sending_mta_ip: str | None = None,
    ) -> FailureDetails | None:
        """
        Return the RFC 8460 §4.3 failure-details for this connection, or
        L{None} when it L{verified}.
        """
        classified = self.classify()
        if classified is None:
            return None
        result_type, reason = classified
        return FailureDetails(
            result_type=result_type,
            sending_mta_ip=sending_mta_ip,
            receiving_mx_hostname=self.hostname,
            receiving_mx_helo=receiving_mx_helo,
            receiving_ip=receiving_ip,
            failure_reason_code=reason,
        )


class TLSVerificationError(Exception):
    """
    The MX host's certificate failed verification in L{VerifyMode.VERIFY};
    the connection was aborted.  The reason handed to C{connectionLost}.

    @ivar outcome: the L{TLSOutcome} at the moment of failure.
    """

    def __init__(self, outcome: TLSOutcome) -> None:
        super().__init__(outcome)
        self.outcome = outcome

    def __str__(self) -> str:
        classified = self.outcome.classify()
        kind = f"{classified[0].value} ({classified[1]})" if classified else "?"
        return f"TLS verification of {self.outcome.hostname} failed: {kind}"


class TLSOutcomeRecorder(VerifyRecorder):
    """
    Records what happens on one TLS connection; made by
    L{MXConnectionCreator.clientConnectionForTLS}.

    The package's recording verify callback (L{VerifyRecorder}: verify
    errors, the name check, the refusal under C{VERIFY}) plus an info
    callback for the TLS version, cipher and alerts.  Its callbacks run
    inside OpenSSL; they never raise.

    @ivar mode: the L{VerifyMode}.
    """

    def __init__(self, hostname: str, mode: VerifyMode, dane: DANECheck | None = None) -> None:
        """
        @param hostname: the MX host name (A-labels) to check against.
        @param mode: the L{VerifyMode}.
        @param dane: under L{VerifyMode.DANE}, what to authenticate by.
        @raise ValueError: C{DANE} without C{dane}, or C{dane} in another
            mode.
        """
        if (mode is VerifyMode.DANE) != (dane is not None):
            raise ValueError("VerifyMode.DANE goes with a DANECheck, and only it")
        super().__init__(hostname, enforce=mode in (VerifyMode.VERIFY, VerifyMode.DANE), dane=dane)
        self.mode = mode
        self._completed = False
        self._version: str | None = None
        self._cipher: str | None = None
        self._alerts: list[str] = []

    def outcome(self) -> TLSOutcome:
        """Return what has been recorded so far as a L{TLSOutcome}."""
        errors: list[int] = []
        for _, errnum in self.errors:
            if errnum not in errors:
                errors.append(errnum)
        return TLSOutcome(
            hostname=self.hostname,
            mode=self.mode,
            handshake_completed=self._completed,
            tls_version=self._version,
            cipher=self._cipher,
            peer_certificate_names=self.names,
            verify_errors=tuple(errors),
            verify_error_depths=tuple(self.errors),
            certificate_checked=self.certificate_checked,
            host_mismatch=self.host_mismatch,
            alerts=tuple(self._alerts),
            internal_error=self.internal_error,
            dane_verdict=self.dane_verdict,
        )

    def _attach(self, connection: SSL.Connection, tlsProtocol: TLSMemoryBIOProtocol) -> None:
        # Per-connection callbacks (pyOpenSSL Connection.set_verify and
        # set_info_callback): the SSL.Context is shared by every connection
        # of the creator, and pyOpenSSL refuses to mutate a used Context.
        # They replace what optionsForClientTLS installed on the connection
        # (Twisted 26.4+ checks the name in its verify callback; older ones
        # did it in a Context info callback, which a connection's own info
        # callback overrides too); test_record_only_wrong_name pins that.
        self.attach(connection, tlsProtocol)
        connection.set_info_callback(self._info)

    def refusal(self) -> Exception:
        """
        Under C{VERIFY}, at the first failure: log it and give the
        L{TLSVerificationError} the connection is lost with.
        """
        outcome = self.outcome()
        # Debug: the delivery's line per recipient gives the reason.
        log.debug("TLS to {hostname} refused: {error}", hostname=self.hostname, error=TLSVerificationError(outcome))
        return TLSVerificationError(outcome)

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        try:
            if where & SSL.SSL_CB_ALERT:
                direction = "received" if where & SSL.SSL_CB_READ else "sent"
                description = ret & 0xFF
                name = _ALERT_NAMES.get(description, str(description))
                self._alerts.append(f"{direction}:{name}")
            if where & SSL.SSL_CB_HANDSHAKE_DONE and not self._completed:
                if self.mode is VerifyMode.DANE and not self.passed:
                    # Never mail over a DANE connection whose certificate
                    # was not checked (OpenSSL always calls back for it;
                    # this is the belt to that brace).
                    self._refuse()
                self._completed = True
                self._protocol = None
                self._version = connection.get_protocol_version_name()
                self._cipher = connection.get_cipher_name()
                # One event per session (operators and the benchmark count
                # verified sessions); TLSOutcome.verified without building one.
                log.debug(
                    "TLS to {hostname}: {version} {cipher}, verified={verified}",
                    hostname=self.hostname,
                    version=self._version,
                    cipher=self._cipher,
                    verified=self.passed,
                )
        except BaseException:
            log.failure("while recording TLS state for {hostname}", hostname=self.hostname)
            self.internal_error = True


class MXTLSOptionsCache:
    """
    Twisted client TLS options for MX hosts, one per host name, for one
    trust root: each holds one OpenSSL context (cipher list, TLS ≥ 1.2,
    the loaded trust store), built on first use and then shared by every
    connection to that host.  Building a context and loading the trust
    store is the costly part of a TLS client setup; per connection only an
    C{SSL.Connection} is made, with its own verify and info callbacks
    (L{TLSOutcomeRecorder}), so verification stays per connection and as
    strict as with fresh options.  The verify mode is per connection too,
    so one entry serves C{VERIFY} and C{RECORD_ONLY}.

    @ivar max_hosts: host names kept (least recently used dropped first).
    """

    def __init__(self, trust_root: TrustRootSpec = None, *, max_hosts: int = 1024) -> None:
        """
        @param trust_root: anything L{load_trust_root} takes (loaded once).
        @param max_hosts: how many host names to keep options for.
        """
        self._trust_root = load_trust_root(trust_root)
        self.max_hosts = max_hosts
        self._options: OrderedDict[str, IOpenSSLClientConnectionCreator] = OrderedDict()

    def options(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """
        The C{optionsForClientTLS} of C{hostname} (A-labels): SNI and the
        trust root; the name check is done by L{TLSOutcomeRecorder}.
        """
        options = self._options.get(hostname)
        if options is None:
            options = ssl.optionsForClientTLS(
                hostname,
                trustRoot=self._trust_root,
                extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
            )
            self._options[hostname] = options
            if len(self._options) > self.max_hosts:
                self._options.popitem(last=False)
        else:
            self._options.move_to_end(hostname)
        return options

    def creator(
        self,
        hostname: str,
        mode: VerifyMode = VerifyMode.VERIFY,
        *,
        dane: DANECheck | None = None,
        server_name: str | None = None,
    ) -> MXConnectionCreator:
        """
        A new L{MXConnectionCreator} for C{hostname} using the cached
        options (see there for C{dane} and C{server_name}).
        """
        return MXConnectionCreator(hostname, mode=mode, cache=self, dane=dane, server_name=server_name)


@implementer(IOpenSSLClientConnectionCreator)
class MXConnectionCreator:
    """
    TLS client connection creator for one MX host: SNI, PKIX and name
    verification (RFC 8461 §4.1), TLS ≥ 1.2, and a L{TLSOutcomeRecorder}
    per connection.

    @ivar hostname: the MX host name (A-labels, no trailing dot).
    @ivar mode: the L{VerifyMode}.
    @ivar recorders: one L{TLSOutcomeRecorder} per connection made, oldest
        first.
    """

    def __init__(
        self,
        hostname: str,
        trust_root: TrustRootSpec = None,
        *,
        mode: VerifyMode = VerifyMode.VERIFY,
        cache: MXTLSOptionsCache | None = None,
        dane: DANECheck | None = None,
        server_name: str | None = None,
    ) -> None:
        """
        @param hostname: the MX host name: SNI and the name checked
            (RFC 8461 §4.1: the MX host, not the recipient domain).
        @param trust_root: anything L{load_trust_root} takes; L{None} is the
            platform's roots.  Pass the result of L{load_trust_root} to
            avoid reading a CA file per connection.
        @param mode: L{VerifyMode.VERIFY} to abort on failure,
            L{VerifyMode.RECORD_ONLY} to record it and go on.
        @param cache: take the TLS options (and their OpenSSL context) of
            this host from an L{MXTLSOptionsCache} rather than building
            them; C{trust_root} must then be L{None} (the cache's is used).
        @param dane: with L{VerifyMode.DANE} (and only then): the TLSA
            records and reference identifiers to authenticate the server
            by (RFC 7672 §3); a mismatch aborts the handshake.
        @param server_name: the SNI name when it is not C{hostname}: under
            DANE, the TLSA base domain (RFC 7672 §8.1).
        @raise ValueError: for an IP address literal, both C{trust_root}
            and C{cache}, or C{DANE} without C{dane} (or C{dane} without
            C{DANE}).
        """
        if isIPAddress(hostname) or isIPv6Address(hostname):
            # RFC 8461 §4.1 identifies the MX host by name.
            raise ValueError(f"MX host must be a DNS name, not {hostname!r}")
        if (mode is VerifyMode.DANE) != (dane is not None):
            raise ValueError("VerifyMode.DANE goes with a DANECheck, and only it")
        self.hostname = _ascii_hostname(hostname)
        self.mode = mode
        self.dane = dane
        self.server_name = _ascii_hostname(server_name) if server_name else self.hostname
        self.recorders: list[TLSOutcomeRecorder] = []
        if cache is not None:
            if trust_root is not None:
                raise ValueError("give trust_root or cache, not both")
            self._options = cache.options(self.hostname)
        else:
            self._options = MXTLSOptionsCache(trust_root, max_hosts=1).options(self.hostname)

    def __repr__(self) -> str:
        return f"<MXConnectionCreator {self.hostname} {self.mode.value}>"

    @property
    def recorder(self) -> TLSOutcomeRecorder | None:
        """The latest connection's recorder, or L{None} before any."""
        return self.recorders[-1] if self.recorders else None

    def outcome(self) -> TLSOutcome | None:
        """The latest connection's L{TLSOutcome}, or L{None} if TLS never started."""
        recorder = self.recorder
        return recorder.outcome() if recorder is not None else None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        Make the L{SSL.Connection} for one TLS client connection
        (L{IOpenSSLClientConnectionCreator}).

        @param tlsProtocol: the C{TLSMemoryBIOProtocol} of the connection.
        """
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        # SNI (RFC 6066 §3) = the MX host (RFC 8461 §4.1), or under DANE the
        # TLSA base domain (RFC 7672 §8.1).  Twisted 26.4+ sets the former
        # already; older Twisted set it from the info callback we replace.
        connection.set_tlsext_host_name(self.server_name.encode("ascii"))
        recorder = TLSOutcomeRecorder(self.hostname, self.mode, self.dane)
        recorder._attach(connection, tlsProtocol)
        self.recorders.append(recorder)
        return connection
