"""
The sender's TLS controls of RFC 8689, as pure functions of the plan:
REQUIRETLS (a MAIL FROM parameter, kept with the message) and the
C{TLS-Required: No} header field.

REQUIRETLS (RFC 8689 §4.2.1).  A message tagged with it goes to an MX host
only when every step of §4.2.1 holds; otherwise no byte of it is sent to
that host, and when no host of the domain is left the recipients fail
I{permanently} (a DSN, never a retry with less):

  ======================================  =================================
  planned host (L{HostAction})            under REQUIRETLS
  ======================================  =================================
  REQUIRE_DANE (DANE authenticates it)    tried as planned
  REQUIRE_VERIFIED_TLS (enforce, listed)  tried as planned
  RECORD_ONLY, listed by a C{testing}     tried, the certificate verified
  policy                                  (no testing-mode leniency)
  RECORD_ONLY, not listed (testing)       refused: C{5.7.30}
  OPPORTUNISTIC (no policy, mode none)    refused: C{5.7.30}
  REQUIRE_TLS (unusable TLSA records)     refused: C{5.7.30}
  SKIP (enforce, unlisted)                refused (reported as before)
  DEFER (DANE lookup failed)              not tried now (temporary)
  ======================================  =================================

In each session (L{session_refusal}): TLS negotiated, the certificate
verified (PKIX and the MX host name, or DANE), and C{REQUIRETLS} in the
EHLO reply after STARTTLS; then MAIL carries C{REQUIRETLS}.  A message
with the null reverse-path (a bounce) is exempt from §4.2.1 (its first
sentence) and, §5, is never discarded for want of REQUIRETLS: it is sent
as any message, with the parameter only where a session meets §2.

C{TLS-Required: No} (RFC 8689 §3, §4.2.2, §8.4): the recipient domain's
MTA-STS and DANE policies are not enforced (L{relax_for_tls_optional}):
STARTTLS is still attempted and what fails is still reported (TLSRPT),
but the message is delivered.  With REQUIRETLS as well, the header is
ignored (§4.1).  The header is read from the message at delivery
(L{tls_required_no}), not stored: see docs/design.rst.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from typing import Protocol

import attrs
from twisted.logger import Logger

from mtasts_twisted.delivery.plan import HostAction, PlannedHost
from mtasts_twisted.delivery.protocol import SessionError
from mtasts_twisted.tls import VerifyMode

__all__ = [
    "RefusalKind",
    "RequireTLSError",
    "SenderControls",
    "relax_for_tls_optional",
    "requiretls_allows",
    "requiretls_refusal",
    "requiretls_target",
    "session_refusal",
    "tls_required_no",
]

log = Logger()

#: RFC 8689 §7 and §4.2.1: REQUIRETLS support required.
STATUS_REQUIRETLS = "5.7.30"
#: RFC 8689 §4.2.1 (RFC 5248): unable to establish a TLS-protected session.
STATUS_ENCRYPTION_NEEDED = "5.7.10"


class RefusalKind(enum.Enum):
    """
    Why REQUIRETLS kept a message from one MX host.

    @cvar PATH: the host is not authenticated by DNSSEC (DANE) or an
        MTA-STS policy listing it (§4.2.1 step 2).
    @cvar TLS: no TLS, or a certificate that did not verify (step 4).
    @cvar CAPABILITY: the EHLO reply after STARTTLS lacks C{REQUIRETLS}
        (step 5).
    """

    PATH = "path"
    TLS = "tls"
    CAPABILITY = "capability"


class RequireTLSError(SessionError):
    """
    A session that may not carry a REQUIRETLS message (§4.2.1): raised
    before MAIL, so the session ends with QUIT and the next host is tried.

    @ivar kind: a L{RefusalKind}.
    """

    def __init__(self, message: str, kind: RefusalKind) -> None:
        super().__init__(message)
        self.kind = kind


def requiretls_refusal(target: PlannedHost) -> str | None:
    """
    Why a REQUIRETLS message may not go to C{target} at all (RFC 8689 §2,
    §4.2.1 step 2), or L{None} when it may be tried (see the table in the
    module docstring).
    """
    action = target.action
    if action in (HostAction.REQUIRE_DANE, HostAction.REQUIRE_VERIFIED_TLS, HostAction.DEFER):
        return None
    if action is HostAction.RECORD_ONLY:
        if target.matches_policy:
            return None
        # RFC 8689 §4.2.1 step 2 with RFC 8461 §4.1: a testing policy
        # validates only the hosts it lists.
        return f"{target.host} is not listed by the domain's MTA-STS policy (testing)"
    if action is HostAction.SKIP:
        return f"{target.host} is not listed by the domain's MTA-STS policy (enforce)"
    if action is HostAction.REQUIRE_TLS:
        return f"{target.host} has DANE TLSA records but none usable: the server cannot be authenticated"
    return f"neither DNSSEC (DANE) nor an MTA-STS policy authenticates {target.host}"


def requiretls_allows(target: PlannedHost) -> bool:
    """Whether a REQUIRETLS message may be tried at C{target} (L{requiretls_refusal})."""
    return requiretls_refusal(target) is None


def requiretls_target(target: PlannedHost) -> PlannedHost:
    """
    C{target} as a REQUIRETLS message must treat it: a host a C{testing}
    policy lists is held to C{enforce}'s rules (STARTTLS required, the
    certificate verified, the handshake aborted otherwise: RFC 8689
    §4.2.1 step 4, no testing-mode leniency).  Others are unchanged.
    """
    if target.action is HostAction.RECORD_ONLY and target.matches_policy:
        return attrs.evolve(
            target, action=HostAction.REQUIRE_VERIFIED_TLS, verify=VerifyMode.VERIFY, require_tls=True
        )
    return target


def session_refusal(
    *,
    tls_version: str | None,
    verified: bool,
    verify_mode: VerifyMode,
    extensions: Mapping[str, str],
) -> RequireTLSError | None:
    """
    Whether one session may carry a REQUIRETLS message (RFC 8689 §2,
    §4.2.1 steps 4 and 5): L{None}, or the L{RequireTLSError} to end it
    with.

    @param extensions: the EHLO keywords (after STARTTLS, when TLS).
    """
    if tls_version is None:
        return RequireTLSError(
            f"{STATUS_ENCRYPTION_NEEDED} REQUIRETLS: no TLS session (RFC 8689 §4.2.1)", RefusalKind.TLS
        )
    if not verified or verify_mode not in (VerifyMode.VERIFY, VerifyMode.DANE):
        return RequireTLSError(
            f"{STATUS_ENCRYPTION_NEEDED} REQUIRETLS: the server's certificate was not verified (RFC 8689 §4.2.1)",
            RefusalKind.TLS,
        )
    if "REQUIRETLS" not in extensions:
        return RequireTLSError(
            f"{STATUS_REQUIRETLS} REQUIRETLS support required: the server does not offer REQUIRETLS"
            " after STARTTLS (RFC 8689 §4.2.1)",
            RefusalKind.CAPABILITY,
        )
    return None


def relax_for_tls_optional(target: PlannedHost) -> PlannedHost:
    """
    C{target} for a message with C{TLS-Required: No} (RFC 8689 §4.2.2,
    §8.4: "behave as if it does not support DANE or MTA-STS"): STARTTLS is
    still attempted and the certificate still checked and recorded (so a
    failure is still reported), but nothing is required: an C{enforce}
    policy's host, listed or not, becomes a C{testing} one; a DANE
    decision is recorded, not enforced.
    """
    action = target.action
    if action in (HostAction.RECORD_ONLY, HostAction.OPPORTUNISTIC):
        return target
    if action is HostAction.SKIP:
        return attrs.evolve(
            target, action=HostAction.RECORD_ONLY, verify=VerifyMode.RECORD_ONLY, require_tls=False,
            skip_reason=None,
        )
    # REQUIRE_VERIFIED_TLS, REQUIRE_DANE, REQUIRE_TLS, DEFER.
    return attrs.evolve(
        target, action=HostAction.RECORD_ONLY, verify=VerifyMode.RECORD_ONLY, require_tls=False, skip_reason=None
    )


_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")


def tls_required_no(header: bytes) -> bool:
    """
    Whether a message header (up to its empty line) carries
    C{TLS-Required: No} (RFC 8689 §3: C{"TLS-Required:" [FWS] "No"},
    case-insensitive as all ABNF strings).  Several instances are
    forbidden (§3): a message with more than one is treated as having
    none, so a malformed header never weakens the recipient's policy.
    """
    values = []
    for line in _UNFOLD.sub(b" ", header).splitlines():
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"tls-required":
            values.append(value.strip().lower())
    return values == [b"no"]


class _Attempt(Protocol):
    """What L{SenderControls.attempted} reads of a session's attempt."""

    @property
    def host(self) -> str: ...

    @property
    def requiretls_refused(self) -> RefusalKind | None: ...

    @property
    def error(self) -> str | None: ...

    @property
    def tls_decided(self) -> bool: ...

    @property
    def tls_negotiated(self) -> bool: ...

    @property
    def verified(self) -> bool: ...


@attrs.define
class SenderControls:
    """
    The RFC 8689 controls of one delivery: which hosts a REQUIRETLS
    message may be tried at, what became of them, and what the
    recipients left over get.

    @ivar requiretls: the message is tagged REQUIRETLS and has a
        reverse-path (§4.2.1 exempts bounces).
    @ivar tls_optional: it has C{TLS-Required: No} and no REQUIRETLS (§4.1).
    @ivar refused: the hosts REQUIRETLS kept it from, and why.
    @ivar tried: the hosts it was tried at.
    """

    requiretls: bool
    tls_optional: bool
    refused: dict[str, tuple[RefusalKind, str]] = attrs.field(factory=dict)
    tried: set[str] = attrs.field(factory=set)

    @classmethod
    def of(cls, requiretls: bool, null_sender: bool, tls_required_no: bool) -> SenderControls:
        """
        The controls of a message: REQUIRETLS unless the sender is null;
        C{TLS-Required: No} only without the REQUIRETLS parameter (§4.1:
        the header is then ignored).
        """
        return cls(requiretls=requiretls and not null_sender, tls_optional=tls_required_no and not requiretls)

    def targets(self, planned: Iterable[PlannedHost], domain: str = "") -> tuple[PlannedHost, ...]:
        """
        The planned hosts as this message must try them: relaxed for
        C{TLS-Required: No}; for REQUIRETLS without the hosts it may not
        go to (recorded in C{refused}, logged) and with C{testing} hosts
        held to verification.  Hosts the plan skips stay (the deliverer
        reports them), recorded as refused.

        @param domain: the recipient domain, for the log.
        """
        if self.tls_optional:
            log.info(  # grep: "TLS-Required: No"
                "TLS-Required: No: {domain}'s MTA-STS and DANE policies are not enforced for this message"
                " (RFC 8689 §4.2.2)", domain=domain)
            return tuple(relax_for_tls_optional(t) for t in planned)
        if not self.requiretls:
            return tuple(planned)
        kept = []
        for target in planned:
            why = requiretls_refusal(target)
            if why is None:
                kept.append(requiretls_target(target))
                continue
            self.refused[target.host] = (RefusalKind.PATH, why)
            log.info("REQUIRETLS: not sending to {host}: {why}", host=target.host, why=why)  # grep: "REQUIRETLS:"
            if target.action is HostAction.SKIP:
                kept.append(target)
        return tuple(kept)

    def attempted(self, attempt: _Attempt) -> None:
        """Note what one new session with a host did."""
        if not self.requiretls:
            return
        self.tried.add(attempt.host)
        if attempt.requiretls_refused is not None:
            self.refused.setdefault(attempt.host, (attempt.requiretls_refused, attempt.error or ""))
        elif attempt.tls_decided and not (attempt.tls_negotiated and attempt.verified):
            # No STARTTLS, or a failed handshake or certificate (step 4).
            self.refused.setdefault(attempt.host, (RefusalKind.TLS, attempt.error or "TLS failed"))

    def unsent(self, domain: str, hosts: Iterable[str]) -> str | None:
        """
        For recipients no host took: the permanent reason when REQUIRETLS
        kept the message from every host (RFC 8689 §4.2.1: "the client
        MUST NOT transmit the message to the domain" and a non-delivery
        notification follows), or L{None} (some host failed for another
        reason, e.g. unreachable: retried as usual).

        @param hosts: every planned host of the delivery.
        """
        if not self.requiretls:
            return None
        hosts = list(dict.fromkeys(hosts))
        if not hosts or any(h not in self.refused for h in hosts):
            return None
        kinds = {kind for kind, _ in self.refused.values()}
        status = STATUS_ENCRYPTION_NEEDED if kinds == {RefusalKind.TLS} else STATUS_REQUIRETLS
        reasons = "; ".join(f"{h}: {self.refused[h][1]}" for h in hosts)
        return f"{status} REQUIRETLS: no MX host of {domain} meets the sender's TLS requirements: {reasons}"
