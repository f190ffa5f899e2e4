"""
The sends shelf of the TLSRPT reports (L{SENDS_TABLE}): one row per
(UTC day, policy domain), the states a report goes through
(L{SendState}), and what a run did with one (L{SendOutcome}).

A row is claimed by one node (the state C{sending}, with a lease), then
left C{retry} or final (L{FINAL}); L{ReportScheduler
<mtasts_twisted.tlsrpt.schedule.ReportScheduler>} writes them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

from mtasts_twisted.tlsrpt.aggregate import RESULTS_TABLE

__all__ = ["FINAL", "SENDS_TABLE", "TABLES", "SendOutcome", "SendState"]

#: The shelf of report sends; key C{"<day>|<policy-domain>"}.
SENDS_TABLE = "tlsrpt_sends"
#: The shelves the TLSRPT package needs: pass them to C{open_store(tables=...)}.
TABLES: tuple[str, ...] = (RESULTS_TABLE, SENDS_TABLE)


class SendState(str, enum.Enum):
    """The state of one report in the sends shelf."""

    #: Claimed by a node that is attempting delivery (until C{lease_until}).
    SENDING = "sending"
    #: An attempt failed; the next is due at C{next_attempt}.
    RETRY = "retry"
    #: Final: an endpoint accepted the report.
    SENT = "sent"
    #: Final: the domain has no (usable) TLSRPT record.
    DROPPED = "dropped"
    #: Final: only successful sessions, and those are not reported.
    SKIPPED = "skipped"
    #: Final: no endpoint accepted it within the retry period (RFC 8460 §5.5).
    FAILED = "failed"


#: The states a report is never sent from again.
FINAL = frozenset({SendState.SENT, SendState.DROPPED, SendState.SKIPPED, SendState.FAILED})


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class SendOutcome:
    """
    What one node did with one report in one run.

    @ivar day: the UTC day.
    @ivar policy_domain: the policy domain.
    @ivar state: the state the report is left in.
    @ivar delivered_to: the rua URIs (per address for C{mailto:}) that
        accepted it.
    @ivar errors: what failed, one text per endpoint or lookup.
    """

    day: str
    policy_domain: str
    state: SendState
    delivered_to: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    errors: tuple[str, ...] = attrs.field(default=(), converter=_strings)
