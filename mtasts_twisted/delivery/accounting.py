"""
TLSRPT accounting of delivery (RFC 8460 §4): which L{Result}s a delivery
reports for the MX hosts it skipped and the sessions it held, and handing
them to the result sink.

The rules are in "TLSRPT accounting" in the L{mtasts_twisted.delivery}
docstring; in short, every session counts once, and a delivery reports the
policy lookup's result (which counts no session unless its problem stopped
the delivery; a lookup problem the sessions went on from is a failure
detail only), then:

  - L{skip_result}: one failure per MX host skipped under C{enforce} for
    not matching the policy, or deferred for a failed DANE lookup
    (C{dnssec-invalid} under a C{tlsa} policy);
  - L{session_result}: for each session that reached the STARTTLS decision,
    under an C{sts} policy one success or failure; without one (or in mode
    C{none}) only TLS negotiations: a completed handshake, or a failed one;
    under a C{tlsa} policy (a host DANE decided, RFC 8460 §4.1) one
    success or failure per session (L{dane_session_result}).

A host DANE decided is counted under its C{tlsa} policy instead of the
delivery's (L{report_descriptor<mtasts_twisted.delivery.danehost.report_descriptor>}):
one session, one policy, whichever decided it; the result is reported to
the recipient domain's TLSRPT record (L{Result.report_domain}).

Sessions that ended before the STARTTLS decision, the plaintext retry after
a failed handshake and reused sessions add nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.logger import Logger

from mtasts_twisted.delivery.danehost import DANE_ACTIONS, report_descriptor
from mtasts_twisted.delivery.attempt import Attempt
from mtasts_twisted.delivery.plan import HostAction, PlannedHost
from mtasts_twisted.interfaces import IResultSink
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, Result, ResultType
from mtasts_twisted.delivery.details import mx_mismatch_details

__all__ = ["attempt_result", "dane_session_result", "record", "session_result", "skip_result"]

log = Logger()


def skip_result(descriptor: PolicyDescriptor, target: PlannedHost) -> Result:
    """
    The TLSRPT result of an MX host skipped under C{enforce}
    (L{HostAction.SKIP}), or deferred for a failed DANE lookup
    (L{HostAction.DEFER}, under its C{tlsa} policy): one failure, without
    C{receiving-ip} (no address was tried).
    """
    assert target.skip_reason is not None
    return _reported(descriptor, target, 0, [target.skip_reason])


def _reported(
    descriptor: PolicyDescriptor, target: PlannedHost, success: int, failures: list[FailureDetails] | None = None
) -> Result:
    """A result under the policy that decided C{target}, reported to the recipient domain."""
    policy = report_descriptor(descriptor, target)
    if policy is descriptor:
        return Result(descriptor, success, failures or ())
    # RFC 8460 §3: the report goes to the recipient domain's _smtp._tls
    # record; the tlsa policy's domain is the TLSA base domain.
    return Result(policy, success, failures or (), report_domain=descriptor.policy_domain)


def dane_session_result(
    descriptor: PolicyDescriptor,
    target: PlannedHost,
    failure: FailureDetails | None,
    negotiated: bool,
) -> Result:
    """
    The TLSRPT result of one session to a host DANE decided (RFC 7672
    §2.2): every session counts once.  TLS not negotiated (STARTTLS not
    offered or refused, the handshake failed, the TLSA records matched
    nothing) is a failure; for C{REQUIRE_TLS} (no usable record) any
    negotiated TLS is a success; otherwise a verified one.
    """
    if negotiated and (target.action is HostAction.REQUIRE_TLS or failure is None):
        return _reported(descriptor, target, 1)
    if failure is None:
        failure = FailureDetails(ResultType.VALIDATION_FAILURE, receiving_mx_hostname=target.host,
                                 failure_reason_code="tls-not-negotiated")
    return _reported(descriptor, target, 0, [failure])


def session_result(
    descriptor: PolicyDescriptor,
    target: PlannedHost,
    ip: str,
    failure: FailureDetails | None,
    negotiated: bool,
    local_ip: str | None = None,
) -> Result | None:
    """
    The TLSRPT result of one session that reached the STARTTLS decision,
    or L{None} when it is not counted.

    @param descriptor: the policy descriptor of the delivery.
    @param target: the MX host as planned.
    @param ip: the address the session connected to (C{receiving-ip}).
    @param failure: why TLS was not negotiated or not verified (STARTTLS
        not offered or refused, the handshake's or the certificate's
        failure), or L{None}.
    @param negotiated: whether the TLS handshake completed.
    @param local_ip: the session's local address (C{sending-mta-ip}).
    """
    if target.action in DANE_ACTIONS:
        return dane_session_result(descriptor, target, failure, negotiated)
    if target.action is not HostAction.OPPORTUNISTIC:
        # An sts policy (enforce, testing): every session counts once.
        if not target.matches_policy:
            # RFC 8461 §4.1: an MX host outside the policy; this wins over
            # a TLS failure (testing).
            return Result(descriptor, 0, [mx_mismatch_details(target.host, ip, sending_mta_ip=local_ip)])
        if failure is not None:
            return Result(descriptor, 0, [failure])
        return Result(descriptor, 1)
    # No policy, or mode none: a completed handshake is a success (no
    # policy asked for verification), a failed one a failure; a session
    # without TLS had no TLS negotiation to report.
    if negotiated:
        return Result(descriptor, 1)
    if failure is not None and failure.result_type is not ResultType.STARTTLS_NOT_SUPPORTED:
        return Result(descriptor, 0, [failure])
    return None


def attempt_result(descriptor: PolicyDescriptor, target: PlannedHost, attempt: Attempt) -> Result | None:
    """
    The TLSRPT result of a new session (L{session_result} of what
    C{attempt} recorded), or L{None} when it is not counted (it ended
    before the STARTTLS decision, or had no TLS to report).
    """
    if not attempt.tls_decided:
        return None
    return session_result(
        descriptor, target, attempt.ip, attempt.tls_failure, attempt.tls_negotiated, attempt.local_ip
    )


def record(sink: IResultSink | None, results: Iterable[Result]) -> None:
    """
    Hand C{results} to C{sink} (if any); a sink that fails is logged and
    never fails the delivery (L{IResultSink.record} must not fail the
    caller).
    """
    if sink is None:
        return
    for result in results:
        try:
            sink.record(result)
        except Exception:
            log.failure("TLSRPT sink failed to record a result")
