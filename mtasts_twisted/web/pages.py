"""
The status pages rendered from their data (L{mtasts_twisted.web.data}) as
L{twisted.web.template} tags, and flattened to bytes by L{render}.

Every value goes into the page as a text node or an attribute value of a
tag, never as markup: the flattener escapes C{<}, C{>}, C{&} and quotes,
so a policy text, an MX name or an SMTP reply (all attacker-controlled)
cannot add markup or script.  Links to a domain's page put the name in a
URL-quoted query parameter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

from twisted.web.template import Tag, flattenString, tags

from mtasts_twisted.web.chart import FAILURE_PALETTE, LOOKUP_COLOURS, bar_chart, hourly_chart, outcome_colour
from mtasts_twisted.web.data import MODES, DomainPage, DomainRow, Overview, QueueRow, ReportRow, format_time
from mtasts_twisted.web.dane import DANESummary
from mtasts_twisted.web.verdict import NO_LOOKUP, Verdict

__all__ = ["domain_html", "domains_html", "overview_html", "queue_html", "render", "report_json_html",
           "reports_html"]

_STYLE = """
body { font-family: sans-serif; margin: 1em 2em; color: #222; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #eee; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; }
.error { color: #b00; }
"""

#: The pages, for the navigation bar: (path, title).
NAV = (("/", "Overview"), ("/domains", "Domains"), ("/reports", "Reports"), ("/queue", "Queue"))


def render(tag: Tag) -> bytes:
    """
    The HTML document of C{tag}, escaped by the flattener.

    @raise Exception: whatever the flattener raised.
    """
    result: list[bytes] = []
    failures: list[Any] = []
    flattenString(None, tag).addCallbacks(result.append, failures.append)
    if failures:
        failures[0].raiseException()
    return b"<!DOCTYPE html>\n" + result[0]


def _page(title: str, *body: Any) -> Tag:
    return tags.html(lang="en")(
        tags.head(tags.meta(charset="utf-8"), tags.title(f"mtasts: {title}"), tags.style(_STYLE)),
        tags.body(tags.nav(*(tags.a(href=path)(name) for path, name in NAV)), tags.h1(title), *body))


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str = "none") -> Tag:
    body = [tags.tr(*(tags.td(cell) for cell in row)) for row in rows]
    if not body:
        return tags.p(empty)
    return tags.table(tags.thead(tags.tr(*(tags.th(h) for h in headers))), tags.tbody(*body))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def overview_html(data: Overview) -> Tag:
    """The overview page of L{Overview} C{data}."""
    queue = ("no relay" if data.queue_messages is None
             else f"{data.queue_messages} messages, oldest {_age(data.queue_oldest_age)}")
    return _page(
        "Overview",
        tags.p(f"as of {format_time(data.now)} UTC"),
        tags.h2("Deliveries per hour (outcome/policy mode), last 24 h"),
        hourly_chart("deliveries per hour", data.hours, data.deliveries,
                     [outcome_colour(s.label, MODES) for s in data.deliveries]),
        tags.h2("Policy lookups per hour (socketmap answers), last 24 h"),
        hourly_chart("socketmap answers per hour", data.hours, data.lookups, LOOKUP_COLOURS),
        tags.h2("TLS failures per hour by RFC 8460 result type, last 24 h"),
        hourly_chart("TLS failures per hour", data.hours, data.tls_failures, FAILURE_PALETTE),
        tags.h2("TLS failures since start"),
        bar_chart("TLS failures by result type", data.tls_totals, FAILURE_PALETTE),
        tags.h2("State"),
        _table(("what", "now"), [
            ("queue", queue),
            ("policy cache", "not open yet" if data.cache_entries is None else f"{data.cache_entries} in memory"),
            ("last refresh run", "none yet" if data.last_refresh is None
             else ", ".join(f"{k} {v}" for k, v in data.last_refresh)),
            ("reports pending", ", ".join(f"{k} {v}" for k, v in data.reports_pending) or "none"),
            ("report runs since start", ", ".join(f"{k} {v}" for k, v in data.report_outcomes) or "none"),
        ]),
    )


def _domain_link(domain: str) -> Tag:
    return tags.a(href="/domain?name=" + quote(domain, safe=""))(domain)


def domains_html(rows: Sequence[DomainRow], query: str, total: int | None = None) -> Tag:
    """
    The domains page: every cached policy, filtered by C{query}.

    @param rows: the rows shown.
    @param query: the filter.
    @param total: how many match (more than shown when the table is capped).
    """
    total = len(rows) if total is None else total
    return _page(
        "Domains",
        tags.form(method="get", action="/domains")(
            tags.input(type="text", name="q", value=query, placeholder="domain, mode or error"),
            tags.input(type="submit", value="filter")),
        tags.p(f"{total} policies" + (f" matching {query!r}" if query else "")
               + (f", the first {len(rows)} shown" if total > len(rows) else "")),
        _table(("domain", "mode", "id", "valid until (UTC)", "last fetch error", "DANE today"),
               [(_domain_link(r.domain), r.mode, r.policy_id, format_time(r.valid_until),
                 tags.span(class_="error")(r.last_error), _dane_cell(r.dane)) for r in rows], "no cached policy"),
    )


def _verdict_html(verdict: Verdict | None) -> list[Any]:
    """The verdict section: the answer now, labelled as made from the cache without a lookup."""
    if verdict is None:
        return []
    rows: list[tuple[str, Any]] = [
        ("socketmap answer", tags.code(verdict.answer) if verdict.answer is not None else "unknown"),
        ("how", verdict.how),
    ]
    if verdict.answer is not None or verdict.cached or verdict.override:
        policy = ("none" if verdict.mode == "-" else f"mode {verdict.mode}"
                  + (", mx " + " ".join(verdict.mx) if verdict.mx else ""))
        state = ("confirmed by DNS within its TTL" if verdict.confirmed
                 else "cached; the next request re-checks the TXT id" if verdict.cached else "nothing cached")
        rows.append(("policy applied", f"{policy} ({state})"))
    if verdict.override:
        rows.append(("override", verdict.override))
    if verdict.as_testing:
        rows.append(("--enforce-as-testing", "on: the enforce policy is applied as testing"))
    if verdict.problem:
        rows.append(("problem", tags.span(class_="error")(verdict.problem)))
    if verdict.relay:
        rows.append(("relay", verdict.relay))
    return [tags.h2(f"Verdict now ({NO_LOOKUP})"), _table(("what", "now"), rows)]


def _dane_cell(dane: DANESummary | None) -> Any:
    if dane is None:
        return "-"
    return tags.span(class_="error")(dane.text) if dane.failures else dane.text


def _dane_html(dane: DANESummary | None) -> list[Any]:
    """The DANE section: today's sessions DANE decided, their TLSA base domains and failing MX hosts."""
    if dane is None:
        return []
    out: list[Any] = [tags.h2("DANE today (RFC 7672, from the TLSRPT results kept for reports)"),
                      tags.p(_dane_cell(dane))]
    if dane.base_domains:
        out.append(tags.p("TLSA base domains: " + ", ".join(dane.base_domains)))
    if dane.mx_hosts:
        out.append(tags.p("MX hosts with failures: " + ", ".join(dane.mx_hosts)))
    return out


def domain_html(page: DomainPage) -> Tag:
    """One domain's page."""
    row = page.row
    summary = (tags.p("not in the cache") if row is None else _table(
        ("mode", "id", "valid until (UTC)", "last fetch error"),
        [(row.mode, row.policy_id, format_time(row.valid_until), tags.span(class_="error")(row.last_error))]))
    return _page(
        f"Domain {page.domain}",
        summary,
        *_verdict_html(page.verdict),
        *_dane_html(page.dane),
        tags.h2("Policy"),
        tags.pre(page.policy_text) if page.policy_text else tags.p("no policy"),
        tags.h2("MX hosts and their last TLS outcome"),
        _table(("host", "last attempt (UTC)", "outcome", "TLS", "reply or error"),
               [(h.host, format_time(h.when), h.status, h.tls, h.message) for h in page.hosts]),
        tags.h2(f"TLSRPT results today ({page.day})"),
        _table(("policy type", "policy domain", "successful sessions", "failed sessions", "failures"),
               [(r.policy_type, r.policy_domain, str(r.successes), str(r.failures),
                 tags.ul(*(tags.li(f"{kind} {host}: {n}") for kind, host, n in r.details)))
                for r in page.results], "no results today"),
    )


def reports_html(rows: Sequence[ReportRow], sent: Sequence[tuple[str, int]]) -> Tag:
    """The reports page: reports not yet sent, and report outcomes since start."""
    return _page(
        "Reports",
        tags.p("Report runs since start: " + (", ".join(f"{k} {v}" for k, v in sent) or "none")),
        _table(("day", "policy domain", "state", "attempts", "next attempt (UTC)", "last error", "JSON"),
               [(r.day, r.domain, r.state, str(r.attempts), format_time(r.next_attempt), r.last_error,
                 tags.a(href=f"/report?day={quote(r.day, safe='')}&domain={quote(r.domain, safe='')}")("view"))
                for r in rows], "no report pending"),
    )


def report_json_html(day: str, domain: str, report: dict[str, Any] | None) -> Tag:
    """One report's JSON (or that there is none)."""
    if report is None:
        return _page(f"Report {day} {domain}", tags.p("no results stored for this day and domain"))
    return _page(f"Report {day} {domain}",
                 tags.p(tags.a(href=f"/report.json?day={quote(day, safe='')}&domain={quote(domain, safe='')}")(
                     "the JSON alone")),
                 tags.pre(json.dumps(report, indent=2, sort_keys=True)))


def queue_html(rows: Sequence[QueueRow] | None, now: float) -> Tag:
    """The queue page (C{rows} L{None}: no relay runs)."""
    if rows is None:
        return _page("Queue", tags.p("the relay is off (no --smtp)"))
    return _page(
        "Queue",
        tags.p(f"{len(rows)} messages"),
        _table(("id", "sender", "pending recipients", "age", "attempts", "next attempt (UTC)", "last error"),
               [(r.ident, r.sender or "<>", ", ".join(r.recipients), _age(now - r.created), str(r.attempts),
                 format_time(r.next_attempt), r.last_error) for r in rows], "the queue is empty"),
    )
