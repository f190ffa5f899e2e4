"""
The one log line per recipient and delivery attempt, in the shape Postfix
admins grep for::

    to=<bob@example.com>, relay=mx1.example.com[192.0.2.25]:25, delay=0.31,
    tls=TLSv1.3 verified, policy=sts-enforce, dsn=2.0.0,
    status=sent (250 2.0.0 Ok: queued as 4Xk)

(one line).  L{log_outcome} emits it as a C{twisted.logger} event whose
fields are also the event's keys (C{to}, C{relay}, C{delay}, C{tls},
C{policy}, C{dsn}, C{status}, C{reply}).

  - C{relay}: C{host[ip]:port} of the address that decided the recipient
    (or the last one tried), C{none} when no connection was tried.
  - C{delay}: seconds since the delivery call began.
  - C{tls}: C{<version> verified}, C{<version> untrusted} (TLS without a
    verified certificate, opportunistic), or C{none}.
  - C{policy}: C{sts-enforce}, C{sts-testing}, C{none} (no policy, or mode
    C{none}), or C{unknown} when the policy lookup failed and the mail is
    deferred.
  - C{dsn}: the RFC 3463 enhanced status code of the reply (or of our own
    message), else C{2.0.0}/C{4.0.0}/C{5.0.0}; its class always agrees
    with C{status}.
  - C{status}: C{sent}, C{deferred} or C{bounced}, and the reply (or our
    reason) in parentheses, on one line.  The reason of a failure is given
    here once; the layers below log it at debug level only.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import attrs
from twisted.logger import Logger

from mtasts_twisted.delivery.attempt import Attempt
from mtasts_twisted.delivery.values import DeliveryResult, RecipientOutcome, Status
from mtasts_twisted.policy import Mode

__all__ = [
    "LINE_FORMAT",
    "AttemptTally",
    "dsn_of",
    "log_outcome",
    "log_result",
    "policy_label",
    "relay_label",
    "tls_label",
]

#: The C{log_format} of the line (its fields are the event's keys).
LINE_FORMAT = "to=<{to}>, relay={relay}, delay={delay}, tls={tls}, policy={policy}, dsn={dsn}, status={status} ({reply})"

_STATUS = {Status.DELIVERED: "sent", Status.TRANSIENT: "deferred", Status.PERMANENT: "bounced"}
_CLASS = {Status.DELIVERED: "2", Status.TRANSIENT: "4", Status.PERMANENT: "5"}
#: RFC 3463 §2: class "." subject "." detail, at the start of the text.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?!\S)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@attrs.define
class AttemptTally:
    """
    One delivery call's bookkeeping for its lines: when it began, and the
    address that decided each recipient or was tried last.

    @ivar started: the clock's time when the call began.
    @ivar relays: C{(host, ip)} per recipient decided by a session.
    @ivar last: C{(host, ip)} of the last address tried, if any.
    """

    started: float
    relays: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    last: tuple[str, str] | None = None

    def decided(self, attempt: Attempt) -> None:
        """Remember C{attempt}'s address, and for the recipients it decided."""
        self.last = (attempt.host, attempt.ip)
        for recipient in attempt.outcomes:
            self.relays[recipient] = self.last


def policy_label(mode: Mode | None, known: bool = True) -> str:
    """C{sts-enforce}, C{sts-testing}, C{none}; C{unknown} when not C{known}."""
    if not known:
        return "unknown"
    if mode is Mode.ENFORCE:
        return "sts-enforce"
    if mode is Mode.TESTING:
        return "sts-testing"
    return "none"


def tls_label(outcome: RecipientOutcome) -> str:
    """C{TLSv1.3 verified}, C{TLSv1.2 untrusted} or C{none}."""
    if outcome.tls_version is None:
        return "none"
    return f"{outcome.tls_version} {'verified' if outcome.verified else 'untrusted'}"


def relay_label(host: str | None, ip: str | None, port: int | None) -> str:
    """C{host[ip]:port} (an IPv6 address inside the brackets as is), or C{none}."""
    if host is None or ip is None:
        return "none"
    return f"{host}[{ip}]:{port}"


def dsn_of(status: Status, text: str) -> str:
    """
    The enhanced status code (RFC 3463) that C{text} starts with, its class
    made to agree with C{status}; else C{X.0.0} of C{status}'s class.
    """
    klass = _CLASS[status]
    match = _ENHANCED.match(text)
    if match is None:
        return f"{klass}.0.0"
    return f"{klass}.{match.group(2)}.{match.group(3)}"


def _one_line(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()


def log_outcome(
    log: Logger,
    outcome: RecipientOutcome,
    *,
    relay: str,
    delay: float,
    policy: str,
) -> None:
    """
    Log the line of C{outcome} (see the module docstring).

    @param log: where to emit it.
    @param relay: L{relay_label} of the address that decided it.
    @param delay: seconds since the delivery call began.
    @param policy: L{policy_label} of the delivery.
    """
    text = _one_line(outcome.message)
    reply = f"{outcome.code} {text}" if outcome.code is not None else text
    log.info(
        LINE_FORMAT,
        to=outcome.recipient,
        relay=relay,
        delay=f"{delay:.2f}",
        tls=tls_label(outcome),
        policy=policy,
        dsn=dsn_of(outcome.status, text),
        status=_STATUS[outcome.status],
        reply=reply,
    )


def log_result(
    log: Logger,
    result: DeliveryResult,
    tally: AttemptTally,
    now: float,
    port_of: Callable[[str], int],
    policy_known: bool = True,
) -> None:
    """
    Log the line of every recipient of C{result} (L{log_outcome}).

    @param tally: the call's start time and the addresses it tried.
    @param now: the clock's time now (for C{delay}).
    @param port_of: the TCP port of an MX host.
    @param policy_known: whether the policy lookup answered (else
        C{policy=unknown}).
    """
    policy = policy_label(result.policy_mode, policy_known)
    for outcome in result.outcomes:
        where = tally.relays.get(outcome.recipient, tally.last)
        relay = relay_label(*where, port_of(where[0])) if where is not None else "none"
        log_outcome(log, outcome, relay=relay, delay=now - tally.started, policy=policy)
