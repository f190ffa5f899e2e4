"""
The TLSRPT side of a policy lookup (RFC 8460): the policy object a lookup
reports (L{describe}), the failure details of a failed TXT lookup or policy
fetch, and the reason codes of a backoff (L{BACKOFF_REASON}) and of a cached
policy used despite a failure (L{FALLBACK}).
"""

from __future__ import annotations

import attrs

from mtasts_twisted.fetch import PolicyFetchError
from mtasts_twisted.policy import Mode, MTASTSError, Policy
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, ResultType

__all__ = ["BACKOFF_REASON", "FALLBACK", "describe"]

#: Appended to the reason code of a failure when the cached policy is used
#: anyway (RFC 8461 §10.2 downgrade resistance).
FALLBACK = "+fallback-to-cached-policy"
#: The reason code of a lookup that skipped a fetch because one failed recently.
BACKOFF_REASON = "back-off-after-recent-fetch-error"


def describe(alabel: str, policy: Policy | None) -> PolicyDescriptor:
    """The RFC 8460 §4.1 policy object for C{policy} of domain C{alabel}."""
    if policy is None or policy.mode is Mode.NONE:
        return PolicyDescriptor(PolicyType.NO_POLICY_FOUND, alabel)
    return PolicyDescriptor(PolicyType.STS, alabel, policy.policy_strings, policy.mx)


def _failure(result_type: ResultType, reason: str, info: str | None = None) -> FailureDetails:
    return FailureDetails(result_type, failure_reason_code=reason, additional_information=info)


def _classify(error: BaseException) -> FailureDetails:
    """The RFC 8460 failure of a failed TXT lookup or policy fetch."""
    if isinstance(error, PolicyFetchError):
        return _failure(error.result_type, error.reason, str(error)[:200])
    if isinstance(error, MTASTSError):
        return _failure(ResultType.STS_POLICY_FETCH_ERROR, error.reason, str(error)[:200])
    return _failure(ResultType.STS_POLICY_FETCH_ERROR, "internal-error", repr(error)[:200])


def _fallback(failure: FailureDetails) -> FailureDetails:
    """C{failure}, marked as answered by the cached policy (L{FALLBACK})."""
    return attrs.evolve(failure, failure_reason_code=(failure.failure_reason_code or "") + FALLBACK)
