"""
STARTTLS in a delivery's SMTP session (RFC 3207) as the plan asks
(L{start_tls}): whether to go on without it, the handshake with the
certificate checked in the host's L{VerifyMode
<mtasts_twisted.tls.VerifyMode>} (and DANE's TLSA records, RFC 7672), and
the decision recorded in the L{Attempt} for the TLSRPT accounting
(RFC 8460 §4.3: C{starttls-not-supported}, the certificate's failure, or
a handshake that failed).

  - STARTTLS not offered, or refused (e.g. 454): a failure of type
    C{starttls-not-supported}; the session goes on in plaintext on the
    same connection unless the plan requires TLS (RFC 8461 §5, RFC 7672
    §2.2; RFC 3207 §4 leaves the choice to the client).
  - Plaintext after the 220 to STARTTLS: the session ends (command
    injection).
  - A failed handshake: classified by the TLS outcome; a new connection
    without STARTTLS may follow unless the plan requires TLS.
"""

from __future__ import annotations

from mtasts_twisted.delivery.attempt import Attempt
from mtasts_twisted.delivery.danehost import dane_check
from mtasts_twisted.delivery.details import starttls_not_supported_details
from mtasts_twisted.delivery.plan import PlannedHost
from mtasts_twisted.delivery.protocol import ClientProtocol, Reply, SessionError
from mtasts_twisted.results import FailureDetails, ResultType
from mtasts_twisted.tls import MXTLSOptionsCache

__all__ = ["start_tls"]


async def start_tls(
    proto: ClientProtocol,
    attempt: Attempt,
    target: PlannedHost,
    extensions: dict[str, str],
    *,
    tls_options: MXTLSOptionsCache,
    helo: bytes,
    timeout: float,
    next_hop: str = "",
) -> Reply | None:
    """
    Negotiate TLS if offered, and say EHLO again under it; record the
    decision in C{attempt} (L{Attempt.tls_decision}, C{.tls_version},
    C{.verified}).

    @param extensions: the EHLO keywords before STARTTLS.
    @param tls_options: makes the session's TLS connection creator.
    @param helo: the EHLO name.
    @param timeout: the reply timeout.
    @param next_hop: the recipient domain (a DANE-TA(2) certificate may
        name it, RFC 7672 §3.2.2).
    @return: the reply to the EHLO under TLS; L{None} when the session goes
        on in plaintext with C{extensions} (STARTTLS not offered or
        refused, where the plan allows it).
    @raise SessionError: the plan requires TLS and it was not negotiated,
        or the handshake failed (C{attempt.retry_plaintext} says whether a
        new connection may try without STARTTLS).
    """
    host, ip, local = attempt.host, attempt.ip, attempt.local_ip
    if "STARTTLS" not in extensions:
        attempt.tls_decision(starttls_not_supported_details(host, ip, sending_mta_ip=local), False)
        if target.require_tls:
            # RFC 8461 §5: enforce requires TLS; RFC 7672 §2.2: so do
            # secure TLSA records.
            raise SessionError("STARTTLS not offered")
        return None
    proto.switching = True
    reply = await proto.command(b"STARTTLS", timeout)
    proto.switching = False
    if reply.code != 220:
        attempt.tls_decision(
            starttls_not_supported_details(host, ip, reply_code=reply.code, sending_mta_ip=local), False
        )
        if target.require_tls:
            raise SessionError(f"STARTTLS refused: {reply}", reply.code)
        # RFC 3207 §4: the client decides whether to go on; opportunistic
        # delivery goes on in plaintext on this connection.
        return None
    if proto.injected:
        raise SessionError("plaintext data after the 220 reply to STARTTLS (command injection)")
    # One creator (one recorder) per session; the OpenSSL context under
    # it is cached per MX host (no context or trust store per session).
    # Under DANE: the TLSA records and SNI the TLSA base domain (RFC
    # 7672 §3, §8.1).
    creator = tls_options.creator(
        host, target.verify, dane=dane_check(target, next_hop), server_name=target.server_name
    )
    proto.tls_transport.startTLS(creator)
    # The EHLO is buffered by the TLS layer until the handshake is done,
    # so under VERIFY it never reaches a server that failed verification.
    try:
        reply = await proto.command(b"EHLO " + helo, timeout)
    except SessionError as e:
        outcome = creator.outcome()
        if outcome is not None and outcome.handshake_completed:
            # TLS was negotiated; the session failed afterwards.
            attempt.tls_version = outcome.tls_version
            attempt.verified = outcome.verified
            attempt.tls_decision(outcome.failure_details(ip, sending_mta_ip=local), True)
            raise
        details: FailureDetails | None = None
        kind = "failed"
        if outcome is not None:
            details = outcome.failure_details(ip, sending_mta_ip=local)
            classified = outcome.classify()
            if classified:
                kind = f"{classified[0].value} ({classified[1]})"
        if details is None:
            details = FailureDetails(
                ResultType.VALIDATION_FAILURE,
                sending_mta_ip=local,
                receiving_mx_hostname=host,
                receiving_ip=ip,
                failure_reason_code="tls-handshake-failure",
            )
        attempt.tls_decision(details, False)
        attempt.retry_plaintext = not target.require_tls
        # The reason once: a refused certificate's error repeats it.
        why = "" if kind != "failed" and kind in str(e) else f"; {e}"
        raise SessionError(f"TLS with {host} failed: {kind}{why}") from None
    outcome = creator.outcome()
    assert outcome is not None
    attempt.tls_version = outcome.tls_version
    attempt.verified = outcome.verified
    attempt.tls_decision(outcome.failure_details(ip, sending_mta_ip=local), True)
    return reply
