"""
The records of one SMTP session of a delivery, shared by the dialogue that
fills them, the accounting and log lines that read them, and the session
reuse that parks them:

  - L{Attempt}: what one session did: the recipients it decided, why it
    ended, and what its STARTTLS decision was (for the TLSRPT accounting
    in L{mtasts_twisted.delivery.accounting}).
  - L{Connection}: a session past its (TLS) setup, as carried from
    transaction to transaction when it is reused
    (L{mtasts_twisted.delivery.sessions}).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall

from mtasts_twisted.delivery.protocol import ClientProtocol
from mtasts_twisted.delivery.requiretls import RefusalKind
from mtasts_twisted.delivery.values import RecipientOutcome, Status
from mtasts_twisted.results import FailureDetails
from mtasts_twisted.tls import VerifyMode

__all__ = ["Attempt", "Connection"]


@attrs.define
class Attempt:
    """
    What one session with one address of one MX host did.

    @ivar host: the MX host.
    @ivar ip: the address.
    @ivar local_ip: the local address of the connection (RFC 8460 §4.4
        C{sending-mta-ip}), once connected.
    @ivar outcomes: the recipients it decided.
    @ivar error: why it ended without deciding the others, or L{None}.
    @ivar code: the reply code that ended it, if any.
    @ivar retry_plaintext: its TLS handshake failed and the plan allows a
        retry without STARTTLS on a new connection.
    @ivar tls_version: e.g. C{"TLSv1.3"} once TLS is negotiated.
    @ivar verified: whether the certificate verified.
    @ivar tls_decided: whether it reached the STARTTLS decision (STARTTLS
        not offered, refused, or a handshake, failed or completed).
    @ivar tls_failure: why TLS was not negotiated or not verified, once
        decided; L{None} for verified TLS.
    @ivar tls_negotiated: whether the TLS handshake completed.
    @ivar requiretls_refused: why this session could not carry a
        REQUIRETLS message (RFC 8689 §4.2.1), or L{None}.
    """

    host: str
    ip: str
    local_ip: str | None = None
    outcomes: dict[str, RecipientOutcome] = attrs.field(factory=dict)
    error: str | None = None
    code: int | None = None
    retry_plaintext: bool = False
    tls_version: str | None = None
    verified: bool = False
    tls_decided: bool = False
    tls_failure: FailureDetails | None = None
    tls_negotiated: bool = False
    requiretls_refused: RefusalKind | None = None

    def decide(self, recipient: str, status: Status, code: int | None, message: str) -> None:
        """Record the outcome for C{recipient}."""
        self.outcomes[recipient] = RecipientOutcome(
            recipient, status, code, message, self.host, self.tls_version, self.verified
        )

    def tls_decision(self, failure: FailureDetails | None, negotiated: bool) -> None:
        """Record the STARTTLS decision: C{failure} (or L{None}), and whether TLS was negotiated."""
        self.tls_decided = True
        self.tls_failure = failure
        self.tls_negotiated = negotiated


@attrs.define(eq=False)
class Connection:
    """
    An open SMTP session past its (TLS) setup, as parked for reuse.

    @ivar proto: its protocol.
    @ivar timer: its session timeout.
    @ivar key: its L{DeliveryPlan.reuse_key
        <mtasts_twisted.delivery.plan.DeliveryPlan.reuse_key>}.
    @ivar host: the MX host.
    @ivar ip: the address connected to.
    @ivar created: when it connected (the clock's seconds).
    @ivar verify_mode: the L{VerifyMode} its handshake ran under.
    @ivar tls_version: e.g. C{"TLSv1.3"}, or L{None} without TLS.
    @ivar verified: whether its certificate verified.
    @ivar extensions: the EHLO keywords after STARTTLS.
    @ivar transactions: transactions it has carried.
    """

    proto: ClientProtocol
    timer: IDelayedCall
    key: tuple[Any, ...]
    host: str
    ip: str
    created: float
    verify_mode: VerifyMode
    tls_version: str | None
    verified: bool
    extensions: dict[str, str]
    transactions: int = 0
