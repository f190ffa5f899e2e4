"""
The RFC 8460 §4 report of one policy domain for one UTC day, and its §5.1
file name and §5.2 gzip form.

Pure: no I/O, no clock, no randomness (the caller passes the unique part of
the report id, see L{new_unique}).
"""

from __future__ import annotations

import datetime
import gzip
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from mtasts_twisted.policy import to_alabel
from mtasts_twisted.results import Result

__all__ = [
    "DAY_SECONDS",
    "GZIP_MEDIA_TYPE",
    "JSON_MEDIA_TYPE",
    "Report",
    "ReportSettings",
    "day_bounds",
    "day_of",
    "new_unique",
]

#: RFC 8460 §6.5: the media type of a gzip-compressed report.
GZIP_MEDIA_TYPE = "application/tlsrpt+gzip"
#: RFC 8460 §6.4: the media type of an uncompressed report.
JSON_MEDIA_TYPE = "application/tlsrpt+json"
#: Seconds in a UTC day (reports ignore leap seconds, as POSIX time does).
DAY_SECONDS = 86400

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
_UNIQUE = re.compile(r"[A-Za-z0-9]{1,64}\Z")


def day_of(when: float) -> str:
    """
    Return the UTC day of a POSIX time.

    @param when: POSIX seconds.
    @return: the day as C{YYYY-MM-DD}.
    """
    return datetime.datetime.fromtimestamp(when, datetime.UTC).date().isoformat()


def day_bounds(day: str) -> tuple[int, int]:
    """
    Return the first and last second of a UTC day.

    RFC 8460 §4.1: a report covers a full UTC day, 0000-2400; the last
    second is 23:59:59 as in the RFC's example C{date-range}.

    @param day: C{YYYY-MM-DD}.
    @return: C{(begin, end)} in POSIX seconds, C{end = begin + 86399}.
    @raise ValueError: C{day} is not a date.
    """
    if not _DAY.match(day):
        raise ValueError(f"not a YYYY-MM-DD day: {day!r}")
    date = datetime.date.fromisoformat(day)
    begin = int(
        datetime.datetime(date.year, date.month, date.day, tzinfo=datetime.UTC).timestamp()
    )
    return begin, begin + DAY_SECONDS - 1


def _rfc3339(when: int) -> str:
    # RFC 8460 §4.4: "date-time" per RFC 3339 §5.6, in UTC with "Z".
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def new_unique(randbits: Callable[[int], int]) -> str:
    """
    Make the unique part of a report id and file name.

    @param randbits: C{random.getrandbits} or the like (injected so tests
        are deterministic).
    @return: 20 lower-case hex digits (RFC 8460 §5.1 C{unique-id} is
        C{1*(ALPHA / DIGIT)}).
    """
    return f"{randbits(80):020x}"


def _domain(value: str) -> str:
    return to_alabel(value)


def _address_domain(address: str) -> str:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"not an e-mail address: {address!r}")
    return to_alabel(domain)


def _check_contact(instance: ReportSettings, attribute: Any, value: str) -> None:
    # RFC 8460 §5.3: TLS-Report-Submitter "MUST match the value found in the
    # [RFC5321] domain from the contact-info from the report body".
    if _address_domain(value) != instance.submitter_domain:
        raise ValueError(
            f"the contact address {value!r} must be in the submitter domain"
            f" {instance.submitter_domain!r} (RFC 8460 §5.3)"
        )


def _check_address(instance: Any, attribute: Any, value: str) -> None:
    _address_domain(value)


def _check_dkim(instance: ReportSettings, attribute: Any, value: str | None) -> None:
    if (instance.dkim_key_file is None) != (instance.dkim_selector is None):
        raise ValueError("DKIM signing needs both a key file and a selector")


@attrs.frozen
class ReportSettings:
    """
    How this node reports (RFC 8460 §4 metadata and §5 delivery).

    @ivar organization: C{organization-name}: who is responsible for the report.
    @ivar submitter_domain: the sending MTA's domain: C{TLS-Report-Submitter},
        the first part of the file name, the right side of report ids; in
        A-labels (converted).
    @ivar contact: C{contact-info}: an address in C{submitter_domain}.
    @ivar from_address: the C{From} (and envelope sender) of mailed reports.
    @ivar dkim_key_file: PEM private key to DKIM-sign mailed reports with
        (RFC 8460 §3: reports sent by mail MUST be DKIM-signed), or L{None}.
    @ivar dkim_selector: the DKIM selector of that key; its DNS record
        should carry C{s=tlsrpt} (RFC 8460 §3).
    @ivar report_successes_only_days: also report days without any failure
        (the default skips them).
    @ivar enabled: send reports at all (the off switch).
    @ivar dkim_domain: the DKIM C{d=} domain; C{submitter_domain} when
        L{None}.
    """

    organization: str
    submitter_domain: str = attrs.field(converter=_domain)
    contact: str = attrs.field(validator=_check_contact)
    from_address: str = attrs.field(validator=_check_address)
    dkim_key_file: str | None = None
    dkim_selector: str | None = attrs.field(default=None, validator=_check_dkim)
    report_successes_only_days: bool = False
    enabled: bool = True
    dkim_domain: str | None = attrs.field(
        default=None, converter=attrs.converters.optional(_domain)
    )

    @property
    def signing_domain(self) -> str:
        """The DKIM C{d=} domain."""
        return self.dkim_domain or self.submitter_domain


def _results(value: Iterable[Result]) -> tuple[Result, ...]:
    return tuple(value)


def _check_unique(instance: Any, attribute: Any, value: str) -> None:
    if not _UNIQUE.match(value):
        raise ValueError(f"a report's unique id must be 1-64 letters and digits: {value!r}")


@attrs.frozen
class Report:
    """
    The TLSRPT report of one policy domain for one UTC day (RFC 8460 §4).

    @ivar organization: C{organization-name}.
    @ivar contact: C{contact-info}.
    @ivar submitter: the submitter's domain (A-labels).
    @ivar policy_domain: the policy domain (A-labels).
    @ivar day: the UTC day, C{YYYY-MM-DD}.
    @ivar unique: letters and digits making the report id and file name
        unique (see L{new_unique}).
    @ivar results: the C{policies} elements, already merged.
    """

    organization: str
    contact: str
    submitter: str
    policy_domain: str
    day: str = attrs.field()
    unique: str = attrs.field(validator=_check_unique)
    results: tuple[Result, ...] = attrs.field(converter=_results)

    @day.validator
    def _check_day(self, attribute: Any, value: str) -> None:
        day_bounds(value)

    @classmethod
    def build(
        cls, settings: ReportSettings, policy_domain: str, day: str, unique: str,
        results: Iterable[Result],
    ) -> Report:
        """
        Make the report of C{policy_domain} for C{day}.

        @param settings: supplies organization, contact and submitter.
        @param policy_domain: the policy domain (converted to A-labels).
        @param day: C{YYYY-MM-DD}.
        @param unique: see L{new_unique}.
        @param results: merged results (see
            L{mtasts_twisted.tlsrpt.aggregate.merge_results}).
        """
        return cls(
            organization=settings.organization,
            contact=settings.contact,
            submitter=settings.submitter_domain,
            policy_domain=to_alabel(policy_domain),
            day=day,
            unique=unique,
            results=results,
        )

    @property
    def begin(self) -> int:
        """The first second of the day (POSIX)."""
        return day_bounds(self.day)[0]

    @property
    def end(self) -> int:
        """The last second of the day (POSIX)."""
        return day_bounds(self.day)[1]

    @property
    def report_id(self) -> str:
        """
        C{report-id}: unique (RFC 8460 §4.4), and shaped like the id of a
        RFC 5322 C{msg-id} so the §5.3 Subject can carry it in C{<...>}.
        """
        return f"{self.day}_{self.policy_domain}_{self.unique}@{self.submitter}"

    @property
    def filename(self) -> str:
        """RFC 8460 §5.1: C{sender!policy-domain!begin!end!unique.json.gz}."""
        return f"{self.submitter}!{self.policy_domain}!{self.begin}!{self.end}!{self.unique}.json.gz"

    @property
    def subject(self) -> str:
        """The RFC 8460 §5.3 C{Subject} of a mailed report."""
        return (
            f"Report Domain: {self.policy_domain} Submitter: {self.submitter}"
            f" Report-ID: <{self.report_id}>"
        )

    @property
    def success_count(self) -> int:
        """Successful sessions over every policy."""
        return sum(r.success_count for r in self.results)

    @property
    def failure_count(self) -> int:
        """Failed sessions over every policy."""
        return sum(r.failure_count for r in self.results)

    def to_json(self) -> dict[str, Any]:
        """Return the RFC 8460 §4.4 JSON object."""
        return {
            "organization-name": self.organization,
            "date-range": {
                "start-datetime": _rfc3339(self.begin),
                "end-datetime": _rfc3339(self.end),
            },
            "contact-info": self.contact,
            "report-id": self.report_id,
            # RFC 8460 §4: "policies" MUST be an array even with one policy.
            "policies": [r.to_json() for r in self.results],
        }

    def json_bytes(self) -> bytes:
        """The report as UTF-8 I-JSON (RFC 8460 §4, RFC 7493)."""
        return json.dumps(self.to_json(), ensure_ascii=False, allow_nan=False).encode("utf-8")

    def gzip_bytes(self) -> bytes:
        """RFC 8460 §5.2: the report, gzip-compressed (reproducibly: mtime 0)."""
        return gzip.compress(self.json_bytes(), mtime=0)
