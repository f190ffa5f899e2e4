"""
DANE status per recipient domain on the status pages, from what the
service already stores and never from a lookup: today's TLSRPT results of
the domain (the ones it reports, L{mtasts_twisted.tlsrpt}), whose
C{tlsa} policies (RFC 8460 §4.1) count the sessions DANE decided (RFC
7672; L{delivery.accounting<mtasts_twisted.delivery.accounting>}): one
success or failure per session, under the TLSA base domain of the MX host
(RFC 8460 §3), failures by result type and MX host.

The results exist only where they are kept: the relay's deliveries with
C{--dane} (Postfix reports its own DANE sessions), and only while
reports are on (C{--no-reports} keeps none).  They reach the store at the
aggregator's next flush.  L{dane_summary} is pure;
L{gather_dane<mtasts_twisted.web.sources.gather_dane>} reads.

Every name here (a TLSA base domain, an MX host) came from DNS: the pages
escape it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import attrs

from mtasts_twisted.results import PolicyType, Result


__all__ = ["DANESummary", "dane_summary"]

#: Store reads in flight at once for the domains page.
READ_BATCH = 50


def _pairs(value: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    return tuple(value)


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class DANESummary:
    """
    Today's DANE sessions of one recipient domain.

    @ivar dane_on: whether the relay delivers with DANE now (C{--dane}).
    @ivar kept: whether TLSRPT results are kept (reports on), so that
        their absence means something.
    @ivar successes: successful sessions under C{tlsa} policies.
    @ivar failures: failed sessions under C{tlsa} policies.
    @ivar failure_types: failed sessions by RFC 8460 result type.
    @ivar base_domains: the TLSA base domains (the policies' domains).
    @ivar mx_hosts: the MX hosts the failures name.
    """

    dane_on: bool
    kept: bool = True
    successes: int = 0
    failures: int = 0
    failure_types: tuple[tuple[str, int], ...] = attrs.field(default=(), converter=_pairs)
    base_domains: tuple[str, ...] = attrs.field(default=(), converter=_names)
    mx_hosts: tuple[str, ...] = attrs.field(default=(), converter=_names)

    @property
    def seen(self) -> bool:
        """Whether DANE decided any session today."""
        return bool(self.successes or self.failures)

    @property
    def text(self) -> str:
        """The status in one line (the domains table, the domain page)."""
        counts = f"{self.successes} sessions succeeded"
        if self.failures:
            counts += f", {self.failures} failed (" + ", ".join(f"{t} {n}" for t, n in self.failure_types) + ")"
        if not self.dane_on:
            return "DANE off (no --dane)" + (f"; earlier today: {counts}" if self.seen else "")
        if not self.kept:
            return "DANE on; no results kept (reports off)"
        if not self.seen:
            return "no DANE seen today"
        return "DANE: " + counts


def dane_summary(results: Iterable[Result] | None, dane_on: bool) -> DANESummary:
    """
    The L{DANESummary} of a domain's results today.

    @param results: the domain's results (merged or not), or L{None} when
        none are kept.
    @param dane_on: whether the relay delivers with DANE.
    """
    if results is None:
        return DANESummary(dane_on, kept=False)
    successes = failures = 0
    types: Counter[str] = Counter()
    bases: set[str] = set()
    hosts: set[str] = set()
    for result in results:
        if result.policy.policy_type is not PolicyType.TLSA:
            continue
        successes += result.success_count
        failures += result.failure_count
        bases.add(result.policy.policy_domain)
        for detail in result.failures:
            types[detail.result_type.value] += detail.failed_session_count
            if detail.receiving_mx_hostname:
                hosts.add(detail.receiving_mx_hostname)
    return DANESummary(dane_on, True, successes, failures, sorted(types.items()), sorted(bases), sorted(hosts))
