"""
The status page's data: frozen values made by pure functions from what the
service's components hold (L{mtasts_twisted.web.sources} reads them; the
pages render them, L{mtasts_twisted.web.pages}).

Every string here that came from a peer (a policy text, an MX host name,
an SMTP reply, a fetch error) is attacker-controlled: the values keep it
as it is, and the rendering escapes it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from mtasts_twisted.web.dane import DANESummary
from mtasts_twisted.web.timestamps import format_time
from mtasts_twisted.web.verdict import Verdict

__all__ = [
    "DomainPage",
    "DomainRow",
    "HostRow",
    "Overview",
    "QueueRow",
    "ReportRow",
    "ResultRow",
    "Series",
    "domain_page",
    "domain_rows",
    "format_time",
    "overview",
    "queue_rows",
    "report_rows",
]

#: Delivery outcomes in chart order.
OUTCOMES = ("delivered", "transient", "permanent")
#: Socketmap answers in chart order.
ANSWERS = ("ok", "notfound", "temp", "perm")
#: Policy modes in chart order (C{no-policy}: the domain has none).
MODES = ("enforce", "testing", "none", "no-policy")


def _ints(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


@attrs.frozen
class Series:
    """
    One line (or bar stack part) of a chart.

    @ivar label: what is counted.
    @ivar points: one count per hour (or per bar), oldest first.
    """

    label: str
    points: tuple[int, ...] = attrs.field(converter=_ints)


@attrs.frozen
class Overview:
    """
    The overview page.

    @ivar now: when it was made.
    @ivar hours: the start of each chart hour, oldest first.
    @ivar deliveries: recipients per hour, one L{Series} per
        C{outcome/mode} with any count.
    @ivar lookups: socketmap answers per hour by kind (C{ok},
        C{notfound}, C{temp}, C{perm}).
    @ivar tls_failures: failed sessions per hour by RFC 8460 result type.
    @ivar tls_totals: failed sessions since start by result type.
    @ivar queue_messages: messages queued, or L{None} without a relay.
    @ivar queue_oldest_age: seconds the oldest has waited, or L{None}.
    @ivar report_outcomes: report runs' outcomes since start by state.
    @ivar reports_pending: reports not yet sent by state (collecting, due,
        sending, retry).
    @ivar cache_entries: policies in the cache front, or L{None} before the
        cache is open.
    @ivar last_refresh: the refresher's last run (C{entries}, C{deleted},
        C{scheduled}), or L{None}.
    """

    now: float
    hours: tuple[float, ...]
    deliveries: tuple[Series, ...]
    lookups: tuple[Series, ...]
    tls_failures: tuple[Series, ...]
    tls_totals: tuple[tuple[str, int], ...]
    queue_messages: int | None
    queue_oldest_age: float | None
    report_outcomes: tuple[tuple[str, int], ...]
    reports_pending: tuple[tuple[str, int], ...]
    cache_entries: int | None
    last_refresh: tuple[tuple[str, int], ...] | None


def _series(hourly: Sequence[tuple[float, Mapping[Hashable, int]]], keys: Iterable[Hashable],
            label: Any) -> tuple[Series, ...]:
    out = []
    for key in keys:
        points = tuple(counts.get(key, 0) for _, counts in hourly)
        if any(points):
            out.append(Series(label(key), points))
    return tuple(out)


def _ordered_keys(hourly: Sequence[tuple[float, Mapping[Hashable, int]]], first: Sequence[Hashable]) -> list[Hashable]:
    seen = {key for _, counts in hourly for key in counts}
    return [k for k in first if k in seen] + sorted((k for k in seen if k not in first), key=str)


def overview(
    now: float,
    hourly_deliveries: Sequence[tuple[float, Mapping[Hashable, int]]],
    hourly_tls_failures: Sequence[tuple[float, Mapping[Hashable, int]]],
    tls_totals: Mapping[str, int],
    queue: tuple[int, float] | None,
    report_outcomes: Mapping[str, int],
    pending_states: Iterable[str],
    cache_entries: int | None,
    last_refresh: Mapping[str, int] | None,
    hourly_lookups: Sequence[tuple[float, Mapping[Hashable, int]]] = (),
) -> Overview:
    """
    The L{Overview} of the given counts.

    @param now: POSIX time.
    @param hourly_deliveries: C{HourlyCounts.series} of C{(outcome, mode)}.
    @param hourly_tls_failures: C{HourlyCounts.series} of result types.
    @param tls_totals: failed sessions by result type since start.
    @param queue: C{(messages, oldest_age)}, or L{None} without a relay.
    @param report_outcomes: report outcomes by state since start.
    @param pending_states: the state of each report not yet sent.
    @param cache_entries: the cache front's size, or L{None}.
    @param last_refresh: the refresher's last summary, or L{None}.
    @param hourly_lookups: C{HourlyCounts.series} of socketmap answers.
    """
    keys = [(o, m) for o in OUTCOMES for m in MODES]
    deliveries = _series(hourly_deliveries, _ordered_keys(hourly_deliveries, keys),
                         lambda k: f"{k[0]}/{k[1]}" if isinstance(k, tuple) else str(k))
    failures = _series(hourly_tls_failures, _ordered_keys(hourly_tls_failures, []), str)
    pending: dict[str, int] = {}
    for state in pending_states:
        pending[state] = pending.get(state, 0) + 1
    return Overview(
        now=now,
        hours=tuple(hour for hour, _ in hourly_deliveries),
        deliveries=deliveries,
        lookups=_series(hourly_lookups, _ordered_keys(hourly_lookups, ANSWERS), str),
        tls_failures=failures,
        tls_totals=tuple(sorted(tls_totals.items())),
        queue_messages=queue[0] if queue is not None else None,
        queue_oldest_age=queue[1] if queue is not None else None,
        report_outcomes=tuple(sorted(report_outcomes.items())),
        reports_pending=tuple(sorted(pending.items())),
        cache_entries=cache_entries,
        last_refresh=tuple(last_refresh.items()) if last_refresh is not None else None,
    )


@attrs.frozen
class DomainRow:
    """
    One cached policy (the domains page).

    @ivar domain: the policy domain.
    @ivar mode: the policy's mode, or C{-} (no policy, a fetch failed).
    @ivar policy_id: the C{_mta-sts} record's C{id}, or C{-}.
    @ivar valid_until: when the cached policy ends (POSIX time), or L{None}.
    @ivar last_error: the last fetch failure (reason code and detail), or
        C{""}.
    @ivar mx: the policy's C{mx} patterns.
    @ivar dane: its DANE status today
        (L{DANESummary<mtasts_twisted.web.dane.DANESummary>}), or L{None}
        when not read.
    """

    domain: str
    mode: str
    policy_id: str
    valid_until: float | None
    last_error: str
    mx: tuple[str, ...] = ()
    dane: DANESummary | None = None


def _error_text(failure: Any) -> str:
    if failure is None:
        return ""
    reason = getattr(failure, "failure_reason_code", None) or ""
    kind = getattr(getattr(failure, "result_type", None), "value", "")
    return " ".join(part for part in (kind, reason) if part)


def domain_row(entry: Any) -> DomainRow:
    """The L{DomainRow} of a L{CacheEntry<mtasts_twisted.cache.CacheEntry>}."""
    policy = entry.policy
    return DomainRow(
        domain=entry.domain,
        mode=policy.mode.value if policy is not None else "-",
        policy_id=entry.record_id or "-",
        valid_until=entry.valid_end if policy is not None else None,
        last_error=_error_text(entry.backoff_failure),
        mx=tuple(policy.mx) if policy is not None else (),
    )


def domain_rows(entries: Iterable[Any], query: str = "") -> tuple[DomainRow, ...]:
    """
    The cached policies, sorted by domain; only those whose domain, mode or
    error contains C{query} (case-insensitive) when one is given.

    @param entries: L{CacheEntry<mtasts_twisted.cache.CacheEntry>}s.
    @param query: the filter (the C{q} query parameter).
    """
    rows = sorted((domain_row(e) for e in entries), key=lambda r: r.domain)
    q = query.strip().lower()
    if q:
        rows = [r for r in rows if q in r.domain.lower() or q == r.mode or q in r.last_error.lower()]
    return tuple(rows)


@attrs.frozen
class HostRow:
    """
    An MX host of a domain and its last delivery outcome.

    @ivar host: the host name (as the MX record or the policy said).
    @ivar when: the last attempt, or L{None} (none since start).
    @ivar status: its outcome (C{delivered}, C{transient}, C{permanent}) or C{-}.
    @ivar tls: the TLS version and whether the certificate was verified, or C{-}.
    @ivar message: the peer's reply or the error.
    """

    host: str
    when: float | None = None
    status: str = "-"
    tls: str = "-"
    message: str = ""


@attrs.frozen
class ResultRow:
    """
    Today's TLSRPT counts of one policy of a domain.

    @ivar policy_type: C{sts}, C{tlsa}, C{no-policy-found}.
    @ivar successes: successful sessions.
    @ivar failures: failed sessions.
    @ivar details: C{(result_type, mx_host, count)} per failure detail.
    @ivar policy_domain: the policy's domain: the domain itself, or for
        C{tlsa} the TLSA base domain of an MX host (RFC 8460 §3).
    """

    policy_type: str
    successes: int
    failures: int
    details: tuple[tuple[str, str, int], ...] = ()
    policy_domain: str = ""


@attrs.frozen
class DomainPage:
    """
    One domain's page.

    @ivar row: its L{DomainRow}, or L{None} (not cached).
    @ivar domain: the domain asked for.
    @ivar policy_text: the policy as served, or C{""}.
    @ivar hosts: its MX hosts (the policy's patterns, then the hosts
        delivered to) with their last outcome.
    @ivar results: today's TLSRPT results.
    @ivar day: today, C{YYYY-MM-DD}.
    @ivar verdict: what the service would answer now, from the cache
        (L{Verdict<mtasts_twisted.web.verdict.Verdict>}), or L{None}.
    @ivar dane: its DANE status today
        (L{DANESummary<mtasts_twisted.web.dane.DANESummary>}), or L{None}.
    """

    domain: str
    row: DomainRow | None
    policy_text: str
    hosts: tuple[HostRow, ...]
    results: tuple[ResultRow, ...]
    day: str
    verdict: Verdict | None = None
    dane: DANESummary | None = None


def domain_page(domain: str, entry: Any | None, outcomes: Mapping[tuple[str, str], Any],
                results: Iterable[Any], day: str, verdict: Verdict | None = None,
                dane: DANESummary | None = None) -> DomainPage:
    """
    The L{DomainPage} of C{domain}.

    @param domain: the domain (lower case).
    @param entry: its L{CacheEntry<mtasts_twisted.cache.CacheEntry>}, or L{None}.
    @param outcomes: the last outcome by C{(domain, mx_host)}
        (C{ServiceStats.mx_outcomes}).
    @param results: today's merged L{Result<mtasts_twisted.results.Result>}s.
    @param day: today.
    @param verdict: the L{Verdict<mtasts_twisted.web.verdict.Verdict>}.
    @param dane: the L{DANESummary<mtasts_twisted.web.dane.DANESummary>}.
    """
    row = domain_row(entry) if entry is not None else None
    policy = entry.policy if entry is not None else None
    hosts: dict[str, HostRow] = {pattern: HostRow(pattern) for pattern in (row.mx if row else ())}
    for (d, host), o in outcomes.items():
        if d == domain:
            tls = f"{o.tls_version} {'verified' if o.verified else 'not verified'}" if o.tls_version else "no TLS"
            hosts[host] = HostRow(host, o.when, o.status, tls, o.message)
    rows = []
    for result in results:
        rows.append(ResultRow(
            result.policy.policy_type.value, result.success_count, result.failure_count,
            tuple((f.result_type.value, f.receiving_mx_hostname or "-", f.failed_session_count)
                  for f in result.failures), result.policy.policy_domain))
    return DomainPage(domain, row, policy.text if policy is not None else "", tuple(hosts.values()),
                      tuple(rows), day, verdict, dane)


@attrs.frozen
class ReportRow:
    """
    A report not yet sent (L{PendingReport<mtasts_twisted.tlsrpt.PendingReport>}).

    @ivar day: C{YYYY-MM-DD}.
    @ivar domain: the policy domain.
    @ivar state: C{collecting}, C{due}, C{sending} or C{retry}.
    @ivar attempts: delivery attempts.
    @ivar next_attempt: the next one (retry), or L{None}.
    @ivar last_error: why the last one failed.
    """

    day: str
    domain: str
    state: str
    attempts: int = 0
    next_attempt: float | None = None
    last_error: str = ""


def report_rows(pending: Iterable[Any]) -> tuple[ReportRow, ...]:
    """The L{ReportRow}s of L{PendingReport<mtasts_twisted.tlsrpt.PendingReport>}s, by day and domain."""
    return tuple(sorted(
        (ReportRow(p.day, p.policy_domain, p.state, p.attempts, p.next_attempt, p.last_error or "")
         for p in pending), key=lambda r: (r.day, r.domain)))


@attrs.frozen
class QueueRow:
    """
    A queued message.

    @ivar ident: its queue id.
    @ivar sender: the envelope sender.
    @ivar recipients: its recipients still pending.
    @ivar created: when it was queued.
    @ivar attempts: delivery attempts.
    @ivar next_attempt: the next one, or L{None}.
    @ivar last_error: why the last one failed (the peer's words).
    """

    ident: str
    sender: str
    recipients: tuple[str, ...]
    created: float
    attempts: int
    next_attempt: float | None
    last_error: str


def queue_rows(messages: Iterable[Any]) -> tuple[QueueRow, ...]:
    """The L{QueueRow}s of L{QueuedMessage<mtasts_twisted.relay.QueuedMessage>}s, oldest first."""
    return tuple(sorted(
        (QueueRow(m.id, m.sender, tuple(r.address for r in m.pending), m.created, m.attempts,
                  m.next_attempt, m.last_error or "") for m in messages),
        key=lambda r: (r.created, r.ident)))
