"""
SMTP TLS Reporting (RFC 8460): aggregation of results and daily reports.

The result value types live in L{mtasts_twisted.results} because the policy
cache and delivery produce them; they are re-exported here.

  - L{aggregate}: L{ResultAggregator}, the L{IResultSink} that merges
    results per policy domain and UTC day and flushes them in batches.
  - L{report}: the RFC 8460 §4 JSON (L{Report}) and L{ReportSettings}.
  - L{https}: POSTing reports to C{https:} rua (L{HTTPSReportSender}).
  - L{mail}: the C{mailto:} report message (L{build_report_message}).
  - L{sends}: the sends shelf: L{SendState} of each report, L{SendOutcome}.
  - L{rua}: delivering one report to its rua endpoints (L{RuaSender}).
  - L{pending}: the read-only view of reports not yet sent
    (L{pending_reports}, L{preview_report}) for C{report preview}.
  - L{schedule}: L{ReportScheduler}, the daily run with claims, leases,
    retries and its timer.

Open the store with C{open_store(url, reactor, tables=(..., *TABLES))}.
"""

from mtasts_twisted.results import (
    FailureDetails,
    PolicyDescriptor,
    PolicyType,
    Result,
    ResultType,
)
from mtasts_twisted.tlsrpt.aggregate import (
    NULL_SINK,
    RESULTS_TABLE,
    NullResultSink,
    ResultAggregator,
    merge_results,
)
from mtasts_twisted.tlsrpt.https import HTTPSReportSender, ReportDeliveryError
from mtasts_twisted.tlsrpt.mail import SendMail, build_report_message, mailto_addresses
from mtasts_twisted.tlsrpt.report import Report, ReportSettings
from mtasts_twisted.tlsrpt.pending import NoResultsError, PendingReport, pending_reports, preview_report
from mtasts_twisted.tlsrpt.rua import ReportPoster, RuaOutcome, RuaSender
from mtasts_twisted.tlsrpt.schedule import ReportScheduler, SchedulerSettings
from mtasts_twisted.tlsrpt.sends import SENDS_TABLE, TABLES, SendOutcome, SendState

__all__ = [
    "NULL_SINK",
    "RESULTS_TABLE",
    "SENDS_TABLE",
    "TABLES",
    "FailureDetails",
    "HTTPSReportSender",
    "NoResultsError",
    "NullResultSink",
    "PendingReport",
    "PolicyDescriptor",
    "PolicyType",
    "Report",
    "ReportDeliveryError",
    "ReportPoster",
    "ReportScheduler",
    "ReportSettings",
    "Result",
    "ResultAggregator",
    "ResultType",
    "RuaOutcome",
    "RuaSender",
    "SchedulerSettings",
    "SendMail",
    "SendOutcome",
    "SendState",
    "build_report_message",
    "mailto_addresses",
    "merge_results",
    "pending_reports",
    "preview_report",
]
