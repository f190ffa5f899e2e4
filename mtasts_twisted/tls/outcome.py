"""
What one TLS client connection to an MX host came to: the verification
modes (L{VerifyMode}), the recorded L{TLSOutcome} and its RFC 8460
classification, and the L{TLSVerificationError} a refused handshake fails
with.  Values only; the recording happens in L{mtasts_twisted.tls.client}.
"""

from __future__ import annotations

import enum

import attrs

from mtasts_twisted.pkix import DANEVerdict, classify_verify_error, deciding_verify_error, verify_error_name
from mtasts_twisted.results import FailureDetails, ResultType

__all__ = ["TLSOutcome", "TLSVerificationError", "VerifyMode"]


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
