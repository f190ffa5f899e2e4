"""
The TLSRPT side of a policy lookup (RFC 8460): the policy object a lookup
reports (L{describe}), the failure details of a failed TXT lookup or policy
fetch, the reason codes of a backoff (L{BACKOFF_REASON}) and of a cached
policy used despite a failure (L{FALLBACK}), and the L{Result} of a lookup
with a problem (L{lookup_problem}, L{lookup_stopped}).

Sessions are counted once (RFC 8460 §4.2, "TLSRPT accounting" in
docs/design.rst): a lookup counts no session of its own, unless its problem
stopped the delivery (L{lookup_stopped}: the temporary failure that defers
the mail).  Any other lookup problem (a cached policy used despite a
failure, a backoff, a fetch that failed) is a failure detail without a
session (L{lookup_problem}); the sessions the delivery then holds are
counted by delivery, or by Postfix for the socketmap.

The details name the problem by result type and reason code only: RFC 8460
§4.4 C{additional-information} is a URI, so the error's text goes to the
log (and to L{Lookup.error<mtasts_twisted.cache.Lookup.error>}), never into
a report, and equal problems merge.
"""

from __future__ import annotations

import attrs

from mtasts_twisted.fetch import PolicyFetchError
from mtasts_twisted.policy import Mode, MTASTSError, Policy
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType

__all__ = ["BACKOFF_REASON", "FALLBACK", "describe", "lookup_problem", "lookup_stopped"]

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


def lookup_problem(descriptor: PolicyDescriptor, failure: FailureDetails) -> Result:
    """
    The result of a lookup whose problem did not stop delivery: C{failure}
    as a detail (of the one attempt it affected), no session counted
    (C{total-failure-session-count} 0; RFC 8460 §4.2 counts sessions, and
    the sessions that follow are counted where they are held).
    """
    return Result(descriptor, 0, [failure], failure_count=0)


def lookup_stopped(descriptor: PolicyDescriptor, failure: FailureDetails) -> Result:
    """
    The result of a lookup whose problem stopped delivery (the mail is
    deferred): one failed (attempted) session, C{failure} its detail.
    """
    return Result(descriptor, 0, [failure], failure_count=1)


def _failure(result_type: ResultType, reason: str) -> FailureDetails:
    return FailureDetails(result_type, failure_reason_code=reason)


def _classify(error: BaseException) -> FailureDetails:
    """
    The RFC 8460 failure of a failed TXT lookup or policy fetch: its result
    type and reason code (the error's text is for the log).
    """
    if isinstance(error, PolicyFetchError):
        return _failure(error.result_type, error.reason)
    if isinstance(error, MTASTSError):
        return _failure(ResultType.STS_POLICY_FETCH_ERROR, error.reason)
    return _failure(ResultType.STS_POLICY_FETCH_ERROR, "internal-error")


def _fallback(failure: FailureDetails) -> FailureDetails:
    """C{failure}, marked as answered by the cached policy (L{FALLBACK})."""
    return attrs.evolve(failure, failure_reason_code=(failure.failure_reason_code or "") + FALLBACK)
