"""
Tests for L{mtasts_twisted.tlsrpt.report}: the RFC 8460 §4 JSON, checked by a
structural validator written here from the RFC and by parsedmarc's
independent SMTP TLS report parser; the §5.1 file name; settings.
"""

from __future__ import annotations

import calendar
import gzip
import ipaddress
import json
import os
import random
import re
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mtasts_twisted.policy import DomainError
from mtasts_twisted.results import (
    FailureDetails,
    PolicyDescriptor,
    PolicyType,
    Result,
    ResultType,
)
from mtasts_twisted.tlsrpt.aggregate import merge_results
from mtasts_twisted.tlsrpt.report import (
    Report,
    ReportSettings,
    day_bounds,
    day_of,
    new_unique,
)

SETTINGS = ReportSettings(
    organization="Example Sender Inc.",
    submitter_domain="mail.sender.example",
    contact="tlsrpt@mail.sender.example",
    from_address="tlsrpt-noreply@mail.sender.example",
)

STS = PolicyDescriptor(
    PolicyType.STS,
    "example.net",
    ["version: STSv1", "mode: enforce", "mx: mx1.example.net", "mx: *.backup.example.net",
     "max_age: 86400"],
    ["mx1.example.net", "*.backup.example.net"],
)
NO_POLICY = PolicyDescriptor(PolicyType.NO_POLICY_FOUND, "example.net")
EXPIRED = FailureDetails(
    ResultType.CERTIFICATE_EXPIRED,
    sending_mta_ip="192.0.2.1",
    receiving_mx_hostname="mx1.example.net",
    receiving_mx_helo="mx1.example.net",
    receiving_ip="198.51.100.7",
    failed_session_count=3,
    additional_information="https://mail.sender.example/tlsrpt/1",
    failure_reason_code="X509_V_ERR_CERT_HAS_EXPIRED",
)
STARTTLS = FailureDetails(
    ResultType.STARTTLS_NOT_SUPPORTED,
    sending_mta_ip="2001:db8::1",
    receiving_mx_hostname="mx2.backup.example.net",
    receiving_ip="2001:db8::25",
    failed_session_count=2,
    failure_reason_code="starttls-not-offered",
)

RESULTS = [
    Result(STS, success_count=10, failures=[EXPIRED, STARTTLS]),
    Result(NO_POLICY, success_count=4),
]


def make_report(results=RESULTS, day="2024-05-01", unique="abc123"):
    return Report.build(SETTINGS, "example.net", day, unique, results)


# --- a structural validator written from RFC 8460 §4.4 -----------------------

_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})\Z")
_POLICY_TYPES = {"sts", "tlsa", "no-policy-found"}
_RESULT_TYPES = {
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
}
_DETAIL_STRINGS = {
    "sending-mta-ip", "receiving-mx-hostname", "receiving-mx-helo", "receiving-ip",
    "additional-information", "failure-reason-code",
}
#: §4.3.1 negotiation failures: they happen in a session with an MX host.
_NEGOTIATION_FAILURES = {
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted",
}
#: §4.4 marks only "receiving-mx-helo" and "additional-info-uri" optional:
#: the failure details of a session name who connected where.  A failure
#: without a session (a policy failure of §4.3.2, an MX host skipped before
#: connecting) has no addresses to give.  "failure-reason-code" is not
#: required: §4.3.1 and §4.3.3 say a reporter SHOULD use it for
#: certificate-not-trusted and validation-failure, so it may be absent for
#: the other types.
_SESSION_FIELDS = ("sending-mta-ip", "receiving-mx-hostname", "receiving-ip")
#: RFC 3986 §3: scheme ":" hier-part, no white space.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+\Z")


def _fail(path: str, problem: str) -> None:
    raise AssertionError(f"RFC 8460 §4.4: {path}: {problem}")


def _require(obj: Any, path: str, key: str, kind: type) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        _fail(path, f"missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(f"{path}.{key}", f"expected {kind.__name__}, got {value!r}")
    return value


def validate_report(report: dict[str, Any]) -> None:
    """
    Check C{report} against the RFC 8460 §4.4 structure; raise
    C{AssertionError} naming the first problem.
    """
    _require(report, "$", "organization-name", str)
    _require(report, "$", "contact-info", str)
    if "@" not in report["contact-info"]:
        _fail("$.contact-info", "not an addr-spec")
    _require(report, "$", "report-id", str)
    dates = _require(report, "$", "date-range", dict)
    for key in ("start-datetime", "end-datetime"):
        value = _require(dates, "$.date-range", key, str)
        if not _DATETIME.match(value):
            _fail(f"$.date-range.{key}", f"not an RFC 3339 date-time: {value!r}")
    policies = _require(report, "$", "policies", list)
    if not policies:
        _fail("$.policies", "empty")
    for i, element in enumerate(policies):
        path = f"$.policies[{i}]"
        policy = _require(element, path, "policy", dict)
        if _require(policy, path + ".policy", "policy-type", str) not in _POLICY_TYPES:
            _fail(path + ".policy.policy-type", repr(policy["policy-type"]))
        domain = _require(policy, path + ".policy", "policy-domain", str)
        if not domain.isascii():
            _fail(path + ".policy.policy-domain", "not A-labels")
        if "policy-string" in policy:
            strings = _require(policy, path + ".policy", "policy-string", list)
            if not all(isinstance(s, str) for s in strings):
                _fail(path + ".policy.policy-string", "not an array of strings")
        if "mx-host" in policy:
            mx = policy["mx-host"]
            if not (isinstance(mx, str) or (isinstance(mx, list) and all(isinstance(m, str) for m in mx))):
                _fail(path + ".policy.mx-host", repr(mx))
        summary = _require(element, path, "summary", dict)
        ok = _require(summary, path + ".summary", "total-successful-session-count", int)
        failed = _require(summary, path + ".summary", "total-failure-session-count", int)
        if ok < 0 or failed < 0:
            _fail(path + ".summary", "negative count")
        details = element.get("failure-details", [])
        if not isinstance(details, list):
            _fail(path + ".failure-details", "not an array")
        for j, detail in enumerate(details):
            dpath = f"{path}.failure-details[{j}]"
            if _require(detail, dpath, "result-type", str) not in _RESULT_TYPES:
                _fail(dpath + ".result-type", repr(detail["result-type"]))
            if _require(detail, dpath, "failed-session-count", int) < 1:
                _fail(dpath + ".failed-session-count", "below 1")
            for key in set(detail) - {"result-type", "failed-session-count"}:
                if key not in _DETAIL_STRINGS:
                    _fail(dpath, f"unknown key {key!r}")
                _require(detail, dpath, key, str)
            if detail["result-type"] in _NEGOTIATION_FAILURES or "receiving-ip" in detail:
                # A session: who connected where.
                for key in _SESSION_FIELDS:
                    _require(detail, dpath, key, str)
            for key in ("sending-mta-ip", "receiving-ip"):
                if key in detail:
                    _check_ip(detail[key], f"{dpath}.{key}")
            if "additional-information" in detail and not _URI.match(detail["additional-information"]):
                _fail(dpath + ".additional-information",
                      f"not a URI (additional-info-uri): {detail['additional-information']!r}")
        # §4: failure types are non-exclusive, so the details' counts may
        # overlap, but every failed session is in at least one of them.
        if sum(d["failed-session-count"] for d in details) < failed:
            _fail(path, "total-failure-session-count exceeds the sum of failed-session-count")


def _check_ip(value: str, path: str) -> None:
    """§4.4: dot-decimal IPv4, or IPv6 as RFC 5952 writes it."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        _fail(path, f"not an IP address: {value!r}")
    if address.compressed != value:
        _fail(path, f"not in RFC 5952 form: {value!r}")


def parse_with_parsedmarc(data: bytes) -> dict[str, Any]:
    """
    Parse a report with parsedmarc's independent parser (a test extra).

    Skips when parsedmarc is not installed, except under CI=true.
    """
    try:
        import parsedmarc
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            raise
        raise SkipTest("parsedmarc is not installed (pip install parsedmarc)")
    return parsedmarc.parse_smtp_tls_report_json(data)


def assert_independent_parse(case: SynchronousTestCase, report: Report, data: bytes) -> None:
    """
    Parse C{data} (the JSON of C{report}) with parsedmarc and check the
    counts it sees equal the report's.
    """
    parsed = parse_with_parsedmarc(data)
    case.assertEqual(parsed["report_id"], report.report_id)
    case.assertEqual(parsed["organization_name"], report.organization)
    case.assertEqual(parsed["contact_info"], report.contact)
    case.assertEqual(len(parsed["policies"]), len(report.results))
    for seen, result in zip(parsed["policies"], report.results):
        case.assertEqual(seen["policy_domain"], result.policy.policy_domain)
        case.assertEqual(seen["policy_type"], result.policy.policy_type.value)
        case.assertEqual(seen["successful_session_count"], result.success_count)
        case.assertEqual(seen["failed_session_count"], result.failure_count)
        case.assertEqual(
            [(d["result_type"], d["failed_session_count"]) for d in seen.get("failure_details", [])],
            [(f.result_type.value, f.failed_session_count) for f in result.failures],
        )


# --- tests -------------------------------------------------------------------


class ReportJSONTests(SynchronousTestCase):
    def test_structure(self):
        """The report has every RFC 8460 §4.4 field, of the right type."""
        data = make_report().to_json()
        validate_report(data)
        self.assertEqual(data["organization-name"], "Example Sender Inc.")
        self.assertEqual(data["contact-info"], "tlsrpt@mail.sender.example")
        self.assertEqual(data["policies"][0]["policy"]["policy-domain"], "example.net")
        self.assertEqual(
            data["policies"][0]["summary"],
            {"total-successful-session-count": 10, "total-failure-session-count": 5},
        )
        self.assertEqual(len(data["policies"][0]["failure-details"]), 2)
        self.assertNotIn("failure-details", data["policies"][1])

    def test_validator_rejects(self):
        """The validator is strict enough to catch broken reports."""
        good = make_report().to_json()
        broken = [
            ("policies", {}),
            ("date-range", {"start-datetime": "2024-05-01 00:00", "end-datetime": "x"}),
            ("report-id", 7),
        ]
        for key, value in broken:
            bad = json.loads(json.dumps(good))
            bad[key] = value
            self.assertRaises(AssertionError, validate_report, bad)
        bad = json.loads(json.dumps(good))
        bad["policies"][0]["summary"]["total-failure-session-count"] = 6
        self.assertRaises(AssertionError, validate_report, bad)

    def test_validator_rejects_details(self):
        """
        RFC 8460 §4.4: the failure details of a session name the sending
        MTA's address, the MX host and its address, and a reason code
        (only receiving-mx-helo and additional-info-uri are optional);
        addresses are IP literals in RFC 5952 form; additional-information
        is a URI.
        """
        good = make_report().to_json()
        validate_report(good)
        broken: list[tuple[str, Any]] = [
            ("sending-mta-ip", None),
            ("receiving-ip", None),
            ("receiving-mx-hostname", None),
            ("sending-mta-ip", "192.0.2.256"),
            ("sending-mta-ip", "2001:DB8::1"),
            ("additional-information", "certificate has expired (not after 2024-04-30)"),
            ("additional-information", "see the log"),
        ]
        for key, value in broken:
            bad = json.loads(json.dumps(good))
            detail = bad["policies"][0]["failure-details"][0]
            if value is None:
                del detail[key]
            else:
                detail[key] = value
            self.assertRaises(AssertionError, validate_report, bad)

    def test_validator_accepts_overlap_and_policy_failures(self):
        """
        RFC 8460 §4: failure types are non-exclusive (the details' counts
        may add up to more than the failed sessions); a policy failure,
        which has no session, needs no addresses.
        """
        fetch = FailureDetails(ResultType.STS_POLICY_FETCH_ERROR, failure_reason_code="no-policy-served")
        report = make_report(results=[Result(STS, success_count=1, failures=[fetch], failure_count=0)])
        data = report.to_json()
        validate_report(data)
        self.assertEqual(data["policies"][0]["summary"],
                         {"total-successful-session-count": 1, "total-failure-session-count": 0})
        self.assertEqual(data["policies"][0]["failure-details"],
                         [{"result-type": "sts-policy-fetch-error", "failed-session-count": 1,
                           "failure-reason-code": "no-policy-served"}])

    def test_date_range_full_utc_day(self):
        """RFC 8460 §4.1: the report covers 00:00:00Z to 23:59:59Z of the day."""
        data = make_report(day="2024-02-29").to_json()
        self.assertEqual(
            data["date-range"],
            {"start-datetime": "2024-02-29T00:00:00Z", "end-datetime": "2024-02-29T23:59:59Z"},
        )
        begin, end = day_bounds("2024-02-29")
        self.assertEqual(begin, calendar.timegm((2024, 2, 29, 0, 0, 0)))
        self.assertEqual(end - begin, 86399)
        self.assertEqual(day_of(begin), "2024-02-29")
        self.assertEqual(day_of(end), "2024-02-29")
        self.assertEqual(day_of(end + 1), "2024-03-01")

    def test_report_id_and_subject(self):
        """The report id is unique per report and fits the §5.3 Subject."""
        rng = random.Random(5)
        ids = {make_report(unique=new_unique(rng.getrandbits)).report_id for _ in range(50)}
        self.assertEqual(len(ids), 50)
        report = make_report()
        self.assertEqual(report.report_id, "2024-05-01_example.net_abc123@mail.sender.example")
        self.assertEqual(
            report.subject,
            "Report Domain: example.net Submitter: mail.sender.example"
            " Report-ID: <2024-05-01_example.net_abc123@mail.sender.example>",
        )

    def test_filename(self):
        """RFC 8460 §5.1: sender!policy-domain!begin!end!unique.json.gz."""
        report = make_report()
        begin, end = day_bounds("2024-05-01")
        self.assertEqual(
            report.filename, f"mail.sender.example!example.net!{begin}!{end}!abc123.json.gz"
        )
        self.assertRegex(report.filename, r"\A[a-z0-9.\-]+![a-z0-9.\-]+!\d+!\d+![A-Za-z0-9]+\.json\.gz\Z")

    def test_gzip(self):
        """RFC 8460 §5.2: the gzip form gunzips to the JSON; reproducible."""
        report = make_report()
        self.assertEqual(json.loads(gzip.decompress(report.gzip_bytes())), report.to_json())
        self.assertEqual(report.gzip_bytes(), report.gzip_bytes())

    def test_idn_policy_domain_in_alabels(self):
        """RFC 8460 §4.4: policy domains are A-labels."""
        report = Report.build(SETTINGS, "bücher.example", "2024-05-01", "a1", [])
        self.assertEqual(report.policy_domain, "xn--bcher-kva.example")
        self.assertIn("xn--bcher-kva.example!", report.filename)

    def test_parsedmarc(self):
        """An independent parser reads the report with the same counts."""
        report = make_report()
        assert_independent_parse(self, report, report.json_bytes())

    @settings(max_examples=25, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from([STS, NO_POLICY]),
                st.integers(0, 5),
                st.lists(st.tuples(st.sampled_from(list(ResultType)), st.integers(1, 4)), max_size=3),
            ),
            min_size=1,
            max_size=8,
        )
    )
    def test_merged_reports_validate(self, spec):
        """Any merged report validates and parsedmarc agrees on its counts."""
        results = merge_results(
            Result(policy, ok, [FailureDetails(rt, sending_mta_ip="192.0.2.1",
                                               receiving_mx_hostname="mx1.example.net",
                                               receiving_ip="198.51.100.7", failed_session_count=n,
                                               failure_reason_code="test") for rt, n in fails])
            for policy, ok, fails in spec
        )
        report = make_report(results=results)
        validate_report(report.to_json())
        self.assertEqual(report.success_count, sum(ok for _, ok, _ in spec))
        self.assertEqual(report.failure_count, sum(n for _, _, f in spec for _, n in f))
        assert_independent_parse(self, report, report.json_bytes())


class ReportSettingsTests(SynchronousTestCase):
    def test_contact_in_submitter_domain(self):
        """RFC 8460 §5.3: TLS-Report-Submitter must match contact-info's domain."""
        self.assertRaises(
            ValueError, ReportSettings, "Org", "mail.sender.example", "tlsrpt@elsewhere.example",
            "a@mail.sender.example",
        )

    def test_dkim_needs_key_and_selector(self):
        """A DKIM key without a selector (or the reverse) is refused."""
        self.assertRaises(
            ValueError, ReportSettings, "Org", "s.example", "t@s.example", "t@s.example",
            dkim_key_file="/k.pem",
        )
        self.assertRaises(
            ValueError, ReportSettings, "Org", "s.example", "t@s.example", "t@s.example",
            dkim_selector="sel",
        )

    def test_defaults(self):
        """Reports are on and success-only days off by default; domains normalised."""
        s = ReportSettings("Org", "S.Example.", "t@s.example", "t@s.example")
        self.assertEqual((s.enabled, s.report_successes_only_days), (True, False))
        self.assertEqual(s.submitter_domain, "s.example")
        self.assertEqual(s.signing_domain, "s.example")

    def test_bad_values(self):
        """Malformed days, unique ids and domains are refused."""
        self.assertRaises(ValueError, make_report, day="2024-5-1")
        self.assertRaises(ValueError, make_report, unique="no-hyphens")
        self.assertRaises(DomainError, Report.build, SETTINGS, "192.0.2.1", "2024-05-01", "a", [])
        self.assertRaises(ValueError, ReportSettings, "Org", "s.example", "nobody", "t@s.example")


class DayOfTests(SynchronousTestCase):
    def test_now(self):
        """day_of agrees with the system's idea of the UTC day."""
        now = time.time()
        self.assertEqual(day_of(now), time.strftime("%Y-%m-%d", time.gmtime(now)))
