"""
The one table from an OpenSSL X.509 verify error to the RFC 8460 §4.3.1
result type it counts as (docs/design.rst, "TLS failure → RFC 8460 result
type"), with the names of the errors and the one that decides a failed
chain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from OpenSSL import SSL

from mtasts_twisted.results import ResultType

__all__ = [
    "EXPIRED_ERRORS",
    "NOT_TRUSTED_ERRORS",
    "VerifyErrorClass",
    "classify_verify_error",
    "deciding_verify_error",
    "verify_error_name",
]


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
