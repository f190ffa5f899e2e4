"""
Mailed TLSRPT reports: the C{send_mail} of the service's
L{ReportScheduler<mtasts_twisted.tlsrpt.ReportScheduler>}.

L{ReportMailer} delivers one report message directly to the recipient
domain's MX through a L{Deliverer<mtasts_twisted.delivery.Deliverer>} built
with L{NoPolicyCache}, so (RFC 8460 §5.3) a report is delivered with
opportunistic STARTTLS even where the recipient's MTA-STS policy would
refuse its MX.
"""

from __future__ import annotations

import io
from twisted.internet.defer import Deferred

from mtasts_twisted.delivery.sources import NoPolicySource
from mtasts_twisted.interfaces import IDeliverer
from mtasts_twisted.policy import MTASTSError

__all__ = ["NoPolicyCache", "ReportMailError", "ReportMailer"]


#: The policy source of report mail (RFC 8460 §5.3), under the name the
#: service has always exported.
NoPolicyCache = NoPolicySource


class ReportMailError(MTASTSError):
    """A mailed report was not accepted by the recipient's MX."""

    reason = "mail-failed"


class ReportMailer:
    """
    The C{send_mail} of L{ReportScheduler}: delivers one report message
    directly to the recipient domain's MX with opportunistic TLS, recording
    no TLSRPT results (RFC 8460 §3).
    """

    def __init__(self, deliverer: IDeliverer) -> None:
        """
        @param deliverer: a L{Deliverer} built with L{NoPolicyCache} and
            L{NULL_SINK<mtasts_twisted.tlsrpt.NULL_SINK>}.
        """
        self._deliverer = deliverer

    def __call__(self, sender: str, recipient: str, message: bytes) -> Deferred[object]:
        """
        Deliver C{message}; fail with L{ReportMailError} unless accepted.

        @return: L{Deferred} firing with the recipient's
            L{RecipientOutcome<mtasts_twisted.delivery.RecipientOutcome>}.
        """
        return Deferred.fromCoroutine(self._send(sender, recipient, message))

    async def _send(self, sender: str, recipient: str, message: bytes) -> object:
        from mtasts_twisted.delivery import Status

        result = await self._deliverer.deliver(sender, [recipient], io.BytesIO(message))
        outcome = result.outcome(recipient)
        if outcome.status is not Status.DELIVERED:
            raise ReportMailError(f"{recipient}: {outcome.status.value}: {outcome.code or ''} {outcome.message}")
        return outcome
