"""
The outcomes a delivery decides itself rather than by a server's reply
to a recipient, pure.  Their text starts with an RFC 3463 enhanced status
code; their C{code} is L{None}, or the code of the last failed session.

  - L{every_recipient}: one outcome for every recipient, when the policy
    lookup or the MX lookup stopped the delivery before any host was
    tried.
  - L{unsent}: the recipients no MX host took: permanent when no host
    could meet REQUIRETLS (RFC 8689 §4.2.1); otherwise temporary, with the
    last errors — a DANE failure is temporary (RFC 7672 §2.1.2, §2.2), and
    under an enforced policy nothing is permanent before a fresh policy
    check (RFC 8461 §5.1).
"""

from __future__ import annotations

from mtasts_twisted.delivery.values import RecipientOutcome, Status

__all__ = ["MAX_ERRORS_SHOWN", "every_recipient", "unsent"]

#: Errors of failed attempts kept for a transient outcome's message.
MAX_ERRORS_SHOWN = 4


def every_recipient(
    recipients: list[str], status: Status, message: str, mx_host: str | None = None
) -> dict[str, RecipientOutcome]:
    """The same outcome for each of C{recipients}: C{status} and C{message}, no code."""
    return {r: RecipientOutcome(r, status, None, message, mx_host, None, False) for r in recipients}


def unsent(
    domain: str,
    pending: list[str],
    errors: list[str],
    *,
    refused: str | None,
    dane_failed: bool,
    enforce: bool,
    last_host: str | None,
    last_code: int | None,
) -> dict[str, RecipientOutcome]:
    """
    The outcomes of the C{pending} recipients, whom no MX host of C{domain}
    took.

    @param errors: why each host or address failed, in order; the last
        L{MAX_ERRORS_SHOWN} are given.
    @param refused: the permanent reason when REQUIRETLS kept the message
        from every host (L{SenderControls.unsent
        <mtasts_twisted.delivery.requiretls.SenderControls.unsent>}), or
        L{None}.
    @param dane_failed: a host was decided by DANE, or failed or was
        deferred for it.
    @param enforce: the recipient domain's policy is C{enforce}.
    @param last_host: the last MX host tried.
    @param last_code: the reply code of the last failed session, if any.
    """
    shown = errors[-MAX_ERRORS_SHOWN:] or ["no MX host could be tried"]
    if refused is not None:
        # RFC 8689 §4.2.1: no host meets REQUIRETLS: permanent.
        return {
            recipient: RecipientOutcome(recipient, Status.PERMANENT, None, refused, last_host, None, False)
            for recipient in pending
        }
    if dane_failed:
        # RFC 7672 §2.1.2, §2.2: a DANE failure is temporary.
        text = f"4.7.5 no MX host of {domain} passed DANE or MTA-STS checks and took the message: "
    elif enforce:
        # RFC 8461 §5.1: never permanent before a fresh policy check;
        # the relay's retry looks the policy up again.
        text = f"4.7.5 no MX host of {domain} passed MTA-STS (enforce) checks and took the message: "
    else:
        text = f"4.4.1 no MX host of {domain} took the message: "
    return {
        recipient: RecipientOutcome(
            recipient, Status.TRANSIENT, last_code, text + "; ".join(shown), last_host, None, False
        )
        for recipient in pending
    }
