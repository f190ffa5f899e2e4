"""
RFC 8460 failure details of a delivery session that are not a TLS outcome
(those come from L{mtasts_twisted.tls.TLSOutcome}): an MX host that did not
offer or refused STARTTLS, and an MX host outside the MTA-STS policy.
"""

from __future__ import annotations

from mtasts_twisted.results import FailureDetails, ResultType

__all__ = ["MX_MISMATCH_REASON", "mx_mismatch_details", "starttls_not_supported_details"]

#: failure-reason-code for an MX host outside the policy (RFC 8461 §4.1).
MX_MISMATCH_REASON = "mtasts-policy-mx-mismatch"


def starttls_not_supported_details(
    mx_hostname: str,
    receiving_ip: str | None = None,
    *,
    reply_code: int | None = None,
    receiving_mx_helo: str | None = None,
    sending_mta_ip: str | None = None,
) -> FailureDetails:
    """
    Failure-details for an MX host that did not offer STARTTLS or refused
    it: starttls-not-supported (RFC 8460 §4.3.1).

    @param reply_code: the reply to STARTTLS (e.g. 454), or L{None} when it
        was not offered; the reason code is C{starttls-not-offered} or
        C{starttls-refused-<code>}.
    """
    reason = "starttls-not-offered" if reply_code is None else f"starttls-refused-{reply_code}"
    return FailureDetails(
        result_type=ResultType.STARTTLS_NOT_SUPPORTED,
        sending_mta_ip=sending_mta_ip,
        receiving_mx_hostname=mx_hostname,
        receiving_mx_helo=receiving_mx_helo,
        receiving_ip=receiving_ip,
        failure_reason_code=reason,
    )


def mx_mismatch_details(
    mx_hostname: str,
    receiving_ip: str | None = None,
    *,
    sending_mta_ip: str | None = None,
) -> FailureDetails:
    """
    Failure-details for an MX host that the policy's C{mx} patterns do not
    match (RFC 8461 §4.1): validation-failure, reason
    C{mtasts-policy-mx-mismatch}.
    """
    return FailureDetails(
        result_type=ResultType.VALIDATION_FAILURE,
        sending_mta_ip=sending_mta_ip,
        receiving_mx_hostname=mx_hostname,
        receiving_ip=receiving_ip,
        failure_reason_code=MX_MISMATCH_REASON,
    )
