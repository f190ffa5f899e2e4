"""
One connection of twisted.mail's ESMTP sender to one MX host address, as
the planner (L{mtasts_twisted.delivery.plan}) asks, and what came of it.

  - L{requirements}: what a L{PlannedHost} asks of the connection
    (STARTTLS required?  certificate verified or only recorded?), failing
    closed for a decision this module does not know.
  - L{SessionAttempt}: one connection: host, address, port, and the
    verifying-and-recording L{MXConnectionCreator} to hand to
    C{ESMTPSenderFactory} as its C{contextFactory}.
  - L{classify}: turn what twisted.mail's sender ended with (its result
    tuple, or one of its exceptions) plus the creator's record into an
    L{AttemptOutcome}: whether the session reached the STARTTLS decision,
    the TLS failure to report, whether a plaintext retry is allowed.

How twisted.mail reports TLS trouble (Twisted 26.10):

  - a certificate refused under L{VerifyMode.VERIFY}: the handshake is
    aborted and the sender fails with C{SMTPConnectError} whose
    C{__cause__} is our L{TLSVerificationError};
  - STARTTLS not offered while C{requireTransportSecurity}: C{TLSRequiredError};
  - a reply other than 220 to STARTTLS (e.g. 454): C{twisted.mail.smtp.TLSError}
    (C{twisted.mail._except.SMTPTLSError}), even when TLS is not required;
  - a failed handshake in L{VerifyMode.RECORD_ONLY} (e.g. a TLS alert): the
    connection is lost, C{SMTPConnectError}; the creator has the outcome.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.mail.smtp import (
    SMTPClientError,
    SMTPConnectError,
    SMTPDeliveryError,
    TLSError,
    TLSRequiredError,
)
from twisted.python.failure import Failure

from mtasts_twisted.delivery.details import starttls_not_supported_details
from mtasts_twisted.delivery.plan import HostAction, PlannedHost
from mtasts_twisted.results import FailureDetails
from mtasts_twisted.tls import MXConnectionCreator, TLSOutcome, TLSVerificationError, VerifyMode

__all__ = [
    "AttemptOutcome",
    "SessionAttempt",
    "SessionObservation",
    "classify",
    "describe_error",
    "requirements",
]

#: The actions whose requirements this module knows; any other (a later
#: addition to the planner, e.g. DANE) is treated as "verified TLS or
#: nothing".
_MAY_FALL_BACK = frozenset({HostAction.RECORD_ONLY, HostAction.OPPORTUNISTIC})


def requirements(target: PlannedHost) -> tuple[bool, VerifyMode]:
    """
    What delivery to C{target} asks of a twisted.mail connection: whether
    TLS is required (no plaintext, no plaintext retry) and the
    L{VerifyMode} of its handshake.

    The planner's decision is taken as it is for the actions this module
    knows.  Anything else fails closed: TLS required and the certificate
    verified (RFC 8461 §5 enforce semantics), so an action added to the
    planner later (DANE, RFC 7672) can never turn into plaintext or
    unverified TLS here before this hook learns it.

    @param target: the planned MX host (not L{HostAction.SKIP}).
    """
    if (
        target.action in _MAY_FALL_BACK
        and not target.require_tls
        and target.verify is VerifyMode.RECORD_ONLY
    ):
        return False, VerifyMode.RECORD_ONLY
    # RFC 8461 §5 (enforce), and the fail-closed default.
    return True, VerifyMode.VERIFY


@attrs.frozen
class SessionAttempt:
    """
    One connection to one address of a planned MX host.

    Hand C{context_factory} to C{ESMTPSenderFactory(contextFactory=...)}
    with C{requireTransportSecurity=require_tls} and C{retries=0}; the
    creator verifies (or records) the certificate against C{host}
    (RFC 8461 §4.1: the MX host name, not the recipient domain) and keeps
    the outcome for L{classify}.

    @ivar domain: the recipient (policy) domain, A-labels.
    @ivar target: the planner's L{PlannedHost}.
    @ivar ip: the address to connect to.
    @ivar port: the TCP port.
    @ivar require_tls: no plaintext: STARTTLS must succeed (and, with
        C{verify} L{VerifyMode.VERIFY}, the certificate verify) before
        anything of the message is sent.
    @ivar verify: the handshake's L{VerifyMode}.
    @ivar context_factory: the TLS creator for this one connection, or
        L{None} for the plaintext retry (no STARTTLS at all).
    """

    domain: str
    target: PlannedHost
    ip: str
    port: int
    require_tls: bool
    verify: VerifyMode
    context_factory: MXConnectionCreator | None

    @property
    def host(self) -> str:
        """The MX host name."""
        return self.target.host

    @property
    def plaintext(self) -> bool:
        """Is this the opportunistic plaintext retry (no STARTTLS)?"""
        return self.context_factory is None


@attrs.define
class SessionObservation:
    """
    What L{RecordingSenderFactory<mtasts_twisted.twistedmail.sender.RecordingSenderFactory>}'s
    protocol saw of a session, beyond what twisted.mail tells: filled in
    as the session goes (so mutable).

    @ivar starttls_offered: after the first EHLO reply outside TLS, whether
        it offered STARTTLS; L{None} before.
    @ivar data_started: the server answered 354 to DATA.
    @ivar dot_sent: the end of data was sent: a lost connection now may
        still mean the message was delivered (RFC 1047).
    """

    starttls_offered: bool | None = None
    data_started: bool = False
    dot_sent: bool = False


@attrs.frozen
class AttemptOutcome:
    """
    What one L{SessionAttempt} ended with.

    @ivar value: twisted.mail's result C{(numOk, [(address, code, resp)])}
        when the sender's Deferred fired, else L{None}.
    @ivar error: the exception it failed with, else L{None}.
    @ivar tls_decided: the session reached the STARTTLS decision (STARTTLS
        not offered or refused, or a handshake, failed or completed): it
        counts for TLSRPT (RFC 8460 §4.4 counts sessions).
    @ivar tls_negotiated: the TLS handshake completed.
    @ivar tls_failure: why TLS was not negotiated or not verified (RFC 8460
        §4.3 failure details), or L{None}.
    @ivar tls_version: e.g. C{"TLSv1.3"} when TLS was negotiated.
    @ivar verified: the certificate verified (PKIX and the MX host name).
    @ivar retry_plaintext: STARTTLS was refused or its handshake failed,
        and the plan allows trying again without STARTTLS.
    @ivar dot_sent: the end of data was sent before the session ended (only
        known with a L{SessionObservation}).
    """

    value: tuple[int, list[tuple[bytes, int, bytes]]] | None = None
    error: BaseException | None = None
    tls_decided: bool = False
    tls_negotiated: bool = False
    tls_failure: FailureDetails | None = None
    tls_version: str | None = None
    verified: bool = False
    retry_plaintext: bool = False
    dot_sent: bool = False


def _tls_outcome(attempt: SessionAttempt, error: BaseException | None) -> TLSOutcome | None:
    cause = error.__cause__ if error is not None else None
    if isinstance(cause, TLSVerificationError):
        # The outcome at the moment the handshake was refused.
        return cause.outcome
    if attempt.context_factory is None:
        return None
    return attempt.context_factory.outcome()


def classify(
    attempt: SessionAttempt, result: Any, observation: SessionObservation | None = None
) -> AttemptOutcome:
    """
    What one twisted.mail session did, for TLSRPT and failover.

    @param attempt: the attempt the session was made for (its creator holds
        the TLS record).
    @param result: what C{ESMTPSenderFactory}'s Deferred fired with: the
        C{(numOk, addresses)} tuple, or the L{Failure} (or exception).
    @param observation: what a L{RecordingSenderFactory
        <mtasts_twisted.twistedmail.sender.RecordingSenderFactory>} saw, if
        the session used one; without it a session that ended in plaintext
        before any transaction reply (a timeout, say) is not counted.
    """
    if isinstance(result, Failure):
        result = result.value
    error = result if isinstance(result, BaseException) else None
    value = None if error is not None else result
    tls = _tls_outcome(attempt, error)
    decided = negotiated = False
    failure: FailureDetails | None = None
    host, ip = attempt.host, attempt.ip
    if attempt.plaintext:
        # The plaintext retry after a failed STARTTLS: its STARTTLS decision
        # was the first session's, already counted.
        pass
    elif tls is not None:
        decided, negotiated = True, tls.handshake_completed
        failure = tls.failure_details(ip)
    elif isinstance(error, TLSError):
        # A reply other than 220 to STARTTLS (RFC 3207 §4: 454).
        code = error.code if 400 <= error.code < 600 else None
        decided, failure = True, starttls_not_supported_details(host, ip, reply_code=code)
    elif (
        isinstance(error, TLSRequiredError)
        or error is None
        or isinstance(error, SMTPDeliveryError)
        or (observation is not None and observation.starttls_offered is False)
    ):
        # Past EHLO without TLS: STARTTLS was not offered (twisted.mail only
        # goes on in plaintext when it was not; a refusal is TLSError).
        decided, failure = True, starttls_not_supported_details(host, ip)
    retry = (
        error is not None
        and not attempt.require_tls
        and not attempt.plaintext
        and (isinstance(error, TLSError) or (tls is not None and not tls.handshake_completed))
    )
    return AttemptOutcome(
        value=value,
        error=error,
        tls_decided=decided,
        tls_negotiated=negotiated,
        tls_failure=failure,
        tls_version=tls.tls_version if tls is not None and tls.handshake_completed else None,
        verified=tls is not None and tls.verified,
        retry_plaintext=retry,
        dot_sent=observation is not None and observation.dot_sent,
    )


def describe_error(error: BaseException | None) -> str:
    """
    One line for a failed session: the reply (without twisted.mail's
    session log) or the TLS verification failure.
    """
    if error is None:
        return "no error"
    cause = error.__cause__
    if isinstance(cause, TLSVerificationError):
        return str(cause)
    if isinstance(error, SMTPConnectError) and cause is not None:
        return f"connection failed: {cause}"
    if isinstance(error, SMTPClientError):
        resp = error.resp.decode("utf-8", "replace") if isinstance(error.resp, bytes) else str(error.resp)
        resp = " / ".join(line for line in resp.splitlines() if line)
        return f"{error.code} {resp}" if error.code > 0 else resp
    return f"{type(error).__name__}: {error}"
