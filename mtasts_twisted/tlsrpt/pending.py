"""
The read-only view of the TLSRPT reports not yet sent, for C{report
preview}: which are pending (L{pending_reports}) and the JSON one would
send (L{preview_report}).  Reads the results and sends shelves; writes
nothing.
"""

from __future__ import annotations

import random
from typing import Any

import attrs

from mtasts_twisted.interfaces import IShelf
from mtasts_twisted.policy import MTASTSError
from mtasts_twisted.tlsrpt.aggregate import decode_results, merge_results, results_key, split_key
from mtasts_twisted.tlsrpt.report import Report, ReportSettings, day_bounds, new_unique
from mtasts_twisted.tlsrpt.sends import FINAL, SendState

__all__ = ["NoResultsError", "PendingReport", "pending_reports", "preview_report"]


class NoResultsError(MTASTSError):
    """There are no results for the asked day and policy domain."""

    reason = "no-results"


@attrs.frozen
class PendingReport:
    """
    A report not yet finished.

    @ivar day: the UTC day, C{YYYY-MM-DD}.
    @ivar policy_domain: the policy domain (A-labels).
    @ivar state: C{"collecting"} (the day is not over), C{"due"} (waiting
        for the daily run), or C{"sending"} / C{"retry"} (see L{SendState}).
    @ivar attempts: delivery attempts so far.
    @ivar next_attempt: POSIX time of the next attempt (C{"retry"} only).
    @ivar last_error: why the last attempt failed, if it did.
    """

    day: str
    policy_domain: str
    state: str
    attempts: int = 0
    next_attempt: float | None = None
    last_error: str | None = None


async def pending_reports(
    results: IShelf, sends: IShelf, today: str, day: str | None = None, domain: str | None = None
) -> list[PendingReport]:
    """
    The reports not yet finished.

    @param results: the results shelf (L{RESULTS_TABLE
        <mtasts_twisted.tlsrpt.aggregate.RESULTS_TABLE>}).
    @param sends: the sends shelf (L{SENDS_TABLE
        <mtasts_twisted.tlsrpt.sends.SENDS_TABLE>}).
    @param today: the UTC day now, C{YYYY-MM-DD} (its results are still
        being collected).
    @param day: only this C{YYYY-MM-DD}.
    @param domain: only this policy domain.
    @return: L{PendingReport}s sorted by day and domain.
    """
    rows = dict(await sends.items())
    found: dict[str, PendingReport] = {}
    for key, _ in await results.items():
        if key not in rows:
            d, name = split_key(key)
            found[key] = PendingReport(d, name, "collecting" if d >= today else "due")
    for key, row in rows.items():
        state = SendState(row["state"])
        if state not in FINAL:
            d, name = split_key(key)
            found[key] = PendingReport(
                d, name, state.value, row.get("attempts", 0),
                row.get("next_attempt") if state is SendState.RETRY else None,
                row.get("last_error"),
            )
    return [
        p for _, p in sorted(found.items())
        if (day is None or p.day == day) and (domain is None or p.policy_domain == domain)
    ]


async def preview_report(
    results: IShelf, sends: IShelf, settings: ReportSettings, day: str, domain: str, rng: random.Random
) -> dict[str, Any]:
    """
    The RFC 8460 JSON that would be (or is being) sent.

    For a report already claimed this is the claimed snapshot with its
    report id; otherwise the stored results so far, with a report id that
    the real report will not share.

    @param results: the results shelf.
    @param sends: the sends shelf.
    @param settings: the report metadata.
    @param day: C{YYYY-MM-DD}.
    @param domain: the policy domain.
    @param rng: makes the report id of a report not yet claimed.
    @raise NoResultsError: nothing is stored for C{day} and C{domain}.
    """
    day_bounds(day)
    key = results_key(day, domain.lower().rstrip("."))
    row = await sends.get(key)
    if row is not None and "unique" in row:
        unique = row["unique"]
        found = decode_results(row)
    else:
        value = await results.get(key)
        if value is None:
            raise NoResultsError(f"no TLSRPT results for {domain} on {day}")
        unique = new_unique(rng.getrandbits)
        found = merge_results(decode_results(value))
    return Report.build(settings, domain, day, unique, found).to_json()
