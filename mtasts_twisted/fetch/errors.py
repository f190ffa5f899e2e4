"""
How a policy fetch fails: L{PolicyFetchError} and its kinds, each carrying
the RFC 8460 result type and failure-reason-code a TLSRPT report should
carry (docs/design.rst).
"""

from __future__ import annotations

from mtasts_twisted.policy import MTASTSError
from mtasts_twisted.results import ResultType

__all__ = [
    "FetchTimeoutError",
    "InvalidPolicyError",
    "NoPolicyServedError",
    "PolicyCertificateError",
    "PolicyFetchError",
    "PolicyTooLargeError",
    "WrongContentTypeError",
]


class PolicyFetchError(MTASTSError):
    """
    The policy could not be fetched, or what was fetched is not a policy.

    @cvar result_type: the RFC 8460 §4.3 result type for a TLSRPT report.
    @ivar reason: the RFC 8460 C{failure-reason-code}.
    @ivar url: the policy URL.
    @ivar detail: what went wrong, for people.
    """

    result_type: ResultType = ResultType.STS_POLICY_FETCH_ERROR
    reason = "cannot-fetch-policy"

    def __init__(self, url: str, detail: str, reason: str | None = None) -> None:
        """
        @param url: the policy URL.
        @param detail: a human-readable description of the failure.
        @param reason: overrides the class's C{reason}.
        """
        super().__init__(f"MTA-STS policy fetch from {url} failed: {detail}", reason)
        self.url = url
        self.detail = detail


class NoPolicyServedError(PolicyFetchError):
    """The policy host does not exist, or answered 404 (RFC 8461 §3.3)."""

    reason = "no-policy-served"


class WrongContentTypeError(PolicyFetchError):
    """The answer's media type is not C{text/plain} (RFC 8461 §3.2)."""

    reason = "wrong-content-type"


class FetchTimeoutError(PolicyFetchError):
    """The fetch did not complete (connect, headers and body) in time."""


class PolicyCertificateError(PolicyFetchError):
    """
    The policy host's certificate failed PKIX validation (RFC 8461 §3.3).

    C{reason} is C{certificate-expired}, C{certificate-host-mismatch},
    C{certificate-not-trusted} or, for other OpenSSL verify errors,
    C{validation-failure} (L{mtasts_twisted.pkix.classify_verify_error}).

    @ivar verify_error: the OpenSSL X.509 verify error code, or L{None} for
        a host-name mismatch.
    @ivar depth: the chain depth at which it was reported (0: the leaf).
    """

    result_type = ResultType.STS_WEBPKI_INVALID
    reason = "certificate-not-trusted"

    def __init__(
        self,
        url: str,
        detail: str,
        reason: str | None = None,
        verify_error: int | None = None,
        depth: int | None = None,
    ) -> None:
        """
        @param verify_error: the OpenSSL X.509 verify error code, if any.
        @param depth: its chain depth.
        """
        super().__init__(url, detail, reason)
        self.verify_error = verify_error
        self.depth = depth


class InvalidPolicyError(PolicyFetchError):
    """What was served is not a valid policy (RFC 8461 §3.2)."""

    result_type = ResultType.STS_POLICY_INVALID
    reason = "policy-syntax-error"


class PolicyTooLargeError(InvalidPolicyError):
    """The body is larger than the limit (65536 bytes by default)."""
